// pytorch-metric-learning's TripletMarginMiner selection, as an interval of
// m = d(a, n) - d(a, p), shared by the CPU and CUDA kernels of
// triplet_interval_weights.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "common/checks.h"

namespace metricops {

// The selected triplets: lower < m (only when kHasLower) and m <= upper
// (kUpperInclusive) or m < upper. m and the bounds are compared in the
// distances' own dtype, as PML compares its float tensors with Python-float
// margins; NaN is never selected. The interval's shape is a compile-time
// parameter, so the test is branch-free and the CPU loop vectorizes.
template <bool kHasLower, bool kUpperInclusive, typename T>
C10_HOST_DEVICE inline bool in_margin_interval(T m, T lower, T upper) {
  const bool below = kUpperInclusive ? m <= upper : m < upper;
  return kHasLower ? below & (m > lower) : below;
}

// Calls f(std::bool_constant<has_lower>{}, std::bool_constant<upper_inclusive>{}).
template <typename F>
auto dispatch_interval_shape(bool has_lower, bool upper_inclusive, F&& f) {
  if (has_lower) {
    return upper_inclusive ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  }
  return upper_inclusive ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

inline void check_triplet_interval_inputs(const at::Tensor& dist, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(dist.dim() == 2 && dist.size(0) == dist.size(1),
                    "dist must be a square (B, B) distance matrix, got shape ", dist.sizes());
  check_embeddings(dist, "dist");
  check_labels(labels, dist);
}

}  // namespace metricops
