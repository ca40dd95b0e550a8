// CPU kernels for triplet mining and triplet losses on a labelled batch.
//
// Every op streams the self-distance matrix row by row (cpu/distance_rows.h:
// one BLAS GEMM per row block, a vectorised distance epilogue) and mines each
// anchor's row while it is hot in cache. Per-anchor selections use the shared
// math of common/triplet.h. Per-row partial results are reduced serially, so
// every op is deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cpu/distance_rows.h"

namespace metricops {
namespace cpu {
namespace {

template <typename scalar_t>
struct SortedNegatives {
  std::vector<std::pair<scalar_t, int64_t>> pairs;
  std::vector<scalar_t> dist;  // ascending, NaN last
  std::vector<int64_t> index;

  // The anchor's negatives sorted by (distance, index), NaN last.
  void build(const scalar_t* row, const int64_t* labels, int64_t B, int64_t anchor) {
    pairs.clear();
    for (int64_t j = 0; j < B; ++j) {
      if (labels[j] != labels[anchor]) pairs.emplace_back(row[j], j);
    }
    std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) {
      return dist_index_less(a.first, a.second, b.first, b.second);
    });
    dist.resize(pairs.size());
    index.resize(pairs.size());
    for (size_t k = 0; k < pairs.size(); ++k) {
      dist[k] = pairs[k].first;
      index[k] = pairs[k].second;
    }
  }
  int64_t size() const { return static_cast<int64_t>(dist.size()); }
  bool has_nan() const { return !dist.empty() && dist.back() != dist.back(); }
};

at::Tensor labels_int64(const at::Tensor& labels) { return labels.to(at::kLong).contiguous(); }

// Per anchor: scanning its n negatives once per positive (P·n, vectorisable)
// beats sorting them (~n log n, branchy) when it has few positives.
bool few_positives(int64_t P, int64_t n) {
  int64_t log2n = 1;
  while ((int64_t(1) << log2n) < n) ++log2n;
  return P <= 2 * log2n;
}

template <typename scalar_t>
inline int32_t lane_mask(bool b) {
  return select_mask<int32_t>(b);
}

// Lanes of the vectorised scans: lane l keeps the best of the elements
// k ≡ l (mod kLanes) seen so far; the lanes are merged at the end.
constexpr int64_t kLanes = 16;

// One element of the semi-hard lane scan (see semihard_scan_lanes): the
// shared step of common/triplet.h, which the CUDA scan path runs too.
template <typename scalar_t>
inline void semihard_lane_step(scalar_t d, int32_t k, scalar_t d_ap, scalar_t& near_d, int32_t& near_k,
                               scalar_t& far_d, int32_t& far_k, int32_t& nan_k) {
  semihard_scan_step<scalar_t, int32_t>(d, k, d_ap, near_d, near_k, far_d, far_k, nan_k);
}

// Semi-hard selection (TensorFlow-Addons rule) among an anchor's n > 0
// negative distances in index order: the position of the nearest negative
// farther than d_ap, else of the first NaN, else of the farthest negative
// (earliest position on ties), as common/triplet.h's semihard_position
// picks on the sorted distances. Vectorised: no sort, O(n) per positive.
template <typename scalar_t>
METRICOPS_SIMD_CLONES int64_t semihard_scan_lanes(const scalar_t* __restrict__ dist, int64_t n, scalar_t d_ap) {
  alignas(64) scalar_t near_d[kLanes], far_d[kLanes];
  alignas(64) int32_t near_k[kLanes], far_k[kLanes], nan_k[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) near_d[l] = far_d[l] = scalar_t(0), near_k[l] = far_k[l] = nan_k[l] = -1;
  int64_t base = 0;
  for (; base + kLanes <= n; base += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      semihard_lane_step(dist[base + l], static_cast<int32_t>(base + l), d_ap, near_d[l], near_k[l], far_d[l],
                         far_k[l], nan_k[l]);
    }
  }
  for (int64_t l = 0; base + l < n; ++l) {
    semihard_lane_step(dist[base + l], static_cast<int32_t>(base + l), d_ap, near_d[l], near_k[l], far_d[l], far_k[l],
                       nan_k[l]);
  }
  int32_t nearest = -1, farthest = -1, first_nan = -1;
  scalar_t d_nearest = 0, d_farthest = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    if (near_k[l] >= 0 && (nearest < 0 || near_d[l] < d_nearest || (near_d[l] == d_nearest && near_k[l] < nearest))) {
      nearest = near_k[l], d_nearest = near_d[l];
    }
    if (far_k[l] >= 0 && (farthest < 0 || far_d[l] > d_farthest || (far_d[l] == d_farthest && far_k[l] < farthest))) {
      farthest = far_k[l], d_farthest = far_d[l];
    }
    if (nan_k[l] >= 0 && (first_nan < 0 || nan_k[l] < first_nan)) first_nan = nan_k[l];
  }
  return semihard_scan_pick<int32_t>(nearest, first_nan, farthest);
}

