// CPU kernels for pairwise_distance: the Gram term goes through BLAS
// (common/pairwise_distance_impl.h); the epilogues here are fused, parallel,
// vectorised passes over the (M, N) matrix using the math of common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/pairwise_distance_impl.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// One row of the backward weights; returns the row's sum of norm terms.
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES scalar_t grad_weights_row(const scalar_t* g, const scalar_t* d, scalar_t x_aux,
                                                const scalar_t* y_aux, int64_t n, scalar_t* cross,
                                                scalar_t* norm_term) {
  scalar_t row_sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t w, p;
    distance_grad_weights<scalar_t>(kMetric, g[j], d[j], x_aux, y_aux[j], w, p);
    cross[j] = w;
    norm_term[j] = p;
    row_sum += p;
  }
  return row_sum;
}

// One row of a tile of the symmetric (y is x) backward: g_t/d_t hold the
// mirrored entries (j, i). Returns the row's sum of p_ij + p_ji.
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES scalar_t grad_weights_self_row(const scalar_t* g, const scalar_t* d, const scalar_t* g_t,
                                                     const scalar_t* d_t, scalar_t aux_i, const scalar_t* aux_j,
                                                     int64_t n, scalar_t* cross) {
  scalar_t row_sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t w_ij, p_ij, w_ji, p_ji;
    distance_grad_weights<scalar_t>(kMetric, g[j], d[j], aux_i, aux_j[j], w_ij, p_ij);
    distance_grad_weights<scalar_t>(kMetric, g_t[j], d_t[j], aux_j[j], aux_i, w_ji, p_ji);
    cross[j] = w_ij + w_ji;
    row_sum += p_ij + p_ji;
  }
  return row_sum;
}

struct PairwiseKernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) { return row_aux_cpu(x, metric); }

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
            distance_row<scalar_t, kMetric>(dp + i * N, ya, xa[i], N, op + i * N);
            // A point's distance to itself is exactly 0 (not Gram rounding).
            if (self && kMetric != Metric::Cosine) op[i * N + i] = scalar_t(0);
          }
        });
      });
    });
  }

  static GradCoefficients grad_coefficients(const at::Tensor& grad_in, const at::Tensor& dist_in,
                                            const at::Tensor& x_aux, const at::Tensor& y_aux, Metric metric,
                                            bool self) {
    const at::Tensor grad = grad_in.contiguous();
    const at::Tensor dist = dist_in.contiguous();
    const int64_t M = grad.size(0), N = grad.size(1);
    GradCoefficients c;
    c.cross = at::empty({M, N}, grad.options());
    c.row_coef = at::empty({M}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "metricops_distance_grad_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* dp = dist.const_data_ptr<scalar_t>();
      const scalar_t* xa = x_aux.const_data_ptr<scalar_t>();
      const scalar_t* ya = y_aux.const_data_ptr<scalar_t>();
      scalar_t* cp = c.cross.mutable_data_ptr<scalar_t>();
      scalar_t* rp = c.row_coef.mutable_data_ptr<scalar_t>();
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        if (!self) {
          // Column sums need every row: keep the norm terms and reduce them once.
          at::Tensor norm_term = at::empty({M, N}, grad.options());
          scalar_t* np = norm_term.mutable_data_ptr<scalar_t>();
          at::parallel_for(0, M, rows_grain(N), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const scalar_t s = grad_weights_row<scalar_t, kMetric>(gp + i * N, dp + i * N, xa[i], ya, N, cp + i * N,
                                                                     np + i * N);
              rp[i] = s * norm_term_scale<scalar_t>(kMetric, xa[i]);
            }
          });
          c.col_coef = norm_term.sum(0);
          if (kMetric == Metric::Cosine) c.col_coef.mul_(y_aux.square());
          return;
        }
        // y is x: cross_ij = w_ij + w_ji, so one GEMM serves both roles of x.
        // Each task owns whole rows (deterministic sums); the mirrored
        // entries of a tile are first copied transposed, so the rows vectorise.
        constexpr int64_t kTile = 64;
        at::parallel_for(0, (M + kTile - 1) / kTile, 1, [&](int64_t tb, int64_t te) {
          std::vector<scalar_t> g_t(kTile * kTile), d_t(kTile * kTile);
          for (int64_t ti = tb; ti < te; ++ti) {
            const int64_t i0 = ti * kTile, i1 = std::min(M, i0 + kTile);
            for (int64_t i = i0; i < i1; ++i) rp[i] = 0;
            for (int64_t j0 = 0; j0 < N; j0 += kTile) {
              const int64_t j1 = std::min(N, j0 + kTile), nj = j1 - j0;
              for (int64_t j = j0; j < j1; ++j) {
                for (int64_t i = i0; i < i1; ++i) {
                  g_t[(i - i0) * kTile + (j - j0)] = gp[j * N + i];
                  d_t[(i - i0) * kTile + (j - j0)] = dp[j * N + i];
                }
              }
              for (int64_t i = i0; i < i1; ++i) {
                rp[i] += grad_weights_self_row<scalar_t, kMetric>(gp + i * N + j0, dp + i * N + j0,
                                                                  g_t.data() + (i - i0) * kTile,
                                                                  d_t.data() + (i - i0) * kTile, xa[i], xa + j0, nj,
                                                                  cp + i * N + j0);
              }
            }
            for (int64_t i = i0; i < i1; ++i) rp[i] *= norm_term_scale<scalar_t>(kMetric, xa[i]);
          }
        });
      });
    });
    return c;
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
