// CUDA kernels of the sorting triplet miners on a labelled batch: semi-hard
// (matrix form and its backward), batch-all, triplet_statistics and
// mine_triplets, on row blocks of cuda/triplet_rows.h. No atomics; the loss
// forwards never sync the host (mine_triplets does: its output size is
// data-dependent).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/precision.h"
#include "common/triplet.h"
#include "common/triplet_impl.h"
#include "cuda/cuda_helpers.h"
#include "cuda/distance.h"
#include "cuda/triplet_rows.h"

namespace metricops {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_cuda(const at::Tensor& embeddings,
                                                                     const at::Tensor& labels_in, double margin,
                                                                     c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  if (B == 0) {
    return {at::zeros({0, 0}, embeddings.options()), at::full({0, 0}, -1, labels.options()),
            at::empty({0, 0}, embeddings.options())};
  }
  const SemihardRows r = semihard_rows(x, row_aux_acc_cuda(x, metric), labels, 0, B, metric, margin);
  const auto dtype = embeddings.scalar_type();
  return {r.losses.to(dtype), r.negative, r.dist.to(dtype)};
}

// Rows [0, rows) of the coefficient matrix; grad_losses, losses, negative
// and coef are (rows, B) and negative indexes columns. grad_losses and
// losses are in the input dtype, coef in the accumulation dtype (a negative
// collects the gradient of many positives). One thread per row keeps the
// scatter to each row's negatives ordered (deterministic); the matrix path
// has B rows, so this is B-way parallel.
template <typename T, typename acc_t>
__global__ void semihard_coefficients_kernel(int64_t rows, int64_t B, const T* grad_losses, const T* losses,
                                             const int64_t* negative, acc_t* coef) {
  METRICOPS_CUDA_KERNEL_LOOP(a, rows) {
    semihard_coefficients_row<T, acc_t>(a, B, grad_losses, losses, negative, coef);
  }
}

// The same coefficients with one warp per row: the warp reads 32 consecutive
// (loss, negative, gradient) entries of its row at once (coalesced, where
// one thread per row reads B uncoalesced columns and only B threads run),
// adds each positive's gradient in its own lane (positions are distinct),
// and lane 0 applies the negatives' subtractions in column order, as the
// thread-per-row kernel does: for the forward's outputs (positives and
// chosen negatives are disjoint columns) the result is bitwise the same.
// METRICOPS_CUDA_SEMIHARD_COEFFICIENTS selects "thread" (the default until a
// GPU run has compared both: `make gpu-check` does) or "warp".
template <typename T, typename acc_t>
__global__ void semihard_coefficients_warp_kernel(int64_t rows, int64_t B, const T* grad_losses, const T* losses,
                                                  const int64_t* negative, acc_t* coef) {
  const int lane = threadIdx.x % kWarp;
  METRICOPS_WARP_ROW_LOOP(a, rows) {
    for (int64_t p0 = 0; p0 < B; p0 += kWarp) {
      const int64_t p = p0 + lane;
      int64_t n = -1;
      acc_t g = acc_t(0);
      bool has = false;
      if (p < B) {
        const int64_t idx = a * B + p;
        n = negative[idx];
        has = n < B && semihard_term_has_gradient(n, static_cast<acc_t>(losses[idx]));  // n >= B: foreign
        if (has) {
          g = static_cast<acc_t>(grad_losses[idx]);
          coef[idx] += g;
        }
      }
      unsigned int mask = __ballot_sync(0xffffffffu, has);
      while (mask != 0u) {  // in column order
        const int src = __ffs(mask) - 1;
        mask &= mask - 1u;
        const int64_t ns = __shfl_sync(0xffffffffu, n, src);
        const acc_t gs = __shfl_sync(0xffffffffu, g, src);
        if (lane == 0) coef[a * B + ns] -= gs;
      }
      __syncwarp();
    }
  }
}

bool semihard_coefficients_by_warp() {
  return env_selects_new_path("METRICOPS_CUDA_SEMIHARD_COEFFICIENTS", "thread", "warp");
}

// The streaming backward's blocks have few rows but one gradient per row
// (that of the row's sum), so the coefficients are integer counts times it:
// one thread per (row, positive), integer atomics (order-independent, so
// deterministic) for the negatives that several positives share.
at::Tensor semihard_triplet_backward_cuda(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_dist,
                                          const at::Tensor& embeddings, const at::Tensor& losses_in,
                                          const at::Tensor& negative_in, const at::Tensor& dist,
                                          c10::string_view metric) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  check_semihard_backward_inputs(grad_losses, grad_dist, embeddings, losses_in, negative_in, dist, may_sync_now());
  const int64_t B = embeddings.size(0);
  const auto dtype = embeddings.scalar_type();
  const auto acc_options = embeddings.options().dtype(acc_dtype(dtype));
  at::Tensor coef =
      grad_dist.has_value() ? grad_dist->to(acc_options).contiguous().clone() : at::zeros({B, B}, acc_options);
  if (B > 0) {
    const at::Tensor g = grad_losses.to(dtype).contiguous();
    const at::Tensor losses = losses_in.contiguous(), negative = negative_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "metricops_semihard_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (semihard_coefficients_by_warp()) {
        semihard_coefficients_warp_kernel<scalar_t, acc_t><<<warp_rows_grid(B), kThreads, 0, current_stream()>>>(
            B, B, g.const_data_ptr<scalar_t>(), losses.const_data_ptr<scalar_t>(), negative.const_data_ptr<int64_t>(),
            coef.mutable_data_ptr<acc_t>());
      } else {
        semihard_coefficients_kernel<scalar_t, acc_t><<<grid_for(B), kThreads, 0, current_stream()>>>(
            B, B, g.const_data_ptr<scalar_t>(), losses.const_data_ptr<scalar_t>(), negative.const_data_ptr<int64_t>(),
            coef.mutable_data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return self_distance_backward(coef.to(dtype), embeddings, dist, metric);  // rounded once
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels_in, double margin, c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  if (B == 0) {
    at::Tensor zero_count = at::zeros({}, labels.options());
    return {at::zeros({}, embeddings.options().dtype(acc_dtype(embeddings))), zero_count, zero_count.clone(),
            at::empty({0, 0}, embeddings.options()), at::empty({0, 0}, embeddings.options())};
  }
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  const BatchAllRows r = batch_all_rows(x, aux, labels, 0, B, metric, margin);
  const auto dtype = embeddings.scalar_type();
  // The sum stays in the accumulation dtype: B³ terms overflow float16.
  return {r.term_sum.to(aux.scalar_type()), r.num_valid, r.num_active, r.dist.to(dtype), r.multiplicity.to(dtype)};
}

at::Tensor triplet_statistics_cuda(const at::Tensor& embeddings, const at::Tensor& labels_in, double margin,
                                   c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor total = at::zeros({4}, labels.options());
  if (B == 0) return total;
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  // Row blocks keep the scratch (sort keys and indices, per-entry counts)
  // under 256 MiB, so large batches fit (the op has no block_rows argument).
  const int64_t block_rows = std::max<int64_t>(1, (int64_t{256} << 20) / (kSortingScratchBytesPerEntry * B));
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    total.add_(statistics_rows(x, aux, labels, r0, rows, metric, margin));
  });
  return total;
}