// Semi-hard selection for anchor i (TensorFlow-Addons rule): calls
// emit(p, n_star, term) for each of its positives when it has a negative.
// The term is NaN when any of the anchor's negative distances is NaN.
template <typename scalar_t, typename Emit>
void semihard_row(const scalar_t* row, const int64_t* lab, int64_t B, int64_t i, scalar_t m,
                  SortedNegatives<scalar_t>& negs, const Emit& emit) {
  const int64_t li = lab[i];
  int64_t P = 0, n = 0;
  bool any_nan = false;
  for (int64_t j = 0; j < B; ++j) {
    if (lab[j] == li) {
      P += j != i;
    } else {
      ++n;
      any_nan |= row[j] != row[j];
    }
  }
  if (n == 0 || P == 0) return;
  const scalar_t poison = any_nan ? std::numeric_limits<scalar_t>::quiet_NaN() : scalar_t(0);
  if (few_positives(P, n)) {
    negs.dist.clear();
    negs.index.clear();
    for (int64_t j = 0; j < B; ++j) {
      if (lab[j] != li) negs.dist.push_back(row[j]), negs.index.push_back(j);
    }
    for (int64_t p = 0; p < B; ++p) {
      if (p == i || lab[p] != li) continue;
      const int64_t k = semihard_scan_lanes(negs.dist.data(), n, row[p]);
      emit(p, negs.index[k], triplet_term<scalar_t>(row[p], negs.dist[k], m, false) + poison);
    }
    return;
  }
  negs.build(row, lab, B, i);
  for (int64_t p = 0; p < B; ++p) {
    if (p == i || lab[p] != li) continue;
    const int64_t k = semihard_position(negs.dist.data(), n, row[p]);
    emit(p, negs.index[k], triplet_term<scalar_t>(row[p], negs.dist[k], m, false) + poison);
  }
}

// Batch-all terms of one anchor by direct scan: for each negative, the
// positives it is active with. Writes multiplicities; returns (sum, active).
template <typename scalar_t>
METRICOPS_SIMD_CLONES void batch_all_scan_row(const scalar_t* row, const int64_t* lab, int64_t B, int64_t i,
                                              const scalar_t* shifted, const int64_t* pos_index, int64_t P,
                                              scalar_t* mult_row, double& sum, int64_t& active) {
  double s = 0;
  int64_t act = 0;
  const int64_t li = lab[i];
  for (int64_t j = 0; j < B; ++j) {
    if (lab[j] == li) continue;
    const scalar_t d_an = row[j];
    int64_t cnt = 0;
    for (int64_t q = 0; q < P; ++q) {
      scalar_t t;
      if (batch_all_term(shifted[q], d_an, t)) {
        s += static_cast<double>(t);
        ++cnt;
        mult_row[pos_index[q]] += scalar_t(1);
      }
    }
    mult_row[j] = -static_cast<scalar_t>(cnt);
    act += cnt;
  }
  sum = s;
  active = act;
}

