// CPU kernels for contrastive_loss (common/contrastive_impl.h): parallel over
// rows (at::parallel_for), inner loops vectorised through METRICOPS_SIMD_CLONES,
// with the per-element math of common/hinge.h and common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/contrastive_impl.h"
#include "common/dispatch.h"
#include "cpu/distance_rows.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace {

// Columns [j0, j1) of row i for the scalar reductions: W_ij for a unit upstream
// gradient (w_ij + w_ji = 2 w_ij: distance and label relation are symmetric),
// and the row's sums of terms, of nonzero terms and of norm terms, from the
// row's distances `dist`. `dist` and `w` may alias (in place).
template <typename scalar_t, Metric kMetric, bool kSquared>
METRICOPS_SIMD_CLONES void contrastive_reduce_row(const scalar_t* dist, const scalar_t* aux, const int64_t* labels,
                                                  int64_t j0, int64_t j1, scalar_t aux_i, int64_t label_i,
                                                  scalar_t pos_margin, scalar_t neg_margin, scalar_t* w,
                                                  scalar_t& loss_sum, scalar_t& nnz, scalar_t& norm_sum) {
  scalar_t ls = 0, nz = 0, ps = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const scalar_t d = dist[j];
    scalar_t t, s, cw, p;
    contrastive_term<scalar_t>(d, labels[j] == label_i, pos_margin, neg_margin, kSquared, t, s);
    distance_grad_weights<scalar_t>(kMetric, s, d, aux_i, aux[j], cw, p);
    w[j] = scalar_t(2) * cw;
    ls += t;
    nz += t > scalar_t(0) ? scalar_t(1) : scalar_t(0);
    ps += p;
  }
  loss_sum += ls;
  nnz += nz;
  norm_sum += ps;
}

// Terms of a row from its distances.
template <typename scalar_t, bool kSquared>
METRICOPS_SIMD_CLONES void contrastive_none_row(const scalar_t* dist, const int64_t* labels, int64_t n, int64_t label_i,
                                                scalar_t pos_margin, scalar_t neg_margin, scalar_t* loss) {
  for (int64_t j = 0; j < n; ++j) {
    scalar_t t, s;
    contrastive_term<scalar_t>(dist[j], labels[j] == label_i, pos_margin, neg_margin, kSquared, t, s);
    loss[j] = t;
  }
}

// Backward of reduction="none" for columns [0, n) of a tile row: g/d hold
// entries (i, j), g_t/d_t the mirrored (j, i). Returns the row's sum of norm
// terms p_ij + p_ji.
template <typename scalar_t, Metric kMetric, bool kSquared>
METRICOPS_SIMD_CLONES scalar_t contrastive_none_grad_row(const scalar_t* g, const scalar_t* d, const scalar_t* g_t,
                                                         const scalar_t* d_t, const scalar_t* aux,
                                                         const int64_t* labels, int64_t n, scalar_t aux_i,
                                                         int64_t label_i, scalar_t pos_margin, scalar_t neg_margin,
                                                         scalar_t* w) {
  scalar_t ps = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool same = labels[j] == label_i;
    scalar_t t, s_ij, s_ji, w_ij, p_ij, w_ji, p_ji;
    contrastive_term<scalar_t>(d[j], same, pos_margin, neg_margin, kSquared, t, s_ij);
    contrastive_term<scalar_t>(d_t[j], same, pos_margin, neg_margin, kSquared, t, s_ji);
    distance_grad_weights<scalar_t>(kMetric, g[j] * s_ij, d[j], aux_i, aux[j], w_ij, p_ij);
    distance_grad_weights<scalar_t>(kMetric, g_t[j] * s_ji, d_t[j], aux[j], aux_i, w_ji, p_ji);
    w[j] = w_ij + w_ji;
    ps += p_ij + p_ji;
  }
  return ps;
}

// contrastive_loss's forward row loop, parallel over rows: dispatches on
// the dtype, metric and squared, writes row i's guarded distances (from its
// Gram row in `dot`; dist may alias dot) into dist's row i, then calls
// row_fn.template operator()<scalar_t, kMetric, kSquared>(i, dist_row,
// pos_margin, neg_margin).
template <typename RowFn>
void for_each_distance_row(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                           const ContrastiveArgs& args, at::Tensor& dist, const RowFn& row_fn) {
  const int64_t B = dot.size(0), dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(dot.scalar_type(), "metricops_contrastive_forward_cpu", [&] {
    const scalar_t* dp = dot.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ap = aux.const_data_ptr<scalar_t>();
    scalar_t* distp = dist.mutable_data_ptr<scalar_t>();
    const scalar_t tol = gram_tolerance<scalar_t>(dim);
    const scalar_t pm = static_cast<scalar_t>(args.pos_margin), nm = static_cast<scalar_t>(args.neg_margin);
    METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
      METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
        at::parallel_for(0, B, rows_grain(B), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            self_distance_row<scalar_t, kMetric>(dp + i * B, xp, ap, i, B, dim, tol, distp + i * B);
            row_fn.template operator()<scalar_t, kMetric, kSquared>(i, distp + i * B, pm, nm);
          }
        });
      });
    });
  });
}

