// Compile-time dispatch macros shared by the CPU and CUDA kernels: each runs
// __VA_ARGS__ (a lambda body) with `constexpr NAME` set to a runtime value,
// so the per-element math is specialised and the inner loops carry no switch.
// METRICOPS_DISPATCH_NORM_KIND needs common/hinge.h (NormKind) where it is used.
#pragma once

#include <c10/util/Exception.h>

#include "common/distance.h"

// One case of the switches below: `constexpr TYPE NAME = VALUE`, then the body.
#define METRICOPS_CONSTEXPR_CASE(TYPE, VALUE, NAME, ...) \
  case VALUE: {                                          \
    constexpr TYPE NAME = VALUE;                         \
    return __VA_ARGS__();                                \
  }

// `constexpr metricops::Metric NAME = metric`.
#define METRICOPS_DISPATCH_METRIC(metric, NAME, ...)                                                     \
  [&] {                                                                                                  \
    switch (metric) {                                                                                    \
      METRICOPS_CONSTEXPR_CASE(::metricops::Metric, ::metricops::Metric::Euclidean, NAME, __VA_ARGS__)   \
      METRICOPS_CONSTEXPR_CASE(::metricops::Metric, ::metricops::Metric::SqEuclidean, NAME, __VA_ARGS__) \
      METRICOPS_CONSTEXPR_CASE(::metricops::Metric, ::metricops::Metric::Cosine, NAME, __VA_ARGS__)      \
    }                                                                                                    \
    TORCH_CHECK(false, "metricops: unknown metric id ", static_cast<int64_t>(metric));                   \
  }()

// `constexpr bool NAME = value`.
#define METRICOPS_DISPATCH_BOOL(value, NAME, ...) \
  [&] {                                           \
    if (value) {                                  \
      constexpr bool NAME = true;                 \
      return __VA_ARGS__();                       \
    }                                             \
    constexpr bool NAME = false;                  \
    return __VA_ARGS__();                         \
  }()

// `constexpr metricops::NormKind NAME = kind`.
#define METRICOPS_DISPATCH_NORM_KIND(kind, NAME, ...)                                                      \
  [&] {                                                                                                    \
    switch (kind) {                                                                                        \
      METRICOPS_CONSTEXPR_CASE(::metricops::NormKind, ::metricops::NormKind::L1, NAME, __VA_ARGS__)        \
      METRICOPS_CONSTEXPR_CASE(::metricops::NormKind, ::metricops::NormKind::L2, NAME, __VA_ARGS__)        \
      METRICOPS_CONSTEXPR_CASE(::metricops::NormKind, ::metricops::NormKind::Lp, NAME, __VA_ARGS__)        \
      METRICOPS_CONSTEXPR_CASE(::metricops::NormKind, ::metricops::NormKind::SquaredL2, NAME, __VA_ARGS__) \
    }                                                                                                      \
    TORCH_CHECK(false, "metricops: unknown norm kind");                                                    \
  }()