template <typename scalar_t>
struct BatchAllWorkspace {
  SortedNegatives<scalar_t> negs;
  std::vector<double> prefix;     // prefix sums of the sorted negative distances
  std::vector<scalar_t> shifted;  // margin + d_ap over the positives (ascending on the sort path)
  std::vector<int64_t> pos_index;
  std::vector<scalar_t> scratch;  // a multiplicity row nobody keeps
};

// Batch-all terms of anchor i. Writes each pair's signed multiplicity in
// active triplets (d(sum)/d(d[i, j])) into mult_row, which must hold zeros,
// and sets the term sum (NaN when a distance is NaN), the number of valid
// triplets and the number of active (> 0) ones.
template <typename scalar_t>
void batch_all_row(const scalar_t* row, const int64_t* lab, int64_t B, int64_t i, scalar_t m,
                   BatchAllWorkspace<scalar_t>& ws, scalar_t* mult_row, double& sum_out, int64_t& valid_out,
                   int64_t& active_out) {
  ws.shifted.clear();
  ws.pos_index.clear();
  int64_t n = 0;
  bool any_nan = false;
  for (int64_t p = 0; p < B; ++p) {
    if (lab[p] != lab[i]) {
      ++n;
      any_nan |= row[p] != row[p];
    } else if (p != i) {
      ws.shifted.push_back(m + row[p]);
      ws.pos_index.push_back(p);
      any_nan |= row[p] != row[p];
    }
  }
  const int64_t P = static_cast<int64_t>(ws.shifted.size());
  sum_out = 0;
  valid_out = 0;
  active_out = 0;
  if (n == 0 || P == 0) return;
  double sum = 0;
  int64_t active = 0;
  if (few_positives(P, n)) {
    batch_all_scan_row<scalar_t>(row, lab, B, i, ws.shifted.data(), ws.pos_index.data(), P, mult_row, sum, active);
  } else {
    ws.negs.build(row, lab, B, i);
    ws.prefix.assign(n + 1, 0.0);
    for (int64_t k = 0; k < n; ++k) ws.prefix[k + 1] = ws.prefix[k] + static_cast<double>(ws.negs.dist[k]);
    // Positives: each is active with the negatives nearer than margin + d_ap.
    for (int64_t q = 0; q < P; ++q) {
      const scalar_t d_ap = row[ws.pos_index[q]];
      const int64_t cnt = count_active_negatives(ws.negs.dist.data(), n, d_ap, m);
      sum += static_cast<double>(cnt) * static_cast<double>(m + d_ap) - ws.prefix[cnt];
      active += cnt;
      mult_row[ws.pos_index[q]] = static_cast<scalar_t>(cnt);
    }
    // Negatives: each is active with the positives whose margin + d_ap exceeds it.
    std::sort(ws.shifted.begin(), ws.shifted.end(), [](scalar_t a, scalar_t b) { return dist_index_less(a, 0, b, 0); });
    const int64_t nan_shifted = P - partition_point(ws.shifted.data(), P, [](scalar_t s) { return s != s; });
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t d_an = ws.negs.dist[k];
      const int64_t first =
          partition_point(ws.shifted.data(), P, [d_an](scalar_t s) { return s - d_an > scalar_t(0) || s != s; });
      mult_row[ws.negs.index[k]] = -static_cast<scalar_t>(P - first - nan_shifted);
    }
  }
  sum_out = any_nan ? std::numeric_limits<double>::quiet_NaN() : sum;
  valid_out = P * n;
  active_out = active;
}

// ---------------------------------------------------------------- batch-hard

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
  const int32_t same = lane_mask<scalar_t>(cj == ci);
  const int32_t k_nan = lane_mask<scalar_t>(k != k);
  const int32_t take_p = same & lane_mask<scalar_t>(j != i) &
                         ((index_p >> 31) | lane_mask<scalar_t>(k > key_p) | (k_nan & lane_mask<scalar_t>(key_p == key_p)));
  const int32_t take_n =
      ~same & ((index_n >> 31) | lane_mask<scalar_t>(k < key_n) | (k_nan & lane_mask<scalar_t>(key_n == key_n)));
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

