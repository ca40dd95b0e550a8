// CUDA kernels for pair_contrastive_loss (common/pair_contrastive_impl.h):
// one warp per pair, on the current stream, with the math of common/hinge.h
// and common/distance.h (the same arithmetic the CPU tests exercise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/pair_contrastive_impl.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t, Metric kMetric>
__device__ __forceinline__ acc_t warp_pair_distance(const scalar_t* x0, const scalar_t* x1, int64_t dim, int lane,
                                                    acc_t& aux0, acc_t& aux1) {
  acc_t a = 0, b = 0, c = 0;
  for (int64_t k = lane; k < dim; k += kWarp) {
    const acc_t u = static_cast<acc_t>(x0[k]), v = static_cast<acc_t>(x1[k]);
    if (kMetric == Metric::Cosine) {
      a += u * v;
      b += u * u;
      c += v * v;
    } else {
      a += (u - v) * (u - v);
    }
  }
  a = warp_sum(a);
  if (kMetric == Metric::Cosine) {
    b = warp_sum(b);
    c = warp_sum(c);
    aux0 = checked_row_aux<acc_t>(kMetric, b, x0, dim);
    aux1 = checked_row_aux<acc_t>(kMetric, c, x1, dim);
    return guarded_distance_key<acc_t, scalar_t>(kMetric, aux0, aux1, a, x0, acc_t(1), x1, acc_t(1), dim,
                                                 gram_tolerance<acc_t>(dim));
  }
  aux0 = aux1 = acc_t(0);
  return kMetric == Metric::Euclidean ? ::sqrt(a) : a;
}

template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void pair_forward_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1,
                                    const bool* __restrict__ y, int64_t N, int64_t D, acc_t margin, bool squared,
                                    scalar_t* __restrict__ loss, acc_t* __restrict__ dist) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    acc_t aux0, aux1, t, s;
    const acc_t d = warp_pair_distance<scalar_t, acc_t, kMetric>(x0 + i * D, x1 + i * D, D, lane, aux0, aux1);
    if (lane == 0) {
      pair_contrastive_term<acc_t>(d, y[i], margin, squared, t, s);
      loss[i] = static_cast<scalar_t>(t);
      dist[i] = d;
    }
  }
}

template <typename scalar_t, typename acc_t, Metric kMetric>
__global__ void pair_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x0,
                                     const scalar_t* __restrict__ x1, const bool* __restrict__ y,
                                     const acc_t* __restrict__ dist, int64_t N, int64_t D, acc_t margin, bool squared,
                                     scalar_t* __restrict__ g0, scalar_t* __restrict__ g1) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(i, N) {
    const scalar_t* r0 = x0 + i * D;
    const scalar_t* r1 = x1 + i * D;
    acc_t aux0 = 0, aux1 = 0;
    if (kMetric == Metric::Cosine) {
      acc_t b = 0, c = 0;
      for (int64_t k = lane; k < D; k += kWarp) {
        const acc_t u = static_cast<acc_t>(r0[k]), v = static_cast<acc_t>(r1[k]);
        b += u * u;
        c += v * v;
      }
      aux0 = checked_row_aux<acc_t>(kMetric, warp_sum(b), r0, D);
      aux1 = checked_row_aux<acc_t>(kMetric, warp_sum(c), r1, D);
    }
    acc_t t, s, w, pn;
    pair_contrastive_term<acc_t>(dist[i], y[i], margin, squared, t, s);
    distance_grad_weights<acc_t>(kMetric, static_cast<acc_t>(grad[i]) * s, dist[i], aux0, aux1, w, pn);
    const acc_t c0 = pn * norm_term_scale<acc_t>(kMetric, aux0), c1 = pn * norm_term_scale<acc_t>(kMetric, aux1);
    for (int64_t k = lane; k < D; k += kWarp) {
      const acc_t u = static_cast<acc_t>(r0[k]), v = static_cast<acc_t>(r1[k]);
      g0[i * D + k] = static_cast<scalar_t>(c0 * u - w * v);
      g1[i * D + k] = static_cast<scalar_t>(c1 * v - w * u);
    }
  }
}

struct PairContrastiveKernels {
  static void pair_forward(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y, const PairArgs& args,
                           at::Tensor& loss, at::Tensor& dist) {
    const int64_t N = x0.size(0), D = x0.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(x0.scalar_type(), "metricops_pair_contrastive_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        pair_forward_kernel<scalar_t, acc_t, kMetric><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
            x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(), y.const_data_ptr<bool>(), N, D,
            static_cast<acc_t>(args.margin), args.squared, loss.mutable_data_ptr<scalar_t>(),
            dist.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void pair_backward(const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y,
                            const at::Tensor& dist, const PairArgs& args, at::Tensor& g0, at::Tensor& g1) {
    const int64_t N = x0.size(0), D = x0.size(1);
    METRICOPS_DISPATCH_CUDA_FLOATS(x0.scalar_type(), "metricops_pair_contrastive_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        pair_backward_kernel<scalar_t, acc_t, kMetric><<<warp_rows_grid(N), kThreads, 0, current_stream()>>>(
            grad.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), x1.const_data_ptr<scalar_t>(),
            y.const_data_ptr<bool>(), dist.const_data_ptr<acc_t>(), N, D, static_cast<acc_t>(args.margin), args.squared,
            g0.mutable_data_ptr<scalar_t>(), g1.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_cuda(const at::Tensor& x0, const at::Tensor& x1,
                                                              const at::Tensor& y, double margin,
                                                              c10::string_view metric, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(x0.device());
  return pair_contrastive_loss_impl<PairContrastiveKernels>(x0, x1, y, margin, metric, squared);
}

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& x0,
                                                                       const at::Tensor& x1, const at::Tensor& y,
                                                                       const at::Tensor& dist, double margin,
                                                                       c10::string_view metric, bool squared) {
  METRICOPS_CUDA_DEVICE_GUARD(x0.device());
  return pair_contrastive_loss_backward_impl<PairContrastiveKernels>(grad, x0, x1, y, dist, margin, metric, squared);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("pair_contrastive_loss", &pair_contrastive_loss_cuda);
  m.impl("pair_contrastive_loss_backward", &pair_contrastive_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
