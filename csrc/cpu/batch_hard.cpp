// CPU kernels for batch_hard_triplet and its backward.
//
// The forward sweeps the upper triangle of the Gram matrix in row blocks (one
// BLAS GEMM each), turns each row into guarded distance keys (common/distance.h)
// and mines every entry for both of its anchors with vectorised lane
// selections; normalize=True is fused (each Gram row is scaled, no normalised
// copy). The backward is a gather/scatter of O(B·D) from per-anchor
// coefficients (common/triplet.h), with F.normalize's backward fused too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/normalize.h"
#include "common/row_blocks.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cpu/distance_rows.h"
#include "cpu/triplet_rows.h"

namespace metricops {
namespace cpu {
namespace {

// Dense int32 class ids with the labels' equality (int32 lanes vectorise
// with float32 keys; labels may be any int64).
std::vector<int32_t> class_ids(const at::Tensor& labels) {
  const int64_t B = labels.size(0);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [lab](int64_t a, int64_t b) { return lab[a] < lab[b]; });
  std::vector<int32_t> ids(B);
  int32_t next = -1;
  for (int64_t k = 0; k < B; ++k) {
    if (k == 0 || lab[order[k]] != lab[order[k - 1]]) ++next;
    ids[order[k]] = next;
  }
  return ids;
}

// Running batch-hard selections of every anchor, by distance key: farthest
// positive and nearest negative so far (index -1: none yet).
template <typename scalar_t>
struct BatchHardSelections {
  std::vector<scalar_t> key_p, key_n;
  std::vector<int32_t> index_p, index_n;
  explicit BatchHardSelections(int64_t B) : key_p(B, 0), key_n(B, 0), index_p(B, -1), index_n(B, -1) {}
};

// The selections below are farther / nearer of common/triplet.h (NaN wins,
// strict comparisons keep the earliest index) written with int32 lane masks
// and no short-circuits, so that GCC vectorises them.
// One column j of anchor i's row scan, into lane state (see batch_hard_row_lanes).
template <typename scalar_t, Metric kMetric>
inline void batch_hard_lane_step(scalar_t dot, scalar_t aj, int32_t cj, int32_t j, scalar_t ai, int32_t ci, int32_t i,
                                 scalar_t& key_p, int32_t& index_p, scalar_t& key_n, int32_t& index_n) {
  const scalar_t k = dot;  // the sweep turned the Gram entries into guarded keys (gram_row_to_keys)
  const int32_t same = select_mask<int32_t>(cj == ci);
  const int32_t k_nan = select_mask<int32_t>(k != k);
  const int32_t take_p =
      same & select_mask<int32_t>(j != i) &
      ((index_p >> 31) | select_mask<int32_t>(k > key_p) | (k_nan & select_mask<int32_t>(key_p == key_p)));
  const int32_t take_n =
      ~same & ((index_n >> 31) | select_mask<int32_t>(k < key_n) | (k_nan & select_mask<int32_t>(key_n == key_n)));
  key_p = take_p ? k : key_p;
  index_p = take_p ? j : index_p;
  key_n = take_n ? k : key_n;
  index_n = take_n ? j : index_n;
}

// Anchor i's row scan over columns [j0, j1) in kLanes lanes: lane l keeps
// the best of the columns j0 + l + kLanes·t (earliest on ties).
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES void batch_hard_row_lanes(const scalar_t* __restrict__ dot, const scalar_t* __restrict__ ap,
                                                const int32_t* __restrict__ cls, scalar_t ai, int32_t ci, int32_t i,
                                                int64_t j0, int64_t j1, scalar_t* __restrict__ key_p,
                                                int32_t* __restrict__ index_p, scalar_t* __restrict__ key_n,
                                                int32_t* __restrict__ index_n) {
  int64_t base = j0;
  for (; base + kLanes <= j1; base += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t j = base + l;
      batch_hard_lane_step<scalar_t, kMetric>(dot[j], ap[j], cls[j], static_cast<int32_t>(j), ai, ci, i, key_p[l],
                                              index_p[l], key_n[l], index_n[l]);
    }
  }
  for (int64_t l = 0; base + l < j1; ++l) {
    const int64_t j = base + l;
    batch_hard_lane_step<scalar_t, kMetric>(dot[j], ap[j], cls[j], static_cast<int32_t>(j), ai, ci, i, key_p[l],
                                            index_p[l], key_n[l], index_n[l]);
  }
}

// Row side: anchor i scans its Gram row over columns [j0, j1) (dot[j]) and
// merges the result into its running selection, which holds columns < j0.
template <typename scalar_t, Metric kMetric>
inline void batch_hard_row_scan(const scalar_t* dot, const scalar_t* ap, const int32_t* cls, int64_t i, int64_t j0,
                                int64_t j1, BatchHardSelections<scalar_t>& sel) {
  alignas(64) scalar_t key_p[kLanes], key_n[kLanes];
  alignas(64) int32_t index_p[kLanes], index_n[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) key_p[l] = key_n[l] = scalar_t(0), index_p[l] = index_n[l] = -1;
  batch_hard_row_lanes<scalar_t, kMetric>(dot, ap, cls, ap[i], cls[i], static_cast<int32_t>(i), j0, j1, key_p, index_p,
                                          key_n, index_n);
  for (int64_t l = 0; l < kLanes; ++l) {
    merge_candidate<scalar_t, int32_t, true>(key_p[l], index_p[l], sel.key_p[i], sel.index_p[i]);
    merge_candidate<scalar_t, int32_t, false>(key_n[l], index_n[l], sel.key_n[i], sel.index_n[i]);
  }
}

// Column side: the key row of sample i, columns [j0, j1), offered to the
// anchors j of those columns (all j > i, so ascending order per anchor).
template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES void batch_hard_column_update(const scalar_t* __restrict__ dot, const int32_t* __restrict__ cls,
                                                    int64_t i, int64_t j0, int64_t j1, scalar_t* __restrict__ key_p,
                                                    int32_t* __restrict__ index_p, scalar_t* __restrict__ key_n,
                                                    int32_t* __restrict__ index_n) {
  const int32_t ci = cls[i];
  const int32_t i32 = static_cast<int32_t>(i);
  for (int64_t j = j0; j < j1; ++j) {
    const scalar_t k = dot[j];  // a guarded key (gram_row_to_keys)
    const scalar_t kp = key_p[j], kn = key_n[j];
    const int32_t ip = index_p[j], in = index_n[j];
    const int32_t same = select_mask<int32_t>(cls[j] == ci);
    const int32_t k_nan = select_mask<int32_t>(k != k);
    const int32_t take_p =
        same & ((ip >> 31) | select_mask<int32_t>(k > kp) | (k_nan & select_mask<int32_t>(kp == kp)));
    const int32_t take_n =
        ~same & ((in >> 31) | select_mask<int32_t>(k < kn) | (k_nan & select_mask<int32_t>(kn == kn)));
    key_p[j] = take_p ? k : kp;
    index_p[j] = take_p ? i32 : ip;
    key_n[j] = take_n ? k : kn;
    index_n[j] = take_n ? i32 : in;
  }
}

// Gram row of sample i over columns [j0, j0 + n) -> guarded distance keys, in
// place (common/distance.h: near-duplicates, NaN and over/underflow from the
// explicit differences of the (scaled) rows).
template <typename scalar_t, Metric kMetric>
void gram_row_to_keys(scalar_t* row, const scalar_t* ap, const scalar_t* xp, const scalar_t* sp, int64_t i, int64_t j0,
                      int64_t n, int64_t dim, scalar_t tol) {
  // The diagonal entry (column i) is never selected (a != p), so it is skipped.
  if (guarded_row<scalar_t, kMetric, false>(row, ap + j0, ap[i], n, tol, row, i - j0)) {
    const ExactRows<scalar_t> rows{xp + i * dim, sp ? sp[i] : scalar_t(1), xp, sp, dim, tol};
    exact_keys_fixup<scalar_t, kMetric>(rows, ap + j0, ap[i], j0, n, row, i - j0);
  }
}

// Rows per block of the triangular Gram sweep: small enough that the upper
// triangle skips most of the lower one's GEMM work, large enough for BLAS.
constexpr int64_t kBatchHardBlockRows = 128;

// ||x_i|| of every row: the one pass over x that normalize=True needs.
at::Tensor row_norms_cpu(const at::Tensor& x) {
  return map_rows_cpu(x, [](const auto* row, int64_t dim) { return std::sqrt(squared_norm(row, dim)); });
}

// F.normalize's rows as scales of the raw ones, y_i = scale_i x_i with
// scale_i = 1 / max(||x_i||, eps), so no normalised copy is made; aux_i is
// the metric's row aux of y_i. From the row norms: O(B), no pass over x.
struct NormalizedRows {
  at::Tensor scale, aux;  // (B,)
};

NormalizedRows normalized_rows_cpu(const at::Tensor& norm, Metric metric) {
  const int64_t B = norm.size(0);
  NormalizedRows nr{at::empty({B}, norm.options()), at::empty({B}, norm.options())};
  AT_DISPATCH_FLOATING_TYPES(norm.scalar_type(), "metricops_normalized_rows_cpu", [&] {
    const scalar_t* np = norm.const_data_ptr<scalar_t>();
    scalar_t* sp = nr.scale.mutable_data_ptr<scalar_t>();
    scalar_t* ap = nr.aux.mutable_data_ptr<scalar_t>();
    const scalar_t eps = static_cast<scalar_t>(kNormalizeEps);
    for (int64_t i = 0; i < B; ++i) {
      sp[i] = scalar_t(1) / normalize_denominator(np[i], eps);
      const scalar_t y_norm = np[i] * sp[i];
      ap[i] = metricops::row_aux<scalar_t>(metric, y_norm * y_norm);
    }
  });
  return nr;
}

// row[c] *= row_scale * col_scale[c]: a Gram row of raw x made y's.
template <typename scalar_t>
METRICOPS_SIMD_CLONES void scale_gram_row(scalar_t* __restrict__ row, scalar_t row_scale,
                                          const scalar_t* __restrict__ col_scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) row[c] = row[c] * row_scale * col_scale[c];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize) {
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  TORCH_CHECK_VALUE(B < std::numeric_limits<int32_t>::max(), "embeddings: at most 2^31 - 1 rows, got ", B);
  at::Tensor losses = at::zeros({B}, x.options());
  at::Tensor positive = at::full({B}, -1, labels.options());
  at::Tensor negative = at::full({B}, -1, labels.options());
  at::Tensor dist_ap = at::zeros({B}, x.options());
  at::Tensor dist_an = at::zeros({B}, x.options());
  if (B == 0) return {losses, positive, negative, dist_ap, dist_an};
  // normalize: the GEMM runs on raw x and each Gram row is scaled to y's.
  const NormalizedRows nr = normalize ? normalized_rows_cpu(row_norms_cpu(x), metric) : NormalizedRows{};
  const at::Tensor aux = normalize ? nr.aux : row_aux_cpu(x, metric);
  const std::vector<int32_t> cls = class_ids(labels);
  // The Gram matrix is symmetric: sweep its upper triangle in row blocks
  // (one GEMM of rows [r0, r1) against columns [r0, B) each), mining every
  // entry twice: for its row's anchor (row side) and, right of the diagonal
  // block, for its column's anchor (column side). Each anchor sees its
  // columns in ascending order, so ties resolve exactly as one full scan.
  // ~(B/2 + block/2)·B·D GEMM work instead of B²·D; O(block·B) memory.
  // block_rows bounds the sweep's blocks (<= 0: the default, which is also the largest).
  const int64_t block = std::min(rows_per_block(block_rows, B, kBatchHardBlockRows), kBatchHardBlockRows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_hard_cpu", [&] {
    BatchHardSelections<scalar_t> sel(B);
    at::Tensor buffer = at::empty({block * B}, x.options());
    const scalar_t* ap = aux.const_data_ptr<scalar_t>();
    const scalar_t* sp = normalize ? nr.scale.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t dim = x.size(1);
    const scalar_t tol = gram_tolerance<scalar_t>(dim);
    const int32_t* cp = cls.data();
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      for (int64_t r0 = 0; r0 < B; r0 += block) {
        const int64_t rows = std::min(block, B - r0), cols = B - r0, r1 = r0 + rows;
        at::Tensor gram = buffer.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(gram, x.narrow(0, r0, rows), x.narrow(0, r0, cols).t());
        scalar_t* gp = gram.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            if (sp != nullptr) scale_gram_row(gp + r * cols, sp[r0 + r], sp + r0, cols);
            gram_row_to_keys<scalar_t, kMetric>(gp + r * cols, ap, xp, sp, r0 + r, r0, cols, dim, tol);
            batch_hard_row_scan<scalar_t, kMetric>(gp + r * cols - r0, ap, cp, r0 + r, r0, B, sel);
          }
        });
        if (r1 == B) break;
        // Column side: each task owns a range of anchors (columns >= r1).
        at::parallel_for(r1, B, 256, [&](int64_t j0, int64_t j1) {
          for (int64_t r = 0; r < rows; ++r) {
            batch_hard_column_update<scalar_t, kMetric>(gp + r * cols - r0, cp, r0 + r, j0, j1, sel.key_p.data(),
                                                        sel.index_p.data(), sel.key_n.data(), sel.index_n.data());
          }
        });
      }
    });
    int64_t* pp = positive.mutable_data_ptr<int64_t>();
    int64_t* np = negative.mutable_data_ptr<int64_t>();
    scalar_t* lp = losses.mutable_data_ptr<scalar_t>();
    scalar_t* dap = dist_ap.mutable_data_ptr<scalar_t>();
    scalar_t* dan = dist_an.mutable_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    for (int64_t a = 0; a < B; ++a) {
      if (sel.index_p[a] < 0 || sel.index_n[a] < 0) continue;
      pp[a] = sel.index_p[a];
      np[a] = sel.index_n[a];
      batch_hard_from_keys<scalar_t>(metric, sel.key_p[a], sel.key_n[a], m, soft, dap[a], dan[a], lp[a]);
    }
  });
  return {losses, positive, negative, dist_ap, dist_an};
}

