// Distance math shared by the CPU and CUDA kernels.
//
// Every kernel turns a Gram entry dot = <x_i, y_j> plus per-row auxiliaries
// into a distance with these functions, so the CPU test suite exercises the
// exact arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <limits>

namespace metricops {

enum class Metric : int64_t { Euclidean = 0, SqEuclidean = 1, Cosine = 2 };

// Per-row auxiliary from a row's squared L2 norm: the squared norm itself for
// the euclidean metrics, the inverse norm for cosine (0 for a zero vector, so
// that cos with a zero vector is 0). NaN stays NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t row_aux(Metric metric, acc_t sqnorm) {
  if (metric == Metric::Cosine) {
    return sqnorm == acc_t(0) ? acc_t(0) : acc_t(1) / std::sqrt(sqnorm);
  }
  return sqnorm;
}

// Distance from a Gram entry. `x_aux`, `y_aux` come from row_aux.
// Negative squared distances (rounding) clamp to 0; NaN propagates because
// `NaN < 0` is false.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t distance_from_dot(Metric metric, acc_t x_aux, acc_t y_aux, acc_t dot) {
  if (metric == Metric::Cosine) {
    return acc_t(1) - dot * x_aux * y_aux;
  }
  acc_t sq = x_aux + y_aux - acc_t(2) * dot;
  sq = sq < acc_t(0) ? acc_t(0) : sq;
  return metric == Metric::Euclidean ? std::sqrt(sq) : sq;
}

// A key with the same order as distance_from_dot (the squared distance for
// "euclidean": sqrt is monotone), so selections can skip the sqrt and take
// it for the winners only: key_to_distance(distance_key(...)) equals
// distance_from_dot(...) exactly.
// The metric whose distances are the keys of `metric`: a kernel that
// computes distances with it computes distance_key (same row_aux).
C10_HOST_DEVICE inline Metric key_metric(Metric metric) {
  return metric == Metric::Euclidean ? Metric::SqEuclidean : metric;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t distance_key(Metric metric, acc_t x_aux, acc_t y_aux, acc_t dot) {
  return distance_from_dot<acc_t>(key_metric(metric), x_aux, y_aux, dot);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t key_to_distance(Metric metric, acc_t key) {
  return metric == Metric::Euclidean ? std::sqrt(key) : key;
}

// ---------------------------------------------------------------- exactness
// The Gram form d² = ‖x‖² + ‖y‖² − 2<x, y> loses every digit when d is small
// next to the norms (identical rows come out as ±rounding, not 0) and breaks
// when a norm overflows or underflows. The kernels therefore recompute from
// explicit differences every entry whose Gram-form key is at or below the
// Gram form's rounding bound, or not a number, or whose rows' norms are out
// of the safe range. For inputs whose rows are not near-duplicates (the
// common case) no entry qualifies, and the cost is one compare per entry.
//
// Rounding bound of the Gram form relative to ‖x‖² + ‖y‖² (cosine: to 1):
// |error| <= 2·D·eps for the dot product and the norms together (a worst-case
// bound; blocked BLAS sums do better), plus a few roundings for the rest.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gram_tolerance(int64_t dim) {
  return acc_t(2 * dim + 8) * std::numeric_limits<acc_t>::epsilon();
}

// Whether entry (x, y)'s key from the Gram form (distance_key) must be
// recomputed by exact_distance_key. NaN keys qualify (the explicit form then
// tells NaN from the Gram form's inf - inf). Cosine with a zero row is exact
// (cos is 0 by definition, d = 1); otherwise cosine qualifies when d is at the
// rounding bound or when ‖x‖·‖y‖ > sqrt(max), where the dot product can
// overflow.
template <typename acc_t>
C10_HOST_DEVICE inline bool gram_key_needs_exact(Metric metric, acc_t key, acc_t x_aux, acc_t y_aux, acc_t tol) {
  if (metric == Metric::Cosine) {
    if (x_aux == acc_t(0) || y_aux == acc_t(0)) return false;
    const acc_t lo = acc_t(1) / std::sqrt(std::numeric_limits<acc_t>::max());
    return !(key > tol) || !(x_aux * y_aux >= lo);  // x_aux·y_aux = 1 / (‖x‖·‖y‖)
  }
  return !(key > tol * (x_aux + y_aux));
}

// The distance key of (x, y) from explicit differences e_k = fx·x_k − fy·y_k:
// Σ e² for the euclidean metrics (fx = fy = 1, or the row scales of
// normalize=True), ‖x̂ − ŷ‖²/2 = 1 − cos for cosine (fx, fy: the scales times
// the inverse norms, so the differences stay in range). NaN and inf inputs
// give what the differences give (inf − inf is NaN); a squared key that
// overflows is inf. A cosine distance below tol² is 0: that is below the
// resolution of the normalised rows (their norms carry a relative error up to
// tol), so parallel vectors compare equal.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t exact_distance_key(Metric metric, const scalar_t* x, acc_t fx, const scalar_t* y, acc_t fy,
                                                int64_t dim, acc_t tol) {
  acc_t s = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const acc_t e = fx * static_cast<acc_t>(x[k]) - fy * static_cast<acc_t>(y[k]);
    s += e * e;
  }
  if (metric == Metric::Cosine) {
    s = s / acc_t(2);
    return s <= tol * tol ? acc_t(0) : s;
  }
  return s;
}