// Merges candidate (k, j) into (best_k, best_j) for a farthest (kMax) or
// nearest search where the candidates may come in any index order: NaN wins,
// equal keys go to the lower index, -1 is "none".
template <typename scalar_t, bool kMax>
inline void merge_candidate(scalar_t k, int32_t j, scalar_t& best_k, int32_t& best_j) {
  if (j < 0) return;
  if (best_j < 0) {
    best_k = k, best_j = j;
    return;
  }
  const bool better = kMax ? farther(k, best_k) : nearer(k, best_k);
  const bool worse = kMax ? farther(best_k, k) : nearer(best_k, k);
  if (better || (!worse && j < best_j)) best_k = k, best_j = j;
}

// Row side: anchor i scans its Gram row over columns [j0, j1) (dot[j]) and
// merges the result into its running selection, which holds columns < j0.
template <typename scalar_t, Metric kMetric>
inline void batch_hard_row_scan(const scalar_t* dot, const scalar_t* ap, const int32_t* cls, int64_t i, int64_t j0,
                                int64_t j1, BatchHardSelections<scalar_t>& sel) {
  alignas(64) scalar_t key_p[kLanes], key_n[kLanes];
  alignas(64) int32_t index_p[kLanes], index_n[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) key_p[l] = key_n[l] = scalar_t(0), index_p[l] = index_n[l] = -1;
  batch_hard_row_lanes<scalar_t, kMetric>(dot, ap, cls, ap[i], cls[i], static_cast<int32_t>(i), j0, j1, key_p,
                                          index_p, key_n, index_n);
  for (int64_t l = 0; l < kLanes; ++l) {
    merge_candidate<scalar_t, true>(key_p[l], index_p[l], sel.key_p[i], sel.index_p[i]);
    merge_candidate<scalar_t, false>(key_n[l], index_n[l], sel.key_n[i], sel.index_n[i]);
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
    const int32_t same = lane_mask<scalar_t>(cls[j] == ci);
    const int32_t k_nan = lane_mask<scalar_t>(k != k);
    const int32_t take_p = same & ((ip >> 31) | lane_mask<scalar_t>(k > kp) | (k_nan & lane_mask<scalar_t>(kp == kp)));
    const int32_t take_n = ~same & ((in >> 31) | lane_mask<scalar_t>(k < kn) | (k_nan & lane_mask<scalar_t>(kn == kn)));
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
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor norm = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_row_norms_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* np = norm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) np[i] = std::sqrt(squared_norm(xp + i * D, D));
    });
  });
  return norm;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
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
  const int64_t block = std::min(B, block_rows > 0 ? std::min(block_rows, kBatchHardBlockRows) : kBatchHardBlockRows);
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

struct CpuPairKernels {
  static bool may_sync() { return true; }

  static at::Tensor row_norms(const at::Tensor& x) { return row_norms_cpu(x); }

  static at::Tensor row_aux(const at::Tensor& x, Metric metric, const at::Tensor& norm) {
    return norm.defined() ? normalized_rows_cpu(norm, metric).aux : row_aux_cpu(x, metric);
  }

