// Compile-time dispatch helpers shared by the CPU and CUDA kernels.
#pragma once

#include <c10/util/Exception.h>

#include "common/distance.h"

// Runs __VA_ARGS__ (a lambda body) with `constexpr metricops::Metric NAME` set
// to `metric`, so the per-element distance math is specialised per metric and
// the inner loops carry no switch.
#define METRICOPS_DISPATCH_METRIC(metric, NAME, ...)                      \
  [&] {                                                                   \
    switch (metric) {                                                     \
      case ::metricops::Metric::Euclidean: {                              \
        constexpr ::metricops::Metric NAME = ::metricops::Metric::Euclidean; \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::metricops::Metric::SqEuclidean: {                            \
        constexpr ::metricops::Metric NAME = ::metricops::Metric::SqEuclidean; \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::metricops::Metric::Cosine: {                                 \
        constexpr ::metricops::Metric NAME = ::metricops::Metric::Cosine; \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
    TORCH_CHECK(false, "metricops: unknown metric id ", static_cast<int64_t>(metric)); \
  }()