namespace {

// Each output row is written once, by one task: grad[r] gathers its own
// anchor terms and the terms of the anchors that chose r as their positive
// or negative, listed per row in anchor order (a counting sort). Parallel
// over rows, deterministic, and about half the memory traffic of an anchor
// pass followed by a scatter pass.
// norm defined (normalize=True): the coefficients are y's (y_k =
// scale_k x_k); each row's gradient in y is then taken through
// F.normalize's backward in place.
at::Tensor batch_hard_assemble_cpu(const at::Tensor& x, const at::Tensor& positive, const at::Tensor& negative,
                                   const BatchHardGradCoefficients& c, const at::Tensor& norm) {
  const int64_t B = x.size(0), D = x.size(1);
  const bool normalize = norm.defined();
  const NormalizedRows nr = normalize ? normalized_rows_cpu(norm, Metric::Euclidean) : NormalizedRows{};
  at::Tensor grad = at::empty({B, D}, x.options());
  const int64_t* pos = positive.const_data_ptr<int64_t>();
  const int64_t* neg = negative.const_data_ptr<int64_t>();
  // An anchor has a triplet when both indices are set (a direct call may
  // pass one of them as -1: it is then skipped, never dereferenced).
  auto has_triplet = [&](int64_t a) { return index_in_batch(pos[a], B) && index_in_batch(neg[a], B); };
  // Incoming terms of row r: entries [offset[r], offset[r + 1]) of `source`,
  // each an anchor index, 2a for "a chose r as positive", 2a + 1 as negative.
  std::vector<int64_t> offset(B + 1, 0), source;
  for (int64_t a = 0; a < B; ++a) {
    if (!has_triplet(a)) continue;
    ++offset[pos[a] + 1];
    ++offset[neg[a] + 1];
  }
  for (int64_t r = 0; r < B; ++r) offset[r + 1] += offset[r];
  source.resize(offset[B]);
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t a = 0; a < B; ++a) {
      if (!has_triplet(a)) continue;
      source[fill[pos[a]]++] = 2 * a;
      source[fill[neg[a]]++] = 2 * a + 1;
    }
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_hard_assemble_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* self_a = c.anchor_self.const_data_ptr<scalar_t>();
    const scalar_t* w_p = c.cross_positive.const_data_ptr<scalar_t>();
    const scalar_t* w_n = c.cross_negative.const_data_ptr<scalar_t>();
    const scalar_t* self_p = c.positive_self.const_data_ptr<scalar_t>();
    const scalar_t* self_n = c.negative_self.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = normalize ? nr.scale.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* np = normalize ? norm.const_data_ptr<scalar_t>() : nullptr;
    auto row_scale = [&](int64_t k) { return sp != nullptr ? sp[k] : scalar_t(1); };
    const scalar_t eps = static_cast<scalar_t>(kNormalizeEps);
    at::parallel_for(0, B, rows_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* g = gp + r * D;
        scalar_t scale = has_triplet(r) ? self_a[r] : scalar_t(0);
        for (int64_t e = offset[r]; e < offset[r + 1]; ++e) {
          const int64_t a = source[e] >> 1;
          scale += (source[e] & 1) ? self_n[a] : self_p[a];
        }
        scale_row(xp + r * D, scale * row_scale(r), D, g);
        if (has_triplet(r)) {
          subtract_scaled_row(xp + pos[r] * D, w_p[r] * row_scale(pos[r]), D, g);
          subtract_scaled_row(xp + neg[r] * D, w_n[r] * row_scale(neg[r]), D, g);
        }
        for (int64_t e = offset[r]; e < offset[r + 1]; ++e) {
          const int64_t a = source[e] >> 1;
          subtract_scaled_row(xp + a * D, ((source[e] & 1) ? w_n[a] : w_p[a]) * row_scale(a), D, g);
        }
        if (np != nullptr) {  // g is d/dy_r: F.normalize's backward, g <- a g - b x_r
          scalar_t coef_g, coef_x;
          normalize_grad_coefficients(np[r], dot_product(g, xp + r * D, D), eps, coef_g, coef_x);
          axpby_row_inplace(coef_g, coef_x, xp + r * D, D, g);
        }
      }
    });
  });
  return grad;
}

