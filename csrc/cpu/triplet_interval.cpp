// CPU kernel of triplet_interval_weights: per anchor row, every (positive,
// negative) pair of the row tested against the miner's interval, with the
// negatives' distances compacted so the inner loop is branch-free.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/triplet_interval.h"

namespace metricops {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> triplet_interval_weights_cpu(const at::Tensor& dist_in, const at::Tensor& labels_in,
                                                                double lower, bool has_lower, double upper,
                                                                bool upper_inclusive) {
  check_triplet_interval_inputs(dist_in, labels_in);
  const at::Tensor dist = dist_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = dist.size(0);
  at::Tensor weight = at::zeros({B, B}, dist.options());
  at::Tensor row_count = at::zeros({B}, labels.options());
  if (B == 0) return {weight, row_count};
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_triplet_interval_weights_cpu", [&] {
    const scalar_t lo = static_cast<scalar_t>(lower), hi = static_cast<scalar_t>(upper);
    // For one positive: adds 1 to cnt[k] for each negative k it forms a selected triplet with; returns how many.
    auto count_row = [&](const scalar_t* nd, int32_t* cnt, int64_t n, scalar_t d_ap) -> int32_t {
      return dispatch_interval_shape(has_lower, upper_inclusive, [&](auto has_lo, auto incl) {
        int32_t selected = 0;
        for (int64_t k = 0; k < n; ++k) {
          const int32_t in = in_margin_interval<decltype(has_lo)::value, decltype(incl)::value>(
              static_cast<scalar_t>(nd[k] - d_ap), lo, hi);
          cnt[k] += in;
          selected += in;
        }
        return selected;
      });
    };
    const scalar_t* d = dist.const_data_ptr<scalar_t>();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    scalar_t* w = weight.mutable_data_ptr<scalar_t>();
    int64_t* count = row_count.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> negative_dist;
      std::vector<int64_t> negative_index;
      std::vector<int32_t> per_negative;
      for (int64_t a = begin; a < end; ++a) {
        const scalar_t* row = d + a * B;
        scalar_t* w_row = w + a * B;
        negative_dist.clear();
        negative_index.clear();
        for (int64_t j = 0; j < B; ++j) {
          if (lab[j] != lab[a]) negative_dist.push_back(row[j]), negative_index.push_back(j);
        }
        const int64_t n = static_cast<int64_t>(negative_dist.size());
        if (n == 0) continue;
        per_negative.assign(n, 0);
        const scalar_t* nd = negative_dist.data();
        int32_t* cnt = per_negative.data();
        int64_t total = 0;
        for (int64_t p = 0; p < B; ++p) {
          if (p == a || lab[p] != lab[a]) continue;
          const scalar_t d_ap = row[p];
          const int32_t selected = count_row(nd, cnt, n, d_ap);
          w_row[p] = static_cast<scalar_t>(selected);
          total += selected;
        }
        for (int64_t k = 0; k < n; ++k) w_row[negative_index[k]] = -static_cast<scalar_t>(cnt[k]);
        count[a] = total;
      }
    });
  });
  return {weight, row_count};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CPU, m) { m.impl("triplet_interval_weights", &triplet_interval_weights_cpu); }

}  // namespace cpu
}  // namespace metricops
