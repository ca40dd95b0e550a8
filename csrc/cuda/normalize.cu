// CUDA L2 normalisation (common/normalize.h): one warp per row, float32
// accumulation for float16/bfloat16, forward and backward in one pass each.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/normalize.h"
#include "common/precision.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void l2_normalize_kernel(const scalar_t* __restrict__ x, int64_t B, int64_t D, acc_t eps,
                                    scalar_t* __restrict__ y, acc_t* __restrict__ norm) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, B) {
    const scalar_t* row = x + i * D;
    acc_t s = 0;
    for (int64_t k = lane; k < D; k += 32) {
      const acc_t v = static_cast<acc_t>(row[k]);
      s += v * v;
    }
    const acc_t n = std::sqrt(warp_sum(s));
    const acc_t denom = normalize_denominator(n, eps);
    for (int64_t k = lane; k < D; k += 32) y[i * D + k] = static_cast<scalar_t>(static_cast<acc_t>(row[k]) / denom);
    if (lane == 0) norm[i] = n;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void l2_normalize_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                             const acc_t* __restrict__ norm, int64_t B, int64_t D, acc_t eps,
                                             scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, B) {
    acc_t s = 0;
    for (int64_t k = lane; k < D; k += 32) s += static_cast<acc_t>(g[i * D + k]) * static_cast<acc_t>(x[i * D + k]);
    acc_t a, b;
    normalize_grad_coefficients(norm[i], warp_sum(s), eps, a, b);
    for (int64_t k = lane; k < D; k += 32) {
      out[i * D + k] =
          static_cast<scalar_t>(a * static_cast<acc_t>(g[i * D + k]) - b * static_cast<acc_t>(x[i * D + k]));
    }
  }
}

// norm is returned in the accumulation dtype (float32 for float16/bfloat16).
std::tuple<at::Tensor, at::Tensor> l2_normalize_cuda(const at::Tensor& x_in, double eps) {
  METRICOPS_CUDA_DEVICE_GUARD(x_in.device());
  check_normalize_inputs(x_in, eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);
  const auto acc = acc_dtype(x);
  at::Tensor norm = at::empty({B}, x.options().dtype(acc));
  if (B == 0) return {y, norm};
  METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_l2_normalize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    l2_normalize_kernel<scalar_t, acc_t><<<grid_for(B, kThreads / 32), kThreads, 0, current_stream()>>>(
        x.const_data_ptr<scalar_t>(), B, D, static_cast<acc_t>(eps), y.mutable_data_ptr<scalar_t>(),
        norm.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, norm};
}

at::Tensor l2_normalize_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& norm_in,
                                      double eps) {
  METRICOPS_CUDA_DEVICE_GUARD(x_in.device());
  check_normalize_backward_inputs(grad_in, x_in, norm_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty_like(x);
  if (B == 0) return out;
  METRICOPS_DISPATCH_CUDA_FLOATS(x.scalar_type(), "metricops_l2_normalize_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor norm = norm_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    l2_normalize_backward_kernel<scalar_t, acc_t><<<grid_for(B, kThreads / 32), kThreads, 0, current_stream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc_t>(), B, D,
        static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("l2_normalize", &l2_normalize_cuda);
  m.impl("l2_normalize_backward", &l2_normalize_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
