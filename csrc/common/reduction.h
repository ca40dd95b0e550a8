// The scalar reductions of the contrastive losses, shared by the matrix and
// streaming forms (CPU and CUDA).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace metricops {

enum class Reduction : int { Mean = 0, Sum = 1, MeanNonzero = 2, None = 3 };

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  if (name == "mean_nonzero") return Reduction::MeanNonzero;
  if (name == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got '", std::string(name),
                    "'");
}

}  // namespace metricops