  // Each output row is written once, by one task: grad[r] gathers its own
  // anchor terms and the terms of the anchors that chose r as their positive
  // or negative, listed per row in anchor order (a counting sort). Parallel
  // over rows, deterministic, and about half the memory traffic of an anchor
  // pass followed by a scatter pass.
  // norm defined (normalize=True): the coefficients are y's (y_k =
  // scale_k x_k); each row's gradient in y is then taken through
  // F.normalize's backward in place.
  static at::Tensor batch_hard_assemble(const at::Tensor& x, const at::Tensor& positive, const at::Tensor& negative,
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
  static void batch_hard_coefficients(const BatchHardGradInputs& in, BatchHardGradCoefficients& out) {
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
};

at::Tensor batch_hard_triplet_backward_cpu(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                           const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                           const at::Tensor& positive, const at::Tensor& negative,
                                           const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                           c10::string_view metric, bool soft, bool normalize) {
  return batch_hard_triplet_backward_impl<CpuPairKernels>(grad_losses, grad_dist_ap, grad_dist_an, embeddings,
                                                          positive, negative, dist_ap, dist_an, margin, metric, soft,
                                                          normalize);
}

// ---------------------------------------------------------------- semi-hard

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_cpu(const at::Tensor& embeddings,
                                                                    const at::Tensor& labels_in, double margin,
                                                                    c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor losses = at::zeros({B, B}, x.options());
  at::Tensor negative = at::full({B, B}, -1, labels.options());
  at::Tensor dist = at::empty({B, B}, x.options());
  if (B == 0) return {losses, negative, dist};
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* lp = losses.mutable_data_ptr<scalar_t>();
    int64_t* np = negative.mutable_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      // One sort buffer per thread, reused across its rows.
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t i, const scalar_t* row) {
        semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], [&](int64_t p, int64_t n, scalar_t term) {
          np[i * B + p] = n;
          lp[i * B + p] = term;
        });
      });
    });
  });
  return {losses, negative, dist};
}

at::Tensor semihard_triplet_backward_cpu(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_dist,
                                         const at::Tensor& embeddings, const at::Tensor& losses_in,
                                         const at::Tensor& negative_in, const at::Tensor& dist,
                                         c10::string_view metric) {
  check_semihard_backward_inputs(grad_losses, grad_dist, embeddings, losses_in, negative_in, dist, /*may_sync=*/true);
  const int64_t B = embeddings.size(0);
  at::Tensor coef = grad_dist.has_value() ? grad_dist->to(embeddings.scalar_type()).contiguous().clone()
                                          : at::zeros({B, B}, embeddings.options());
  const at::Tensor g = grad_losses.to(embeddings.scalar_type()).contiguous();
  const at::Tensor losses = losses_in.contiguous();
  const at::Tensor negative = negative_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "metricops_semihard_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* lp = losses.const_data_ptr<scalar_t>();
    const int64_t* np = negative.const_data_ptr<int64_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) semihard_coefficients_row<scalar_t>(a, B, gp, lp, np, cp);
    });
  });
  return self_distance_backward(coef, embeddings, dist, metric);
}

// ---------------------------------------------------------------- batch-all

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor dist = at::empty({B, B}, x.options());
  at::Tensor multiplicity = at::zeros({B, B}, x.options());
  at::Tensor loss_sum = at::zeros({}, x.options());
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B == 0) return {loss_sum, num_valid, num_active, dist, multiplicity};
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<double> row_sum(B, 0.0);
  std::vector<int64_t> row_valid(B, 0), row_active(B, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* mp = multiplicity.mutable_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t i, const scalar_t* row) {
        batch_all_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], mp + i * B, row_sum[i],
                                row_valid[i], row_active[i]);
      });
    });
    double total = 0;
    int64_t valid = 0, active = 0;
    for (int64_t i = 0; i < B; ++i) total += row_sum[i], valid += row_valid[i], active += row_active[i];
    loss_sum.fill_(total);
    num_valid.fill_(valid);
    num_active.fill_(active);
  });
  return {loss_sum, num_valid, num_active, dist, multiplicity};
}

// ---------------------------------------------------------------- streaming
//
// Semi-hard and batch-all without the B×B matrix: the forward mines each
// row block of distances as it is computed and keeps per-anchor sums; the
// backward recomputes each block, mines it again (same GEMM shapes, same
// selections) and applies its coefficients with pairwise_distance_backward
// of the block's rows. Extra memory O(block_rows * B + B * D).

