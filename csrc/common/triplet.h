// Triplet math shared by the CPU and CUDA kernels: hinges, NaN-aware
// orderings and the per-anchor selections (batch-hard, semi-hard, counts).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

#include "common/distance.h"

namespace metricops {

// relu that keeps NaN (NaN < 0 is false), as torch.relu does.
template <typename T>
C10_HOST_DEVICE inline T hinge(T x) {
  return x < T(0) ? T(0) : x;
}

// relu's derivative as autograd takes it: 0 at the kink (hinge.h's
// triplet_hinge has the same slope, as torch's clamp_min backward does).
template <typename T>
C10_HOST_DEVICE inline T hinge_grad(T x) {
  return x > T(0) ? T(1) : T(0);
}

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
// anchor-negative distances: relu(margin + d_ap - d_an), or softplus(d_ap - d_an).
template <typename T>
C10_HOST_DEVICE inline T triplet_term(T d_ap, T d_an, T margin, bool soft) {
  return soft ? softplus(d_ap - d_an) : hinge((margin + d_ap) - d_an);
}

// d(term)/d(d_ap); d(term)/d(d_an) is its negation.
template <typename T>
C10_HOST_DEVICE inline T triplet_term_grad(T d_ap, T d_an, T margin, bool soft) {
  return soft ? softplus_grad(d_ap - d_an) : hinge_grad((margin + d_ap) - d_an);
}

// Batch-hard result of one anchor from its selected distance keys
// (distance_key: the squared distance for "euclidean"). Both devices select
// on keys and take the sqrt for the winners only, so two squared distances
// that round to the same root still pick the same row on CPU and CUDA.
template <typename T>
C10_HOST_DEVICE inline void batch_hard_from_keys(Metric metric, T key_p, T key_n, T margin, bool soft, T& d_ap,
                                                 T& d_an, T& loss) {
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
C10_HOST_DEVICE inline void semihard_scan_step(T d, I k, T d_ap, T& near_d, I& near_k, T& far_d, I& far_k,
                                               I& nan_k) {
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

// Total order on (distance, index): NaN after every number, ties to the
// lower index. Used for every sort, so sorts are well-defined on NaN.
template <typename T>
C10_HOST_DEVICE inline bool dist_index_less(T da, int64_t ia, T db, int64_t ib) {
  const bool a_nan = da != da, b_nan = db != db;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return da < db || (da == db && ia < ib);
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

}  // namespace metricops