// Fills the per-anchor coefficients of BatchHardGradCoefficients.
void batch_hard_coefficients_cpu(const BatchHardGradInputs& in, BatchHardGradCoefficients& out) {
  const int64_t B = in.positive.size(0);
  AT_DISPATCH_FLOATING_TYPES(in.dist_ap.scalar_type(), "metricops_batch_hard_backward_cpu", [&] {
    const auto* g = in.grad_losses.const_data_ptr<scalar_t>();
    const auto* g_ap = in.grad_dist_ap.const_data_ptr<scalar_t>();
    const auto* g_an = in.grad_dist_an.const_data_ptr<scalar_t>();
    const auto* pos = in.positive.const_data_ptr<int64_t>();
    const auto* neg = in.negative.const_data_ptr<int64_t>();
    const auto* dap = in.dist_ap.const_data_ptr<scalar_t>();
    const auto* dan = in.dist_an.const_data_ptr<scalar_t>();
    const auto* aux = in.aux.const_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(in.margin);
    auto* anchor_self = out.anchor_self.mutable_data_ptr<scalar_t>();
    auto* w_p = out.cross_positive.mutable_data_ptr<scalar_t>();
    auto* w_n = out.cross_negative.mutable_data_ptr<scalar_t>();
    auto* p_self = out.positive_self.mutable_data_ptr<scalar_t>();
    auto* n_self = out.negative_self.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        batch_hard_anchor_coefficients<scalar_t>(in.metric, B, a, pos[a], neg[a], g[a], g_ap[a], g_an[a], dap[a],
                                                 dan[a], aux, m, in.soft, anchor_self[a], w_p[a], w_n[a], p_self[a],
                                                 n_self[a]);
      }
    });
  });
}

