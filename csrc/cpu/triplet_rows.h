// Per-anchor row helpers of the CPU triplet miners (cpu/triplet_miners.cpp,
// cpu/triplet_streaming.cpp): each anchor's row of distances is mined while it
// is hot in cache, with the shared math of common/triplet.h. Anchors with few
// positives scan their negatives once per positive (vectorised lanes, no
// sort); the others sort their negatives once and binary-search them.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/triplet.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {

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
    std::sort(pairs.begin(), pairs.end(),
              [](const auto& a, const auto& b) { return dist_index_less(a.first, a.second, b.first, b.second); });
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

// Per anchor: scanning its n negatives once per positive (P·n, vectorisable)
// beats sorting them (~n log n, branchy) when it has few positives.
inline bool few_positives(int64_t P, int64_t n) {
  int64_t log2n = 1;
  while ((int64_t(1) << log2n) < n) ++log2n;
  return P <= 2 * log2n;
}

// Lanes of the vectorised scans: lane l keeps the best of the elements
// k ≡ l (mod kLanes) seen so far; the lanes are merged at the end.
constexpr int64_t kLanes = 16;

// Semi-hard selection (TensorFlow-Addons rule) among an anchor's n > 0
// negative distances in index order: the position of the nearest negative
// farther than d_ap, else of the first NaN, else of the farthest negative
// (earliest position on ties), as common/triplet.h's semihard_position
// picks on the sorted distances. Vectorised (common/triplet.h's
// semihard_scan_step, which the CUDA scan path runs too): no sort, O(n) per positive.
template <typename scalar_t>
METRICOPS_SIMD_CLONES int64_t semihard_scan_lanes(const scalar_t* __restrict__ dist, int64_t n, scalar_t d_ap) {
  alignas(64) scalar_t near_d[kLanes], far_d[kLanes];
  alignas(64) int32_t near_k[kLanes], far_k[kLanes], nan_k[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) near_d[l] = far_d[l] = scalar_t(0), near_k[l] = far_k[l] = nan_k[l] = -1;
  int64_t base = 0;
  for (; base + kLanes <= n; base += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      semihard_scan_step<scalar_t, int32_t>(dist[base + l], static_cast<int32_t>(base + l), d_ap, near_d[l], near_k[l],
                                            far_d[l], far_k[l], nan_k[l]);
    }
  }
  for (int64_t l = 0; base + l < n; ++l) {
    semihard_scan_step<scalar_t, int32_t>(dist[base + l], static_cast<int32_t>(base + l), d_ap, near_d[l], near_k[l],
                                          far_d[l], far_k[l], nan_k[l]);
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
// and sets the term sum (NaN when a term is: batch_all_sum_is_nan), the number of valid
// triplets and the number of active (> 0) ones.
template <typename scalar_t>
void batch_all_row(const scalar_t* row, const int64_t* lab, int64_t B, int64_t i, scalar_t m,
                   BatchAllWorkspace<scalar_t>& ws, scalar_t* mult_row, double& sum_out, int64_t& valid_out,
                   int64_t& active_out) {
  ws.shifted.clear();
  ws.pos_index.clear();
  int64_t n = 0;
  bool any_nan = false, inf_negative = false;
  scalar_t max_shifted = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t p = 0; p < B; ++p) {
    if (lab[p] != lab[i]) {
      ++n;
      any_nan |= row[p] != row[p];
      inf_negative |= row[p] == std::numeric_limits<scalar_t>::infinity();
    } else if (p != i) {
      const scalar_t shifted = m + row[p];
      ws.shifted.push_back(shifted);
      ws.pos_index.push_back(p);
      any_nan |= row[p] != row[p];
      max_shifted = std::max(max_shifted, shifted);
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
  sum_out = batch_all_sum_is_nan(any_nan, max_shifted, inf_negative) ? std::numeric_limits<double>::quiet_NaN() : sum;
  valid_out = P * n;
  active_out = active;
}

// Per-anchor results of batch_all_row, totalled serially (deterministic for
// any thread count).
struct BatchAllRowResults {
  std::vector<double> sum;
  std::vector<int64_t> valid, active;
  explicit BatchAllRowResults(int64_t B) : sum(B, 0.0), valid(B, 0), active(B, 0) {}

  void fill_totals(at::Tensor& loss_sum, at::Tensor& num_valid, at::Tensor& num_active) const {
    double total = 0;
    int64_t v = 0, a = 0;
    for (size_t i = 0; i < sum.size(); ++i) total += sum[i], v += valid[i], a += active[i];
    loss_sum.fill_(total);
    num_valid.fill_(v);
    num_active.fill_(a);
  }
};

// batch_hard_triplet's CPU kernel (cpu/batch_hard.cpp), which mine_triplets
// calls for strategy "batch_hard".
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize);

}  // namespace cpu
}  // namespace metricops