// ---------------------------------------------------------------- mine_triplets

// One thread per (anchor, positive) pair: count (offsets == nullptr) or
// write its selected negatives in index order.
template <typename acc_t>
__global__ void mine_kernel(const acc_t* __restrict__ dist, const bool* __restrict__ positive,
                            const bool* __restrict__ negative, int64_t B, MiningStrategy strategy, acc_t margin,
                            int64_t* __restrict__ counts, const int64_t* __restrict__ offsets,
                            int64_t* __restrict__ out_a, int64_t* __restrict__ out_p, int64_t* __restrict__ out_n) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, B * B) {
    const int64_t a = idx / B, p = idx - a * B;
    int64_t k = offsets == nullptr ? 0 : offsets[idx];
    if (positive[idx]) {
      const acc_t d_ap = dist[idx];
      for (int64_t n = 0; n < B; ++n) {
        if (!negative[a * B + n] || !strategy_selects<acc_t>(strategy, dist[a * B + n] - d_ap, margin)) continue;
        if (offsets != nullptr) out_a[k] = a, out_p[k] = p, out_n[k] = n;
        ++k;
      }
    }
    if (offsets == nullptr) counts[idx] = k;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mine_triplets_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels_in,
                                                                  c10::string_view strategy_name, double margin,
                                                                  c10::string_view metric_name) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  parse_metric(metric_name);  // the errors come in argument order: metric, strategy, inputs
  const MiningStrategy strategy = parse_strategy(strategy_name);
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  if (strategy == MiningStrategy::BatchHard) {
    auto [losses, positive, negative, d_ap, d_an] =
        batch_hard_triplet_cuda(embeddings, labels_in, margin, metric_name, false, 0, false);
    const at::Tensor anchors = at::nonzero(positive.ge(0)).flatten();  // the miner may sync: its size is data-dependent
    return {anchors, positive.index_select(0, anchors), negative.index_select(0, anchors)};
  }
  if (B == 0) {
    at::Tensor e = at::empty({0}, labels.options());
    return {e, e.clone(), e.clone()};
  }
  const at::Tensor dist = self_distance_acc_cuda(x, metric);
  const at::Tensor same = labels.unsqueeze(1).eq(labels.unsqueeze(0));
  const at::Tensor negative = same.logical_not().contiguous();
  const at::Tensor positive = same.fill_diagonal_(false).contiguous();
  at::Tensor counts = at::empty({B * B}, labels.options());
  at::Tensor a_out, p_out, n_out;
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "metricops_mine_triplets_cuda", [&] {
    const auto m = static_cast<scalar_t>(margin);
    mine_kernel<scalar_t><<<grid_for(B * B), kThreads, 0, current_stream()>>>(
        dist.const_data_ptr<scalar_t>(), positive.const_data_ptr<bool>(), negative.const_data_ptr<bool>(), B, strategy,
        m, counts.mutable_data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor ends = at::cumsum(counts, 0);
    const int64_t total = ends[-1].item<int64_t>();
    const at::Tensor offsets = ends.sub(counts);
    a_out = at::empty({total}, labels.options());
    p_out = at::empty({total}, labels.options());
    n_out = at::empty({total}, labels.options());
    if (total > 0) {
      mine_kernel<scalar_t><<<grid_for(B * B), kThreads, 0, current_stream()>>>(
          dist.const_data_ptr<scalar_t>(), positive.const_data_ptr<bool>(), negative.const_data_ptr<bool>(), B,
          strategy, m, nullptr, offsets.const_data_ptr<int64_t>(), a_out.mutable_data_ptr<int64_t>(),
          p_out.mutable_data_ptr<int64_t>(), n_out.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {a_out, p_out, n_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("semihard_triplet", &semihard_triplet_cuda);
  m.impl("semihard_triplet_backward", &semihard_triplet_backward_cuda);
  m.impl("batch_all_triplet", &batch_all_triplet_cuda);
  m.impl("triplet_statistics", &triplet_statistics_cuda);
  m.impl("mine_triplets", &mine_triplets_cuda);
}

}  // namespace cuda
}  // namespace metricops