// The streaming backwards' common loop: for each row block of distances,
// fill_row(i, row, coef_row) writes d(loss)/d(d[i, :]) for anchor i into a
// zeroed row, and the block goes through pairwise_distance_backward.
template <typename scalar_t, Metric kMetric, typename FillRow>
at::Tensor streaming_distance_backward(const at::Tensor& x, const at::Tensor& aux, int64_t block_rows,
                                       c10::string_view metric, const FillRow& fill_row) {
  const int64_t B = x.size(0);
  at::Tensor grad = at::zeros_like(x);
  for_each_distance_block<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t r0, at::Tensor& block) {
    const int64_t rows = block.size(0);
    at::Tensor coef = at::zeros({rows, B}, x.options());
    const scalar_t* bp = block.const_data_ptr<scalar_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fill_row(r0 + r, bp + r * B, cp + r * B);
    });
    accumulate_distance_rows_backward(coef, x, block, r0, metric, grad);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_streaming_cpu(const at::Tensor& embeddings,
                                                                              const at::Tensor& labels_in,
                                                                              double margin,
                                                                              c10::string_view metric_name,
                                                                              int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor row_sum = at::zeros({B}, x.options());
  at::Tensor row_valid = at::zeros({B}, labels.options());
  at::Tensor row_active = at::zeros({B}, labels.options());
  if (B == 0) return {row_sum, row_valid, row_active};
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_streaming_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* sp = row_sum.mutable_data_ptr<scalar_t>();
    int64_t* vp = row_valid.mutable_data_ptr<int64_t>();
    int64_t* ap = row_active.mutable_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t i, const scalar_t* row) {
        double sum = 0;  // in p order, as the matrix path's sum visits row i
        int64_t valid = 0, active = 0;
        semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], [&](int64_t, int64_t, scalar_t term) {
          sum += static_cast<double>(term);
          ++valid;
          active += term > scalar_t(0);
        });
        sp[i] = static_cast<scalar_t>(sum);
        vp[i] = valid;
        ap[i] = active;
      });
    });
  });
  return {row_sum, row_valid, row_active};
}

at::Tensor semihard_triplet_streaming_backward_cpu(const at::Tensor& grad_row_sum, const at::Tensor& embeddings,
                                                   const at::Tensor& labels_in, double margin,
                                                   c10::string_view metric_name, int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  const int64_t B = embeddings.size(0);
  check_streaming_backward_inputs("semihard_triplet_streaming_backward", grad_row_sum, {B}, embeddings, labels_in,
                                  margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  at::Tensor grad = at::zeros_like(x);
  if (B == 0) return grad;
  const at::Tensor g = grad_row_sum.to(x.scalar_type()).contiguous();
  const at::Tensor aux = row_aux_cpu(x, metric);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_semihard_streaming_backward_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      grad = streaming_distance_backward<scalar_t, kMetric>(
          x, aux, block_rows, metric_name, [&](int64_t i, const scalar_t* row, scalar_t* coef) {
            semihard_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()],
                                   [&](int64_t p, int64_t n, scalar_t term) {
                                     if (!semihard_term_has_gradient(n, term)) return;
                                     coef[p] += gp[i];
                                     coef[n] -= gp[i];
                                   });
          });
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_streaming_cpu(const at::Tensor& embeddings,
                                                                               const at::Tensor& labels_in,
                                                                               double margin,
                                                                               c10::string_view metric_name,
                                                                               int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor loss_sum = at::zeros({}, x.options());
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B == 0) return {loss_sum, num_valid, num_active};
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<double> row_sum(B, 0.0);
  std::vector<int64_t> row_valid(B, 0), row_active(B, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_streaming_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, block_rows, nullptr, [&](int64_t i, const scalar_t* row) {
        BatchAllWorkspace<scalar_t>& ws = buffers[at::get_thread_num()];
        ws.scratch.assign(B, scalar_t(0));
        batch_all_row<scalar_t>(row, lab, B, i, m, ws, ws.scratch.data(), row_sum[i], row_valid[i], row_active[i]);
      });
    });
  });
  double total = 0;
  int64_t valid = 0, active = 0;
  for (int64_t i = 0; i < B; ++i) total += row_sum[i], valid += row_valid[i], active += row_active[i];
  loss_sum.fill_(total);
  num_valid.fill_(valid);
  num_active.fill_(active);
  return {loss_sum, num_valid, num_active};
}

