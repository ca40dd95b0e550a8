// Per-element triplet math shared by the CPU and CUDA kernels: the terms,
// NaN-aware selections, the per-anchor selections (batch-hard, semi-hard,
// counts, mining strategies) and the per-anchor backward coefficients.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/distance.h"
#include "common/hinge.h"

namespace metricops {

// torch.nn.functional.softplus with beta=1, threshold=20.
template <typename T>
C10_HOST_DEVICE inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
C10_HOST_DEVICE inline T softplus_grad(T x) {
  return x > T(20) ? T(1) : T(1) / (T(1) + std::exp(-x));
}

// The batch-hard / semi-hard term from the anchor-positive and
// anchor-negative distances: clamp_min(margin + d_ap - d_an, 0) (common/hinge.h's
// clamp_min_hinge: NaN stays NaN, slope 0 at the kink, as autograd takes it),
// or softplus(d_ap - d_an).
template <typename T>
C10_HOST_DEVICE inline T triplet_term(T d_ap, T d_an, T margin, bool soft) {
  return soft ? softplus(d_ap - d_an) : clamp_min_hinge_value((margin + d_ap) - d_an);
}

// d(term)/d(d_ap); d(term)/d(d_an) is its negation.
template <typename T>
C10_HOST_DEVICE inline T triplet_term_grad(T d_ap, T d_an, T margin, bool soft) {
  return soft ? softplus_grad(d_ap - d_an) : clamp_min_hinge_slope((margin + d_ap) - d_an);
}

// Batch-hard result of one anchor from its selected distance keys
// (distance_key: the squared distance for "euclidean"). Both devices select
// on keys and take the sqrt for the winners only, so two squared distances
// that round to the same root still pick the same row on CPU and CUDA.
template <typename T>
C10_HOST_DEVICE inline void batch_hard_from_keys(Metric metric, T key_p, T key_n, T margin, bool soft, T& d_ap, T& d_an,
                                                 T& loss) {
  d_ap = key_to_distance<T>(metric, key_p);
  d_an = key_to_distance<T>(metric, key_n);
  loss = triplet_term<T>(d_ap, d_an, margin, soft);
}

// Running selections that let NaN win, so a NaN embedding gives a NaN loss
// through a valid index instead of being skipped by false comparisons.
template <typename T>
C10_HOST_DEVICE inline bool farther(T d, T best) {
  return d > best || (d != d && best == best);
}
template <typename T>
C10_HOST_DEVICE inline bool nearer(T d, T best) {
  return d < best || (d != d && best == best);
}

// Merges candidate (d, i) into the running (best_d, best_i) of a farthest
// (kMax) or nearest search whose candidates come in any index order: NaN
// wins, equal distances go to the lower index, an index < 0 is "none".
template <typename T, typename I, bool kMax>
C10_HOST_DEVICE inline void merge_candidate(T d, I i, T& best_d, I& best_i) {
  if (i < 0) return;
  if (best_i < 0) {
    best_d = d, best_i = i;
    return;
  }
  const bool better = kMax ? farther(d, best_d) : nearer(d, best_d);
  const bool worse = kMax ? farther(best_d, d) : nearer(best_d, d);
  if (better || (!worse && i < best_i)) best_d = d, best_i = i;
}

// ------------------------------------------------------------ sort-free scans
// Per (anchor, positive) selections made by streaming the anchor's negatives
// once in index order, with no sort: the CPU's path for anchors with few
// positives (a vectorised lane per group of negatives) and the CUDA scan
// path (a warp per anchor, one positive per lane). Each gives what the
// sorted forms below give (semihard_position, count_active_negatives,
// classify_negatives).

// All ones for true, 0 for false, in the index type: branch-free selections
// that compilers vectorise.
template <typename I>
C10_HOST_DEVICE inline I select_mask(bool b) {
  return -static_cast<I>(b);
}

// All ones while index k is unset (< 0).
template <typename I>
C10_HOST_DEVICE inline I unset_mask(I k) {
  return k >> (sizeof(I) * 8 - 1);
}

// One negative (distance d, position or index k, seen in increasing k) of a
// semi-hard scan for positive distance d_ap. State: the nearest negative
// farther than d_ap, the farthest negative and the first NaN (k = -1: none
// yet); strict comparisons keep the earliest k on ties.
template <typename T, typename I>
C10_HOST_DEVICE inline void semihard_scan_step(T d, I k, T d_ap, T& near_d, I& near_k, T& far_d, I& far_k, I& nan_k) {
  const I is_nan = select_mask<I>(d != d);
  const I take_near = ~is_nan & select_mask<I>(d > d_ap) & (unset_mask(near_k) | select_mask<I>(d < near_d));
  const I take_far = ~is_nan & (unset_mask(far_k) | select_mask<I>(d > far_d));
  const I take_nan = is_nan & unset_mask(nan_k);
  near_d = take_near ? d : near_d;
  near_k = take_near ? k : near_k;
  far_d = take_far ? d : far_d;
  far_k = take_far ? k : far_k;
  nan_k = take_nan ? k : nan_k;
}

// The semi-hard choice of a finished scan (TensorFlow-Addons rule, as
// semihard_position picks on sorted distances, NaN last): the nearest
// negative farther than d_ap, else the first NaN, else the farthest.
template <typename I>
C10_HOST_DEVICE inline I semihard_scan_pick(I near_k, I nan_k, I far_k) {
  return near_k >= 0 ? near_k : (nan_k >= 0 ? nan_k : far_k);
}

// Batch-all term of one (positive, negative) pair from shifted = margin +
// d_ap: relu(shifted - d_an), active when > 0 (NaN is never active, as
// count_active_negatives counts).
template <typename T>
C10_HOST_DEVICE inline bool batch_all_term(T shifted, T d_an, T& term) {
  term = shifted - d_an;
  return term > T(0);
}

// Whether an anchor's batch-all term sum is NaN. The kernels count and sum
// only active terms, so a NaN term must be found from the row instead: a NaN
// distance, or a pair with margin + d_ap = d_an = +inf (inf - inf; relu keeps
// the NaN, as F.triplet_margin_loss does). max_shifted: the largest
// margin + d_ap over the positives; rounding is monotone, so that is +inf
// exactly when some positive's is.
template <typename T>
C10_HOST_DEVICE inline bool batch_all_sum_is_nan(bool nan_distance, T max_shifted, bool inf_negative) {
  return nan_distance || (inf_negative && max_shifted == std::numeric_limits<T>::infinity());
}

// triplet_statistics' class of one negative for one (anchor, positive), as
// classify_negatives counts on sorted distances: m = d_an - d_ap; easy:
// m > margin, hard: m <= 0, semihard: 0 < m <= margin; NaN in no class.
template <typename T>
C10_HOST_DEVICE inline void classify_negative(T d_an, T d_ap, T margin, int64_t& easy, int64_t& semihard,
                                              int64_t& hard) {
  const T m = d_an - d_ap;
  easy += m > margin;
  hard += m <= T(0);
  semihard += (m > T(0)) & (m <= margin);
}

// First position in [0, n) where pred(sorted[k]) is true, for a predicate
// that is false then true along `sorted`.
template <typename T, typename Pred>
C10_HOST_DEVICE inline int64_t partition_point(const T* sorted, int64_t n, Pred pred) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(sorted[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Semi-hard negative (TensorFlow-Addons rule) among an anchor's negative
// distances sorted ascending (NaN last): the nearest negative farther than
// d_ap; if there is none, the farthest negative. Returns a position in [0, n).
template <typename T>
C10_HOST_DEVICE inline int64_t semihard_position(const T* sorted_neg, int64_t n, T d_ap) {
  const int64_t k = partition_point(sorted_neg, n, [d_ap](T v) { return v > d_ap || v != v; });
  if (k < n) return k;
  // No candidate (so no NaN either): the farthest negative, lowest index on ties.
  const T farthest = sorted_neg[n - 1];
  return partition_point(sorted_neg, n, [farthest](T v) { return v >= farthest; });
}

// Number of negatives (sorted ascending, NaN last) whose hinge
// relu(margin + d_ap - d_an) is > 0. fl(fl(margin + d_ap) - d_an) > 0 is
// monotone in d_an, so this counts exactly the terms the reference counts.
template <typename T>
C10_HOST_DEVICE inline int64_t count_active_negatives(const T* sorted_neg, int64_t n, T d_ap, T margin) {
  const T shifted = margin + d_ap;
  return partition_point(sorted_neg, n, [shifted](T v) { return !(shifted - v > T(0)); });
}

// Counts for triplet_statistics over one (anchor, positive): with
// m = d_an - d_ap, easy: m > margin, hard: m <= 0, semihard: 0 < m <= margin.
// Exact float comparisons, each monotone in d_an; a NaN m is in no class.
// Each class is counted from its own definition: with margin < 0 the classes
// overlap (easy and hard share margin < m <= 0) and semihard is empty, so no
// count is derived from the others.
template <typename T>
C10_HOST_DEVICE inline void classify_negatives(const T* sorted_neg, int64_t n, T d_ap, T margin, int64_t& easy,
                                               int64_t& semihard, int64_t& hard) {
  const int64_t first_nan = partition_point(sorted_neg, n, [](T v) { return v != v; });
  const int64_t numeric = d_ap != d_ap ? 0 : first_nan;
  hard = partition_point(sorted_neg, numeric, [d_ap](T v) { return !(v - d_ap <= T(0)); });
  const int64_t first_easy = partition_point(sorted_neg, numeric, [d_ap, margin](T v) { return v - d_ap > margin; });
  easy = numeric - first_easy;
  semihard = first_easy > hard ? first_easy - hard : 0;  // the negatives with 0 < m <= margin
}

// ------------------------------------------------------------ mining and backwards

enum class MiningStrategy { All, Violating, Semihard, Hard, Easy, BatchHard };

// Whether a valid triplet with m = d_an - d_ap is selected.
template <typename T>
C10_HOST_DEVICE inline bool strategy_selects(MiningStrategy strategy, T m, T margin) {
  switch (strategy) {
    case MiningStrategy::All:
      return true;
    case MiningStrategy::Violating:
      return m <= margin;
    case MiningStrategy::Semihard:
      return m > T(0) && m <= margin;
    case MiningStrategy::Hard:
      return m <= T(0);
    case MiningStrategy::Easy:
      return m > margin;
    default:
      return false;
  }
}

// Whether a saved positive/negative index names a row of a batch of B: a
// direct torch.ops call may pass any value, and a kernel that cannot refuse
// it (a CUDA graph capture skips the host check) treats it as "no triplet".
C10_HOST_DEVICE inline bool index_in_batch(int64_t index, int64_t B) { return index >= 0 && index < B; }

// Per-anchor backward coefficients of batch-hard. With c_p, c_n the
// gradients reaching d_ap, d_an:
//   grad[a] += anchor_self * x[a] - cross_positive * x[p] - cross_negative * x[n]
//   grad[p] += positive_self * x[p] - cross_positive * x[a]
//   grad[n] += negative_self * x[n] - cross_negative * x[a]
template <typename T>
C10_HOST_DEVICE inline void batch_hard_anchor_coefficients(Metric metric, int64_t B, int64_t a, int64_t p, int64_t n,
                                                           T g, T g_ap, T g_an, T d_ap, T d_an, const T* aux, T margin,
                                                           bool soft, T& anchor_self, T& cross_positive,
                                                           T& cross_negative, T& positive_self, T& negative_self) {
  if (!index_in_batch(p, B) || !index_in_batch(n, B)) {  // no triplet (or a foreign index: no term)
    anchor_self = cross_positive = cross_negative = positive_self = negative_self = T(0);
    return;
  }
  const T t = triplet_term_grad(d_ap, d_an, margin, soft);
  const T c_p = g * t + g_ap;
  const T c_n = -g * t + g_an;
  T q_p = T(0), q_n = T(0);
  distance_grad_weights<T>(metric, c_p, d_ap, aux[a], aux[p], cross_positive, q_p);
  distance_grad_weights<T>(metric, c_n, d_an, aux[a], aux[n], cross_negative, q_n);
  anchor_self = norm_term_scale<T>(metric, aux[a]) * (q_p + q_n);
  positive_self = norm_term_scale<T>(metric, aux[p]) * q_p;
  negative_self = norm_term_scale<T>(metric, aux[n]) * q_n;
}

// Whether the semi-hard term of a pair with chosen negative n and loss l
// passes a gradient: a valid pair (n >= 0) whose hinge is active. relu' is 0
// at 0, as autograd takes it; NaN terms pass their gradient on.
template <typename T>
C10_HOST_DEVICE inline bool semihard_term_has_gradient(int64_t n, T l) {
  return n >= 0 && (l > T(0) || l != l);
}

// Semi-hard's gradient w.r.t. the distance matrix, row a only (rows are
// independent: both (a, p) and (a, n*) lie in row a, so no atomics).
// coef may be wider than T (float32 for float16/bfloat16 on CUDA).
template <typename T, typename acc_t = T>
C10_HOST_DEVICE inline void semihard_coefficients_row(int64_t a, int64_t B, const T* grad_losses, const T* losses,
                                                      const int64_t* negative, acc_t* coef) {
  for (int64_t p = 0; p < B; ++p) {
    const int64_t idx = a * B + p;
    const int64_t n = negative[idx];
    if (n >= B || !semihard_term_has_gradient(n, static_cast<acc_t>(losses[idx]))) continue;  // n >= B: foreign
    const acc_t g = static_cast<acc_t>(grad_losses[idx]);
    coef[idx] += g;
    coef[a * B + n] -= g;
  }
}

}  // namespace metricops
