// CPU kernels for contrastive_loss, pair_contrastive_loss and
// triplet_margin_loss: parallel over rows (at::parallel_for), inner loops
// vectorised through METRICOPS_SIMD_CLONES, with the per-element math of
// common/hinge.h and common/distance.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// ------------------------------------------------------------------ contrastive_loss

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
METRICOPS_SIMD_CLONES void contrastive_none_row(const scalar_t* dist, const int64_t* labels, int64_t n,
                                                int64_t label_i, scalar_t pos_margin, scalar_t neg_margin,
                                                scalar_t* loss) {
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

// ------------------------------------------------------------------ pair_contrastive_loss

// Returns the distance of one pair of rows.
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES void pair_row_sums(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t& s_diff,
                                         scalar_t& s_dot, scalar_t& s_n0, scalar_t& s_n1) {
  scalar_t a = 0, b = 0, c = 0, e = 0;
  for (int64_t k = 0; k < dim; ++k) {
    if (kMetric == Metric::Cosine) {
      b += x0[k] * x1[k];
      c += x0[k] * x0[k];
      e += x1[k] * x1[k];
    } else {
      const scalar_t diff = x0[k] - x1[k];
      a += diff * diff;
    }
  }
  s_diff = a;
  s_dot = b;
  s_n0 = c;
  s_n1 = e;
}

// Explicit differences for the euclidean metrics (exact 0 for equal rows);
// row_aux/distance_from_dot for cosine, as pairwise_distance computes it.
template <typename scalar_t, Metric kMetric>
scalar_t pair_distance(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t& aux0, scalar_t& aux1) {
  scalar_t s_diff, s_dot, s_n0, s_n1;
  pair_row_sums<scalar_t, kMetric>(x0, x1, dim, s_diff, s_dot, s_n0, s_n1);
  if (kMetric == Metric::Cosine) {
    aux0 = checked_row_aux<scalar_t>(kMetric, s_n0, x0, dim);
    aux1 = checked_row_aux<scalar_t>(kMetric, s_n1, x1, dim);
    return guarded_distance_key<scalar_t, scalar_t>(kMetric, aux0, aux1, s_dot, x0, scalar_t(1), x1, scalar_t(1), dim,
                                                    gram_tolerance<scalar_t>(dim));
  }
  aux0 = aux1 = scalar_t(0);
  return kMetric == Metric::Euclidean ? std::sqrt(s_diff) : s_diff;
}

template <typename scalar_t>
METRICOPS_SIMD_CLONES void pair_grad_row(const scalar_t* x0, const scalar_t* x1, int64_t dim, scalar_t c0,
                                         scalar_t c1, scalar_t w, scalar_t* g0, scalar_t* g1) {
  // grad_x0 = c0 * x0 - w * x1, grad_x1 = c1 * x1 - w * x0 (coefficient form).
  for (int64_t k = 0; k < dim; ++k) {
    g0[k] = c0 * x0[k] - w * x1[k];
    g1[k] = c1 * x1[k] - w * x0[k];
  }
}

// ------------------------------------------------------------------ triplet_margin_loss

template <typename scalar_t, NormKind kKind, bool kSwap>
METRICOPS_SIMD_CLONES void triplet_row_sums(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t dim,
                                            scalar_t eps, scalar_t norm_p, scalar_t& s_ap, scalar_t& s_an,
                                            scalar_t& s_pn) {
  scalar_t x = 0, y = 0, z = 0;
  for (int64_t k = 0; k < dim; ++k) {
    x += norm_accumulate<kKind, scalar_t>(a[k] - p[k] + eps, norm_p);
    y += norm_accumulate<kKind, scalar_t>(a[k] - n[k] + eps, norm_p);
    if (kSwap) z += norm_accumulate<kKind, scalar_t>(p[k] - n[k] + eps, norm_p);
  }
  s_ap = x;
  s_an = y;
  s_pn = z;
}

// grad_a = u_ap - c_an u_an, grad_p = -u_ap - c_pn u_pn, grad_n = c_an u_an + c_pn u_pn,
// with u_xy = r_xy f(e_xy) (see norm_grad_scale / norm_grad_elem) and the
// upstream gradient folded into r and c.
template <typename scalar_t, NormKind kKind, bool kSwap>
METRICOPS_SIMD_CLONES void triplet_grad_row(const scalar_t* a, const scalar_t* p, const scalar_t* n, int64_t dim,
                                            scalar_t eps, scalar_t norm_p, scalar_t r_ap, scalar_t r_an,
                                            scalar_t r_pn, scalar_t* ga, scalar_t* gp, scalar_t* gn) {
  for (int64_t k = 0; k < dim; ++k) {
    const scalar_t u_ap = r_ap * norm_grad_elem<kKind, scalar_t>(a[k] - p[k] + eps, norm_p);
    const scalar_t u_an = r_an * norm_grad_elem<kKind, scalar_t>(a[k] - n[k] + eps, norm_p);
    scalar_t u_pn = 0;
    if (kSwap) u_pn = r_pn * norm_grad_elem<kKind, scalar_t>(p[k] - n[k] + eps, norm_p);
    ga[k] = u_ap - u_an;
    gp[k] = -u_ap - u_pn;
    gn[k] = u_an + u_pn;
  }
}

struct Kernels {
  static at::Tensor row_aux(const at::Tensor& x, Metric metric) {
    const int64_t rows = x.size(0), dim = x.size(1);
    at::Tensor aux = at::empty({rows}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_contrastive_row_aux_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* ap = aux.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          ap[i] = checked_row_aux<scalar_t>(metric, squared_norm(xp + i * dim, dim), xp + i * dim, dim);
      });
    });
    return aux;
  }

  static void contrastive_reduce_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                         const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& W,
                                         at::Tensor& row_loss, at::Tensor& row_nnz, at::Tensor& row_coef) {
    const int64_t B = dot.size(0), dim = x.size(1);
    AT_DISPATCH_FLOATING_TYPES(dot.scalar_type(), "metricops_contrastive_forward_cpu", [&] {
      const scalar_t* dp = dot.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t tol = gram_tolerance<scalar_t>(dim);
      const scalar_t* ap = aux.const_data_ptr<scalar_t>();
      const int64_t* lp = labels.const_data_ptr<int64_t>();
      scalar_t* wp = W.mutable_data_ptr<scalar_t>();
      scalar_t* lsp = row_loss.mutable_data_ptr<scalar_t>();
      scalar_t* nzp = row_nnz.mutable_data_ptr<scalar_t>();
      scalar_t* rcp = row_coef.mutable_data_ptr<scalar_t>();
      const scalar_t pm = static_cast<scalar_t>(args.pos_margin), nm = static_cast<scalar_t>(args.neg_margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          at::parallel_for(0, B, rows_grain(B), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              scalar_t* wrow = wp + i * B;
              // The row's distances go into W's row (in place over the Gram
              // matrix when they alias), then its weights over them.
              const ExactRows<scalar_t> rows{xp + i * dim, scalar_t(1), xp, nullptr, dim, tol};
              distance_row<scalar_t, kMetric>(dp + i * B, ap, ap[i], B, wrow, rows, 0, i);
              scalar_t ls = 0, nz = 0, ps = 0;
              // Ordered pairs i != j only: the diagonal is skipped, its weight is 0.
              contrastive_reduce_row<scalar_t, kMetric, kSquared>(wrow, ap, lp, 0, i, ap[i], lp[i], pm, nm, wrow, ls,
                                                                  nz, ps);
              contrastive_reduce_row<scalar_t, kMetric, kSquared>(wrow, ap, lp, i + 1, B, ap[i], lp[i], pm, nm, wrow,
                                                                  ls, nz, ps);
              wrow[i] = 0;
              lsp[i] = ls;
              nzp[i] = nz;
              // Both roles of row i (as x_i and as x_j) give equal norm terms.
              rcp[i] = scalar_t(2) * ps * norm_term_scale<scalar_t>(kMetric, ap[i]);
            }
          });
        });
      });
    });
  }

  static void contrastive_none_forward(const at::Tensor& dot, const at::Tensor& x, const at::Tensor& aux,
                                       const at::Tensor& labels, const ContrastiveArgs& args, at::Tensor& loss,
                                       at::Tensor& dist) {
    const int64_t B = dot.size(0), dim = x.size(1);
    AT_DISPATCH_FLOATING_TYPES(dot.scalar_type(), "metricops_contrastive_none_forward_cpu", [&] {
      const scalar_t* dp = dot.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t tol = gram_tolerance<scalar_t>(dim);
      const scalar_t* ap = aux.const_data_ptr<scalar_t>();
      const int64_t* lp = labels.const_data_ptr<int64_t>();
      scalar_t* op = loss.mutable_data_ptr<scalar_t>();
      scalar_t* distp = dist.mutable_data_ptr<scalar_t>();
      const scalar_t pm = static_cast<scalar_t>(args.pos_margin), nm = static_cast<scalar_t>(args.neg_margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        METRICOPS_DISPATCH_BOOL(args.squared, kSquared, [&] {
          at::parallel_for(0, B, rows_grain(B), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const ExactRows<scalar_t> rows{xp + i * dim, scalar_t(1), xp, nullptr, dim, tol};
              distance_row<scalar_t, kMetric>(dp + i * B, ap, ap[i], B, distp + i * B, rows, 0, i);
              contrastive_none_row<scalar_t, kSquared>(distp + i * B, lp, B, lp[i], pm, nm, op + i * B);
              op[i * B + i] = 0;  // i == j is not a pair
              distp[i * B + i] = 0;
            }
          });
        });
      });
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
                        gp + i * N + seg[0], dp + i * N + seg[0], gt_row + off, dt_row + off, ap + seg[0],
                        lp + seg[0], seg[1] - seg[0], ap[i], lp[i], pm, nm, wp + i * N + seg[0]);
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

  static void pair_forward(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y, const PairArgs& args,
                           at::Tensor& loss, at::Tensor& dist) {
    const int64_t N = x0.size(0), D = x0.size(1);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "metricops_pair_contrastive_forward_cpu", [&] {
      const scalar_t* p0 = x0.const_data_ptr<scalar_t>();
      const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
      const bool* yp = y.const_data_ptr<bool>();
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* dp = dist.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            scalar_t aux0, aux1, t, s;
            const scalar_t d = pair_distance<scalar_t, kMetric>(p0 + i * D, p1 + i * D, D, aux0, aux1);
            pair_contrastive_term<scalar_t>(d, yp[i], margin, args.squared, t, s);
            lp[i] = t;
            dp[i] = d;
          }
        });
      });
    });
  }

  static void pair_backward(const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y,
                            const at::Tensor& dist, const PairArgs& args, at::Tensor& g0, at::Tensor& g1) {
    const int64_t N = x0.size(0), D = x0.size(1);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "metricops_pair_contrastive_backward_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* p0 = x0.const_data_ptr<scalar_t>();
      const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
      const bool* yp = y.const_data_ptr<bool>();
      const scalar_t* dp = dist.const_data_ptr<scalar_t>();
      scalar_t* o0 = g0.mutable_data_ptr<scalar_t>();
      scalar_t* o1 = g1.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      METRICOPS_DISPATCH_METRIC(args.metric, kMetric, [&] {
        at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            scalar_t aux0 = 0, aux1 = 0;
            if (kMetric == Metric::Cosine) {
              aux0 = checked_row_aux<scalar_t>(kMetric, squared_norm(p0 + i * D, D), p0 + i * D, D);
              aux1 = checked_row_aux<scalar_t>(kMetric, squared_norm(p1 + i * D, D), p1 + i * D, D);
            }
            scalar_t t, s, w, pn;
            pair_contrastive_term<scalar_t>(dp[i], yp[i], margin, args.squared, t, s);
            distance_grad_weights<scalar_t>(kMetric, gp[i] * s, dp[i], aux0, aux1, w, pn);
            pair_grad_row<scalar_t>(p0 + i * D, p1 + i * D, D, pn * norm_term_scale<scalar_t>(kMetric, aux0),
                                    pn * norm_term_scale<scalar_t>(kMetric, aux1), w, o0 + i * D, o1 + i * D);
          }
        });
      });
    });
  }

  static void triplet_forward(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const TripletArgs& args,
                              at::Tensor& loss, at::Tensor& dists) {
    const int64_t N = a.size(0), D = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "metricops_triplet_forward_cpu", [&] {
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* np = n.const_data_ptr<scalar_t>();
      scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* dp = dists.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      const scalar_t norm_p = static_cast<scalar_t>(args.p);
      // squared=True measures ‖a − p‖² without eps.
      const scalar_t eps = args.kind == NormKind::SquaredL2 ? scalar_t(0) : static_cast<scalar_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              scalar_t s_ap, s_an, s_pn;
              triplet_row_sums<scalar_t, kKind, kSwap>(ap + i * D, pp + i * D, np + i * D, D, eps, norm_p, s_ap, s_an,
                                                       s_pn);
              const scalar_t d_ap = norm_finish<kKind, scalar_t>(s_ap, norm_p);
              const scalar_t d_an = norm_finish<kKind, scalar_t>(s_an, norm_p);
              const scalar_t d_pn = kSwap ? norm_finish<kKind, scalar_t>(s_pn, norm_p) : scalar_t(0);
              const scalar_t d_neg = kSwap ? nan_min<scalar_t>(d_an, d_pn) : d_an;
              scalar_t v, slope;
              triplet_hinge<scalar_t>(margin + d_ap - d_neg, v, slope);
              lp[i] = v;
              dp[3 * i] = d_ap;
              dp[3 * i + 1] = d_an;
              dp[3 * i + 2] = d_pn;
            }
          });
        });
      });
    });
  }

  static void triplet_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n,
                               const at::Tensor& dists, const TripletArgs& args, at::Tensor& ga, at::Tensor& gp,
                               at::Tensor& gn) {
    const int64_t N = a.size(0), D = a.size(1);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "metricops_triplet_backward_cpu", [&] {
      const scalar_t* gr = grad.const_data_ptr<scalar_t>();
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* np = n.const_data_ptr<scalar_t>();
      const scalar_t* dp = dists.const_data_ptr<scalar_t>();
      scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
      scalar_t* gpp = gp.mutable_data_ptr<scalar_t>();
      scalar_t* gnp = gn.mutable_data_ptr<scalar_t>();
      const scalar_t margin = static_cast<scalar_t>(args.margin);
      const scalar_t norm_p = static_cast<scalar_t>(args.p);
      const scalar_t eps = args.kind == NormKind::SquaredL2 ? scalar_t(0) : static_cast<scalar_t>(args.eps);
      METRICOPS_DISPATCH_NORM_KIND(args.kind, kKind, [&] {
        METRICOPS_DISPATCH_BOOL(args.swap, kSwap, [&] {
          at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const scalar_t d_ap = dp[3 * i], d_an = dp[3 * i + 1], d_pn = dp[3 * i + 2];
              scalar_t c_an = 1, c_pn = 0;
              if (kSwap) min_shares<scalar_t>(d_an, d_pn, c_an, c_pn);
              const scalar_t d_neg = kSwap ? nan_min<scalar_t>(d_an, d_pn) : d_an;
              scalar_t v, slope;
              triplet_hinge<scalar_t>(margin + d_ap - d_neg, v, slope);
              const scalar_t g = gr[i] * slope;
              const scalar_t r_ap = g * norm_grad_scale<kKind, scalar_t>(d_ap, norm_p);
              const scalar_t r_an = g * c_an * norm_grad_scale<kKind, scalar_t>(d_an, norm_p);
              const scalar_t r_pn = kSwap ? g * c_pn * norm_grad_scale<kKind, scalar_t>(d_pn, norm_p) : scalar_t(0);
              triplet_grad_row<scalar_t, kKind, kSwap>(ap + i * D, pp + i * D, np + i * D, D, eps, norm_p, r_ap, r_an,
                                                       r_pn, gap + i * D, gpp + i * D, gnp + i * D);
            }
          });
        });
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, double pos_margin, double neg_margin, c10::string_view metric,
    bool squared, c10::string_view reduction) {
  return contrastive_loss_impl<Kernels>(x, labels, pos_margin, neg_margin, metric, squared, reduction);
}