at::Tensor batch_all_triplet_streaming_backward_cpu(const at::Tensor& grad_sum, const at::Tensor& embeddings,
                                                    const at::Tensor& labels_in, double margin,
                                                    c10::string_view metric_name, int64_t block_rows) {
  const Metric metric = parse_metric(metric_name);
  check_streaming_backward_inputs("batch_all_triplet_streaming_backward", grad_sum, {}, embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor grad = at::zeros_like(x);
  if (B == 0) return grad;
  const at::Tensor aux = row_aux_cpu(x, metric);
  // The multiplicities are built for a unit upstream gradient; scaling the
  // result by grad_sum (0-dim, on the device) keeps the host out of it.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_batch_all_streaming_backward_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<BatchAllWorkspace<scalar_t>> buffers(at::get_num_threads());
      grad = streaming_distance_backward<scalar_t, kMetric>(
          x, aux, block_rows, metric_name, [&](int64_t i, const scalar_t* row, scalar_t* coef) {
            double sum;
            int64_t valid, active;
            batch_all_row<scalar_t>(row, lab, B, i, m, buffers[at::get_thread_num()], coef, sum, valid, active);
          });
    });
  });
  return grad.mul_(grad_sum.to(x.scalar_type()));
}

// ---------------------------------------------------------------- statistics

at::Tensor triplet_statistics_cpu(const at::Tensor& embeddings, const at::Tensor& labels_in, double margin,
                                  c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  at::Tensor counts = at::zeros({4}, labels.options());  // total, easy, semihard, hard
  if (B == 0) return counts;
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<int64_t> row_counts(4 * B, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_triplet_statistics_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      std::vector<SortedNegatives<scalar_t>> buffers(at::get_num_threads());
      for_each_distance_row<scalar_t, kMetric>(x, aux, 1024, nullptr, [&](int64_t i, const scalar_t* row) {
        SortedNegatives<scalar_t>& negs = buffers[at::get_thread_num()];
        int64_t* c = row_counts.data() + 4 * i;
        int64_t P = 0, n = 0;
        for (int64_t j = 0; j < B; ++j) {
          if (lab[j] != lab[i]) {
            ++n;
          } else {
            P += j != i;
          }
        }
        if (n == 0 || P == 0) return;
        if (few_positives(P, n)) {  // one pass over the negatives per positive, no sort
          negs.dist.clear();
          for (int64_t j = 0; j < B; ++j) {
            if (lab[j] != lab[i]) negs.dist.push_back(row[j]);
          }
          for (int64_t p = 0; p < B; ++p) {
            if (p == i || lab[p] != lab[i]) continue;
            int64_t easy = 0, semihard = 0, hard = 0;
            for (int64_t k = 0; k < n; ++k) classify_negative(negs.dist[k], row[p], m, easy, semihard, hard);
            c[0] += n, c[1] += easy, c[2] += semihard, c[3] += hard;
          }
          return;
        }
        negs.build(row, lab, B, i);
        for (int64_t p = 0; p < B; ++p) {
          if (p == i || lab[p] != lab[i]) continue;
          int64_t easy, semihard, hard;
          classify_negatives(negs.dist.data(), n, row[p], m, easy, semihard, hard);
          c[0] += n, c[1] += easy, c[2] += semihard, c[3] += hard;
        }
      });
    });
  });
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    for (int k = 0; k < 4; ++k) cp[k] += row_counts[4 * i + k];
  }
  return counts;
}

// ---------------------------------------------------------------- miner

