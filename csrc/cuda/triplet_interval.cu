// CUDA kernel of triplet_interval_weights: one block per anchor row. The
// row's positives are gathered into shared memory a column range at a time;
// each thread then owns negatives and tests them against every gathered
// positive (common/triplet_interval.h), counting per positive in shared
// memory. Integer counts: the result does not depend on the order.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/triplet_interval.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace {

// Positives gathered per pass: a column range of this many columns holds at
// most this many positives.
constexpr int kPositivesPerPass = 1024;

template <typename scalar_t, bool kHasLower, bool kUpperInclusive>
__global__ void triplet_interval_weights_kernel(const scalar_t* __restrict__ dist, const int64_t* __restrict__ labels,
                                                int64_t B, scalar_t lower, scalar_t upper,
                                                scalar_t* __restrict__ weight, int64_t* __restrict__ row_count) {
  __shared__ int64_t positive_index[kPositivesPerPass];
  __shared__ scalar_t positive_dist[kPositivesPerPass];
  __shared__ int positive_selected[kPositivesPerPass];
  __shared__ int num_positives;
  __shared__ unsigned long long row_total;
  const int64_t a = blockIdx.x;
  const scalar_t* row = dist + a * B;
  scalar_t* w_row = weight + a * B;
  const int64_t label = labels[a];
  if (threadIdx.x == 0) row_total = 0;
  for (int64_t c0 = 0; c0 < B; c0 += kPositivesPerPass) {
    const int64_t c1 = c0 + kPositivesPerPass < B ? c0 + kPositivesPerPass : B;
    if (threadIdx.x == 0) num_positives = 0;
    __syncthreads();
    for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x) {
      if (j != a && labels[j] == label) {
        const int slot = atomicAdd(&num_positives, 1);
        positive_index[slot] = j;
        positive_dist[slot] = row[j];
        positive_selected[slot] = 0;
      }
    }
    __syncthreads();
    const int P = num_positives;
    if (P > 0) {
      for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
        if (labels[j] == label) continue;
        const scalar_t d_an = row[j];
        int selected = 0;
        for (int k = 0; k < P; ++k) {
          if (in_margin_interval<kHasLower, kUpperInclusive>(static_cast<scalar_t>(d_an - positive_dist[k]), lower,
                                                             upper)) {
            ++selected;
            atomicAdd(&positive_selected[k], 1);
          }
        }
        w_row[j] -= static_cast<scalar_t>(selected);
      }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < P; k += blockDim.x) {
      w_row[positive_index[k]] = static_cast<scalar_t>(positive_selected[k]);
      atomicAdd(&row_total, static_cast<unsigned long long>(positive_selected[k]));
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) row_count[a] = static_cast<int64_t>(row_total);
}

std::tuple<at::Tensor, at::Tensor> triplet_interval_weights_cuda(const at::Tensor& dist_in, const at::Tensor& labels_in,
                                                                 double lower, bool has_lower, double upper,
                                                                 bool upper_inclusive) {
  METRICOPS_CUDA_DEVICE_GUARD(dist_in.device());
  check_triplet_interval_inputs(dist_in, labels_in);
  // A half-precision distance matrix is compared in float32 and its weights
  // are float32: counts up to B are exact there, not in float16.
  const at::Tensor dist =
      dist_in.scalar_type() == at::kDouble ? dist_in.contiguous() : dist_in.contiguous().to(at::kFloat);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = dist.size(0);
  at::Tensor weight = at::zeros({B, B}, dist.options());
  at::Tensor row_count = at::zeros({B}, labels.options());
  if (B == 0) return {weight, row_count};
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_triplet_interval_weights_cuda", [&] {
    dispatch_interval_shape(has_lower, upper_inclusive, [&](auto has_lo, auto incl) {
      triplet_interval_weights_kernel<scalar_t, decltype(has_lo)::value, decltype(incl)::value>
          <<<static_cast<unsigned int>(B), kThreads, 0, current_stream()>>>(
              dist.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), B, static_cast<scalar_t>(lower),
              static_cast<scalar_t>(upper), weight.mutable_data_ptr<scalar_t>(), row_count.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {weight, row_count};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) { m.impl("triplet_interval_weights", &triplet_interval_weights_cuda); }

}  // namespace cuda
}  // namespace metricops
