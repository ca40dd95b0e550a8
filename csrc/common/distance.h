// Distance math shared by the CPU and CUDA kernels.
//
// Every kernel turns a Gram entry dot = <x_i, y_j> plus per-row auxiliaries
// into a distance with these functions, so the CPU test suite exercises the
// exact arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

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
template <typename acc_t>
C10_HOST_DEVICE inline acc_t distance_key(Metric metric, acc_t x_aux, acc_t y_aux, acc_t dot) {
  return distance_from_dot<acc_t>(metric == Metric::Euclidean ? Metric::SqEuclidean : metric, x_aux, y_aux, dot);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t key_to_distance(Metric metric, acc_t key) {
  return metric == Metric::Euclidean ? std::sqrt(key) : key;
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
C10_HOST_DEVICE inline void distance_grad_weights(
    Metric metric, acc_t g, acc_t d, acc_t x_aux, acc_t y_aux, acc_t& cross, acc_t& norm_term) {
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

}  // namespace metricops
