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
#include "cpu/triangle.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// One row of the backward weights: writes w_ij, adds p_ij to the column
// sums col_sum[j] and returns the row's sum of p_ij.
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES scalar_t grad_weights_row_colsum(const scalar_t* g, const scalar_t* d, scalar_t x_aux,
                                                       const scalar_t* y_aux, int64_t n, scalar_t* cross,
                                                       scalar_t* col_sum) {
  return lane_sum<scalar_t>(n, [&](int64_t j) {
    scalar_t w, p;
    distance_grad_weights<scalar_t>(kMetric, g[j], d[j], x_aux, y_aux[j], w, p);
    cross[j] = w;
    col_sum[j] += p;
    return p;
  });
}

// out[i][j] = out[j][i] for i > j, in 64×64 tiles (cache-friendly transpose).
template <typename scalar_t>
void mirror_upper_triangle(scalar_t* out, int64_t N) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (N + kTile - 1) / kTile;
  parallel_for_triangle_rows(tiles, 1, [&](int64_t ti) {  // tile row ti fills ti + 1 tiles
    const int64_t i0 = ti * kTile, i1 = std::min(N, i0 + kTile);
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int64_t j1 = std::min(N, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < std::min(j1, i); ++j) out[i * N + j] = out[j * N + i];
      }
    }
  });
}

struct PairwiseKernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) { return row_aux_cpu(x, metric); }

  // x, y: the contiguous inputs (for the exactness guard of common/distance.h).
  // With `self` only the upper triangle is computed, then mirrored, so the
  // matrix is exactly symmetric.
  static void distance_epilogue(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& y,
                                const at::Tensor& x_aux, const at::Tensor& y_aux, Metric metric, bool self,
                                at::Tensor& out) {
    const int64_t M = out.size(0), N = out.size(1);
    TORCH_INTERNAL_ASSERT(dot.is_contiguous() && out.is_contiguous() && x.is_contiguous() && y.is_contiguous());
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "metricops_distance_epilogue_cpu", [&] {
      const scalar_t* dp = dot.const_data_ptr<scalar_t>();
      const scalar_t* xa = x_aux.const_data_ptr<scalar_t>();
      const scalar_t* ya = y_aux.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const int64_t dim = x.size(1);
      const scalar_t tol = gram_tolerance<scalar_t>(dim);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
        // self: row i computes N - i entries, so its rows go out in pairs of equal work (cpu/triangle.h)
        const auto rows_in = [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t j0 = self ? i : 0;
            const ExactRows<scalar_t> rows{xp + i * dim, scalar_t(1), yp, nullptr, dim, tol};
            const scalar_t diag_dot = self ? dp[i * N + i] : scalar_t(0);  // read before out (may alias) is written
            distance_row<scalar_t, kMetric>(dp + i * N + j0, ya + j0, xa[i], N - j0, op + i * N + j0, rows, j0,
                                            self ? 0 : -1);
            if (self) {
              // A point's distance to itself: exactly 0 for a finite row (the
              // explicit form), NaN for a row holding NaN or inf, 1 for a zero
              // row under cosine.
              op[i * N + i] = key_to_distance<scalar_t>(
                  kMetric, guarded_distance_key<scalar_t, scalar_t>(kMetric, xa[i], xa[i], diag_dot, xp + i * dim,
                                                                    scalar_t(1), xp + i * dim, scalar_t(1), dim, tol));
            }
          }
        };
        if (self) {
          parallel_for_triangle_rows(M, std::max<int64_t>(1, rows_grain(N) / 2), [&](int64_t i) { rows_in(i, i + 1); });
          mirror_upper_triangle(op, N);
        } else {
          at::parallel_for(0, M, rows_grain(N), rows_in);
        }
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
        // One pass over the rows writes w and the row sums of p; the column
        // sums of p go through fixed 64-row chunks reduced in order, so they
        // are deterministic for any thread count and no (M, N) matrix of p
        // is allocated.
        constexpr int64_t kChunk = 64;
        const int64_t chunks = (M + kChunk - 1) / kChunk;
        at::Tensor col_partial = at::zeros({chunks, N}, grad.options());
        scalar_t* pp = col_partial.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          for (int64_t ch = cb; ch < ce; ++ch) {
            for (int64_t i = ch * kChunk; i < std::min(M, (ch + 1) * kChunk); ++i) {
              rp[i] = grad_weights_row_colsum<scalar_t, kMetric>(gp + i * N, dp + i * N, xa[i], ya, N, cp + i * N,
                                                                 pp + ch * N);
            }
          }
        });
        auto column_sum = [&](int64_t j) {
          scalar_t col = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) col += pp[ch * N + j];
          return col;
        };
        // Also when y is x: cross stays unsymmetrised and the backward runs
        // two GEMMs (cross @ x and cross^T @ x). Symmetrising it in place
        // costs more than the second GEMM here (a strided, memory-bound pass).
        c.col_coef = at::empty({N}, grad.options());
        scalar_t* qp = c.col_coef.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) qp[j] = column_sum(j) * norm_term_scale<scalar_t>(kMetric, ya[j]);
        });
        for (int64_t i = 0; i < M; ++i) rp[i] *= norm_term_scale<scalar_t>(kMetric, xa[i]);
      });
    });
    return c;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance_impl<PairwiseKernels>);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward_impl<PairwiseKernels>);
}

}  // namespace cpu
}  // namespace metricops