// The row scale of exact_distance_key for a row with scale `scale` (1 unless
// normalize=True) and row_aux `aux`.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t exact_row_factor(Metric metric, acc_t scale, acc_t aux) {
  return metric == Metric::Cosine ? scale * aux : scale;
}

// distance_key with the exactness guard: the Gram-form key, or the explicit
// one where gram_key_needs_exact says so.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t guarded_distance_key(Metric metric, acc_t x_aux, acc_t y_aux, acc_t dot, const scalar_t* x,
                                                  acc_t x_scale, const scalar_t* y, acc_t y_scale, int64_t dim,
                                                  acc_t tol) {
  const acc_t key = distance_key<acc_t>(metric, x_aux, y_aux, dot);
  if (!gram_key_needs_exact<acc_t>(metric, key, x_aux, y_aux, tol)) return key;
  return exact_distance_key<acc_t>(metric, x, exact_row_factor(metric, x_scale, x_aux), y,
                                   exact_row_factor(metric, y_scale, y_aux), dim, tol);
}

// Row aux for cosine when the squared norm overflowed (a row of finite values
// with ‖x‖ > sqrt(max)): the inverse norm by rescaling, so the row is not
// taken for a zero vector; NaN for a row holding NaN or inf (as x / ‖x‖
// gives). An underflowed squared norm keeps row_aux's zero-vector rule (cos 0,
// as torch's cosine_similarity and F.normalize-based code give for rows below
// their eps). Other metrics: row_aux(sqnorm).
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t checked_row_aux(Metric metric, acc_t sqnorm, const scalar_t* x, int64_t dim) {
  if (metric != Metric::Cosine || sqnorm <= std::numeric_limits<acc_t>::max()) {
    return row_aux<acc_t>(metric, sqnorm);
  }
  acc_t m = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const acc_t a = std::abs(static_cast<acc_t>(x[k]));
    if (!(a <= std::numeric_limits<acc_t>::max())) return std::numeric_limits<acc_t>::quiet_NaN();
    m = a > m ? a : m;
  }
  acc_t r = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const acc_t e = static_cast<acc_t>(x[k]) / m;
    r += e * e;
  }
  return acc_t(1) / (m * std::sqrt(r));
}

// Backward of distance_from_dot for one pair, given the upstream gradient `g`
// of d_ij and the forward value `d`:
//   grad_x_i += row_coef_i * x_i - w_ij * y_j
//   grad_y_j += col_coef_j * y_j - w_ij * x_i
// where row_coef_i = scale_i * sum_j p_ij and col_coef_j = scale_j * sum_i p_ij
// (scale = 1 for the euclidean metrics, inverse norm squared for cosine).
// `cross` receives w_ij and `norm_term` receives p_ij.
// A zero euclidean distance has gradient 0, never NaN.
template <typename acc_t>
C10_HOST_DEVICE inline void distance_grad_weights(Metric metric, acc_t g, acc_t d, acc_t x_aux, acc_t y_aux,
                                                  acc_t& cross, acc_t& norm_term) {
  switch (metric) {
    case Metric::SqEuclidean:
      cross = acc_t(2) * g;
      norm_term = cross;
      break;
    case Metric::Euclidean:
      cross = d == acc_t(0) ? acc_t(0) : g / d;
      norm_term = cross;
      break;
    case Metric::Cosine:
      cross = g * x_aux * y_aux;
      norm_term = g * (acc_t(1) - d);
      break;
    default:
      cross = norm_term = acc_t(0);
  }
}

// Scale applied to the summed norm terms of a row (see distance_grad_weights).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t norm_term_scale(Metric metric, acc_t aux) {
  return metric == Metric::Cosine ? aux * aux : acc_t(1);
}

// The total order of distances with their indices, used by every sort and
// top-k: (distance, index) lexicographic, NaN after every number (+inf
// included) and NaNs equal to one another, so NaN distances sort last, by
// index, and never displace a number.
template <typename acc_t>
C10_HOST_DEVICE inline bool dist_index_less(acc_t da, int64_t ia, acc_t db, int64_t ib) {
  const bool a_nan = da != da, b_nan = db != db;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return da < db || (da == db && ia < ib);
}

}  // namespace metricops