at::Tensor batch_hard_triplet_backward_cpu(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                           const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                           const at::Tensor& positive, const at::Tensor& negative,
                                           const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                           c10::string_view metric_name, bool soft, bool normalize) {
  const Metric metric = check_batch_hard_backward_inputs(grad_losses, grad_dist_ap, grad_dist_an, embeddings, positive,
                                                         negative, dist_ap, dist_an, metric_name, /*may_sync=*/true);
  if (embeddings.size(0) == 0) return at::zeros_like(embeddings);
  const at::Tensor x = embeddings.contiguous();
  // normalize=True: the distances were those of y = F.normalize(x), y_k =
  // scale_k x_k; the norms are computed once and used twice (aux, assembly).
  const at::Tensor norm = normalize ? row_norms_cpu(x) : at::Tensor();
  const at::Tensor aux = normalize ? normalized_rows_cpu(norm, metric).aux : row_aux_cpu(x, metric);
  const BatchHardGradInputs in = batch_hard_grad_inputs(grad_losses, grad_dist_ap, grad_dist_an, positive, negative,
                                                        dist_ap, dist_an, aux, margin, metric, soft);
  BatchHardGradCoefficients c = empty_batch_hard_coefficients(x);
  batch_hard_coefficients_cpu(in, c);
  return batch_hard_assemble_cpu(x, in.positive, in.negative, c, norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("batch_hard_triplet", &batch_hard_triplet_cpu);
  m.impl("batch_hard_triplet_backward", &batch_hard_triplet_backward_cpu);
}

}  // namespace cpu
}  // namespace metricops