at::Tensor contrastive_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& labels,
                                         const at::Tensor& mat, const at::Tensor& row_coef, const at::Tensor& denom,
                                         double pos_margin, double neg_margin, c10::string_view metric, bool squared,
                                         c10::string_view reduction) {
  return contrastive_loss_backward_impl<Kernels>(grad, x, labels, mat, row_coef, denom, pos_margin, neg_margin, metric,
                                                 squared, reduction);
}

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_cpu(const at::Tensor& x0, const at::Tensor& x1,
                                                             const at::Tensor& y, double margin,
                                                             c10::string_view metric, bool squared) {
  return pair_contrastive_loss_impl<Kernels>(x0, x1, y, margin, metric, squared);
}

std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& x0,
                                                                      const at::Tensor& x1, const at::Tensor& y,
                                                                      const at::Tensor& dist, double margin,
                                                                      c10::string_view metric, bool squared) {
  return pair_contrastive_loss_backward_impl<Kernels>(grad, x0, x1, y, dist, margin, metric, squared);
}

std::tuple<at::Tensor, at::Tensor> triplet_margin_loss_cpu(const at::Tensor& a, const at::Tensor& p,
                                                           const at::Tensor& n, double margin, double norm_p,
                                                           double eps, bool swap, bool squared) {
  return triplet_margin_loss_impl<Kernels>(a, p, n, margin, norm_p, eps, swap, squared);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const at::Tensor& dists,
    double margin, double norm_p, double eps, bool swap, bool squared) {
  return triplet_margin_loss_backward_impl<Kernels>(grad, a, p, n, dists, margin, norm_p, eps, swap, squared);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
  m.impl("pair_contrastive_loss", &pair_contrastive_loss_cpu);
  m.impl("pair_contrastive_loss_backward", &pair_contrastive_loss_backward_cpu);
  m.impl("triplet_margin_loss", &triplet_margin_loss_cpu);
  m.impl("triplet_margin_loss_backward", &triplet_margin_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