struct ContrastiveKernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) { return row_aux_cpu(x, metric); }

  static void contrastive_reduce_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                         const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& W,
                                         at::Tensor& row_loss, at::Tensor& row_nnz, at::Tensor& row_coef) {
    // The row's distances go into W's row (in place over the Gram matrix when
    // they alias), then its weights over them.
    for_each_distance_row(
        dot, x, aux, args, W,
        [&]<typename scalar_t, Metric kMetric, bool kSquared>(int64_t i, scalar_t* wrow, scalar_t pm, scalar_t nm) {
          const int64_t B = dot.size(0);
          const scalar_t* ap = aux.const_data_ptr<scalar_t>();
          const int64_t* lp = labels.const_data_ptr<int64_t>();
          scalar_t ls = 0, nz = 0, ps = 0;
          // Ordered pairs i != j only: the diagonal is skipped, its weight is 0.
          contrastive_reduce_row<scalar_t, kMetric, kSquared>(wrow, ap, lp, 0, i, ap[i], lp[i], pm, nm, wrow, ls, nz,
                                                              ps);
          contrastive_reduce_row<scalar_t, kMetric, kSquared>(wrow, ap, lp, i + 1, B, ap[i], lp[i], pm, nm, wrow, ls,
                                                              nz, ps);
          wrow[i] = 0;
          row_loss.mutable_data_ptr<scalar_t>()[i] = ls;
          row_nnz.mutable_data_ptr<scalar_t>()[i] = nz;
          // Both roles of row i (as x_i and as x_j) give equal norm terms.
          row_coef.mutable_data_ptr<scalar_t>()[i] = scalar_t(2) * ps * norm_term_scale<scalar_t>(kMetric, ap[i]);
        });
  }

  static void contrastive_none_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                       const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& loss,
                                       at::Tensor& dist) {
    for_each_distance_row(
        dot, x, aux, args, dist,
        [&]<typename scalar_t, Metric kMetric, bool kSquared>(int64_t i, scalar_t* drow, scalar_t pm, scalar_t nm) {
          const int64_t B = dot.size(0);
          const int64_t* lp = labels.const_data_ptr<int64_t>();
          scalar_t* lrow = loss.mutable_data_ptr<scalar_t>() + i * B;
          contrastive_none_row<scalar_t, kSquared>(drow, lp, B, lp[i], pm, nm, lrow);
          lrow[i] = 0;  // i == j is not a pair
          drow[i] = 0;
        });
  }

  static void contrastive_none_backward(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& aux,
                                        const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& W,
                                        at::Tensor& row_coef) {
    const int64_t N = grad.size(0);
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "metricops_contrastive_none_backward_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* dp = dist.const_data_ptr<scalar_t>();
      const scalar_t* ap = aux.const_data_ptr<scalar_t>();
      const int64_t* lp = labels.const_data_ptr<int64_t>();
      scalar_t* wp = W.mutable_data_ptr<scalar_t>();
      scalar_t* rp = row_coef.mutable_data_ptr<scalar_t>();
      const scalar_t pm = static_cast<scalar_t>(args.pos_margin), nm = static_cast<scalar_t>(args.neg_margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          // Each task owns whole rows (deterministic sums); the mirrored entries
          // of a tile are first copied transposed, so the rows vectorise.
          constexpr int64_t kTile = 64;
          at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t tb, int64_t te) {
            std::vector<scalar_t> g_t(kTile * kTile), d_t(kTile * kTile);
            for (int64_t ti = tb; ti < te; ++ti) {
              const int64_t i0 = ti * kTile, i1 = std::min(N, i0 + kTile);
              for (int64_t i = i0; i < i1; ++i) rp[i] = 0;
              for (int64_t j0 = 0; j0 < N; j0 += kTile) {
                const int64_t j1 = std::min(N, j0 + kTile);
                for (int64_t j = j0; j < j1; ++j) {
                  for (int64_t i = i0; i < i1; ++i) {
                    g_t[(i - i0) * kTile + (j - j0)] = gp[j * N + i];
                    d_t[(i - i0) * kTile + (j - j0)] = dp[j * N + i];
                  }
                }
                for (int64_t i = i0; i < i1; ++i) {
                  const scalar_t* gt_row = g_t.data() + (i - i0) * kTile;
                  const scalar_t* dt_row = d_t.data() + (i - i0) * kTile;
                  // Split around the diagonal: i == j is not a pair.
                  const int64_t segs[2][2] = {{j0, std::min(j1, i)}, {std::max(j0, i + 1), j1}};
                  for (const auto& seg : segs) {
                    if (seg[0] >= seg[1]) continue;
                    const int64_t off = seg[0] - j0;
                    rp[i] += contrastive_none_grad_row<scalar_t, kMetric, kSquared>(
                        gp + i * N + seg[0], dp + i * N + seg[0], gt_row + off, dt_row + off, ap + seg[0], lp + seg[0],
                        seg[1] - seg[0], ap[i], lp[i], pm, nm, wp + i * N + seg[0]);
                  }
                  if (i >= j0 && i < j1) wp[i * N + i] = 0;
                }
              }
              for (int64_t i = i0; i < i1; ++i) rp[i] *= norm_term_scale<scalar_t>(kMetric, ap[i]);
            }
          });
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss_impl<ContrastiveKernels>);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_impl<ContrastiveKernels>);
}

}  // namespace cpu
}  // namespace metricops