std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cpu(const at::Tensor& embeddings,
                                                                 const at::Tensor& labels_in,
                                                                 c10::string_view strategy_name, double margin,
                                                                 c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  const MiningStrategy strategy = parse_strategy(strategy_name);
  check_triplet_inputs(embeddings, labels_in, margin);
  const at::Tensor x = embeddings.contiguous();
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t B = x.size(0);
  auto empty_index = [&](int64_t n) { return at::empty({n}, labels.options()); };
  if (strategy == MiningStrategy::BatchHard) {
    auto [losses, positive, negative, d_ap, d_an] = batch_hard_triplet_cpu(embeddings, labels_in, margin, metric_name,
                                                                           false, 0, false);
    const int64_t* pp = positive.const_data_ptr<int64_t>();
    std::vector<int64_t> anchors;
    for (int64_t a = 0; a < B; ++a) {
      if (pp[a] >= 0) anchors.push_back(a);
    }
    const int64_t n = static_cast<int64_t>(anchors.size());
    at::Tensor a_out = empty_index(n), p_out = empty_index(n), n_out = empty_index(n);
    const int64_t* np = negative.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < n; ++k) {
      a_out.mutable_data_ptr<int64_t>()[k] = anchors[k];
      p_out.mutable_data_ptr<int64_t>()[k] = pp[anchors[k]];
      n_out.mutable_data_ptr<int64_t>()[k] = np[anchors[k]];
    }
    return {a_out, p_out, n_out};
  }
  if (B == 0) return {empty_index(0), empty_index(0), empty_index(0)};
  at::Tensor dist = at::empty({B, B}, x.options());
  const at::Tensor aux = row_aux_cpu(x, metric);
  std::vector<int64_t> per_anchor(B + 1, 0);
  at::Tensor a_out, p_out, n_out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_mine_triplets_cpu", [&] {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    // Visits the selected (p, n) of anchor a in lexicographic order.
    auto visit = [&](int64_t a, const scalar_t* row, auto&& emit) {
      for (int64_t p = 0; p < B; ++p) {
        if (p == a || lab[p] != lab[a]) continue;
        for (int64_t n = 0; n < B; ++n) {
          if (lab[n] != lab[a] && strategy_selects<scalar_t>(strategy, row[n] - row[p], m)) emit(p, n);
        }
      }
    };
    METRICOPS_DISPATCH_METRIC(metric, kMetric, [&] {
      for_each_distance_row<scalar_t, kMetric>(x, aux, 0, &dist, [&](int64_t a, const scalar_t* row) {
        int64_t count = 0;
        visit(a, row, [&](int64_t, int64_t) { ++count; });
        per_anchor[a + 1] = count;
      });
    });
    std::partial_sum(per_anchor.begin(), per_anchor.end(), per_anchor.begin());
    const int64_t total = per_anchor[B];
    a_out = empty_index(total), p_out = empty_index(total), n_out = empty_index(total);
    int64_t* ap = a_out.mutable_data_ptr<int64_t>();
    int64_t* pp = p_out.mutable_data_ptr<int64_t>();
    int64_t* np = n_out.mutable_data_ptr<int64_t>();
    const scalar_t* dp = dist.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        int64_t k = per_anchor[a];
        visit(a, dp + a * B, [&](int64_t p, int64_t n) { ap[k] = a, pp[k] = p, np[k] = n, ++k; });
      }
    });
  });
  return {a_out, p_out, n_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) {
  m.impl("batch_hard_triplet", &batch_hard_triplet_cpu);
  m.impl("batch_hard_triplet_backward", &batch_hard_triplet_backward_cpu);
  m.impl("semihard_triplet", &semihard_triplet_cpu);
  m.impl("semihard_triplet_backward", &semihard_triplet_backward_cpu);
  m.impl("batch_all_triplet", &batch_all_triplet_cpu);
  m.impl("semihard_triplet_streaming", &semihard_triplet_streaming_cpu);
  m.impl("semihard_triplet_streaming_backward", &semihard_triplet_streaming_backward_cpu);
  m.impl("batch_all_triplet_streaming", &batch_all_triplet_streaming_cpu);
  m.impl("batch_all_triplet_streaming_backward", &batch_all_triplet_streaming_backward_cpu);
  m.impl("triplet_statistics", &triplet_statistics_cpu);
  m.impl("mine_triplets", &mine_triplets_cpu);
}

}  // namespace cpu
}  // namespace metricops
