// CPU kernels for pairwise_distance: the Gram term goes through BLAS
// (common/pairwise_distance_impl.h); the epilogues here are fused, parallel
// passes over the (M, N) matrix using the shared math of common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/dispatch.h"
#include "common/pairwise_distance_impl.h"

namespace metricops {
namespace cpu {
namespace {

// Rows per parallel task: enough work to amortise scheduling.
int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

struct PairwiseKernels {
  static at::Tensor row_aux(const at::Tensor& x_in, Metric metric) {
    const at::Tensor x = x_in.contiguous();
    const int64_t rows = x.size(0), dim = x.size(1);
    at::Tensor aux = at::empty({rows}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_row_aux_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* ap = aux.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* row = xp + i * dim;
          scalar_t s = 0;
          for (int64_t k = 0; k < dim; ++k) s += row[k] * row[k];
          ap[i] = metricops::row_aux<scalar_t>(metric, s);
        }
      });
    });
    return aux;
  }

  static void distance_epilogue(const at::Tensor& dot, const at::Tensor& x_aux, const at::Tensor& y_aux,
                                Metric metric, bool self, at::Tensor& out) {
    const int64_t M = out.size(0), N = out.size(1);
    TORCH_INTERNAL_ASSERT(dot.is_contiguous() && out.is_contiguous());
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "metricops_distance_epilogue_cpu", [&] {
      const scalar_t* dp = dot.const_data_ptr<scalar_t>();
      const scalar_t* xa = x_aux.const_data_ptr<scalar_t>();
      const scalar_t* ya = y_aux.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        at::parallel_for(0, M, rows_grain(N), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t xi = xa[i];
            const scalar_t* drow = dp + i * N;
            scalar_t* orow = op + i * N;
            for (int64_t j = 0; j < N; ++j) {
              orow[j] = distance_from_dot<scalar_t>(kMetric, xi, ya[j], drow[j]);
            }
            // A point's distance to itself is exactly 0 (not Gram rounding).
            if (self && kMetric != Metric::Cosine) orow[i] = scalar_t(0);
          }
        });
      });
    });
  }

  static void grad_weights(const at::Tensor& grad_in, const at::Tensor& dist_in, const at::Tensor& x_aux,
                           const at::Tensor& y_aux, Metric metric, bool self, at::Tensor& cross,
                           at::Tensor& norm_term) {
    const at::Tensor grad = grad_in.contiguous();
    const at::Tensor dist = dist_in.contiguous();
    const int64_t M = grad.size(0), N = grad.size(1);
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "metricops_distance_grad_weights_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* dp = dist.const_data_ptr<scalar_t>();
      const scalar_t* xa = x_aux.const_data_ptr<scalar_t>();
      const scalar_t* ya = y_aux.const_data_ptr<scalar_t>();
      scalar_t* cp = cross.mutable_data_ptr<scalar_t>();
      scalar_t* np = norm_term.mutable_data_ptr<scalar_t>();
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        if (!self) {
          at::parallel_for(0, M, rows_grain(N), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              for (int64_t j = 0; j < N; ++j) {
                scalar_t w, p;
                distance_grad_weights<scalar_t>(kMetric, gp[i * N + j], dp[i * N + j], xa[i], ya[j], w, p);
                cp[i * N + j] = w;
                np[i * N + j] = p;
              }
            }
          });
          return;
        }
        // y is x: cross_ij = w_ij + w_ji, so one GEMM serves both roles of x.
        // Square tiles keep the transposed reads in cache.
        constexpr int64_t kTile = 64;
        const int64_t tiles = (M + kTile - 1) / kTile;
        at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
          for (int64_t ti = tb; ti < te; ++ti) {
            const int64_t i0 = ti * kTile, i1 = std::min(M, i0 + kTile);
            for (int64_t j0 = 0; j0 < N; j0 += kTile) {
              const int64_t j1 = std::min(N, j0 + kTile);
              for (int64_t i = i0; i < i1; ++i) {
                for (int64_t j = j0; j < j1; ++j) {
                  scalar_t w_ij, p_ij, w_ji, p_ji;
                  distance_grad_weights<scalar_t>(kMetric, gp[i * N + j], dp[i * N + j], xa[i], xa[j], w_ij, p_ij);
                  distance_grad_weights<scalar_t>(kMetric, gp[j * N + i], dp[j * N + i], xa[j], xa[i], w_ji, p_ji);
                  cp[i * N + j] = w_ij + w_ji;
                  np[i * N + j] = p_ij;
                }
              }
            }
          }
        });
      });
    });
  }
};

at::Tensor pairwise_distance_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                 c10::string_view metric) {
  return pairwise_distance_impl<PairwiseKernels>(x, y, metric);
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& y,
                                                                  const at::Tensor& dist,
                                                                  c10::string_view metric) {
  return pairwise_distance_backward_impl<PairwiseKernels>(grad, x, y, dist, metric);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance_cpu);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
