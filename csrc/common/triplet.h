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
