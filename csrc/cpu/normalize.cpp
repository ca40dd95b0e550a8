// CPU L2 normalisation (common/normalize.h): one fused pass per row forward
// and backward, instead of F.normalize's norm, clamp, expand and divide (and
// their autograd nodes), which cost more than the batch-hard GEMM's epilogue.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "common/normalize.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

template <typename scalar_t>
METRICOPS_SIMD_CLONES void divide_row(const scalar_t* x, scalar_t denom, int64_t n, scalar_t* y) {
  for (int64_t k = 0; k < n; ++k) y[k] = x[k] / denom;
}

template <typename scalar_t>
METRICOPS_SIMD_CLONES void axpby_row(scalar_t a, const scalar_t* g, scalar_t b, const scalar_t* x, int64_t n,
                                     scalar_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = a * g[k] - b * x[k];
}

std::tuple<at::Tensor, at::Tensor> l2_normalize_cpu(const at::Tensor& x_in, double eps) {
  check_normalize_inputs(x_in, eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor norm = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_l2_normalize_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* np = norm.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, B, rows_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        np[i] = std::sqrt(squared_norm(xp + i * D, D));
        divide_row(xp + i * D, normalize_denominator(np[i], e), D, yp + i * D);
      }
    });
  });
  return {y, norm};
}

at::Tensor l2_normalize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& norm_in,
                                     double eps) {
  check_normalize_backward_inputs(grad_in, x_in, norm_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor norm = norm_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_l2_normalize_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* np = norm.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, B, rows_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t a, b;
        normalize_grad_coefficients(np[i], dot_product(gp + i * D, xp + i * D, D), e, a, b);
        axpby_row(a, gp + i * D, b, xp + i * D, D, op + i * D);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("l2_normalize", &l2_normalize_cpu);
  m.impl("l2_normalize_backward", &l2_normalize_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
