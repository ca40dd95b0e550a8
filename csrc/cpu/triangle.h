// Parallel loops over the rows of a triangle (the self mode's upper or lower
// half of a B × B matrix), where row i's work grows or shrinks linearly with
// i. at::parallel_for hands each thread one contiguous range of indices, which
// would give one of two threads three quarters of the work. Here rows go out
// in pairs (p, n - 1 - p) whose work sums to a constant.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace metricops {
namespace cpu {

// f(i) for every i in [0, n), in pairs of equal total work; `grain`: pairs per task.
template <typename F>
void parallel_for_triangle_rows(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, (n + 1) / 2, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      f(p);
      if (n - 1 - p != p) f(n - 1 - p);
    }
  });
}

}  // namespace cpu
}  // namespace metricops
