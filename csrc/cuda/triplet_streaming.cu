// CUDA kernels of the streaming semi-hard and batch-all triplet losses,
// which never hold the B×B matrix: the forward mines each row block of
// distances (cuda/triplet_rows.h) and keeps per-anchor sums; the backward
// recomputes each block, mines it again and applies its coefficients with
// pairwise_distance_backward of the block's rows, accumulating in the
// accumulation dtype. The semi-hard backward counts each negative's terms
// with integer atomicAdd (order-independent, so deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// The streaming backward's blocks have few rows but one gradient per row
// (that of the row's sum), so the coefficients are integer counts times it:
// one thread per (row, positive), integer atomics (order-independent, so
// deterministic) for the negatives that several positives share.
template <typename acc_t>
__global__ void semihard_term_counts_kernel(int64_t rows, int64_t B, const acc_t* __restrict__ losses,
                                            const int64_t* __restrict__ negative, int32_t* __restrict__ count) {
  METRICOPS_CUDA_KERNEL_LOOP(idx, rows * B) {
    const int64_t n = negative[idx];
    if (!semihard_term_has_gradient(n, losses[idx])) continue;
    const int64_t a = idx / B;
    count[idx] += 1;  // (a, p) is a positive pair: no other thread writes it
    atomicAdd(count + a * B + n, -1);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> semihard_triplet_streaming_cuda(const at::Tensor& embeddings,
                                                                               const at::Tensor& labels_in,
                                                                               double margin,
                                                                               c10::string_view metric_name,
                                                                               int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  // float32 for float16/bfloat16: a row's sum may exceed their range.
  at::Tensor row_sum = at::zeros({B}, embeddings.options().dtype(acc_dtype(embeddings)));
  at::Tensor row_valid = at::zeros({B}, labels.options());
  at::Tensor row_active = at::zeros({B}, labels.options());
  if (B == 0) return {row_sum, row_valid, row_active};
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    const SemihardRows r = semihard_rows(x, aux, labels, r0, rows, metric, margin);
    row_sum.narrow(0, r0, rows).copy_(r.losses.sum(1));
    row_valid.narrow(0, r0, rows).copy_(r.negative.ge(0).sum(1));
    row_active.narrow(0, r0, rows).copy_(r.losses.gt(0).sum(1));
  });
  return {row_sum, row_valid, row_active};
}

at::Tensor semihard_triplet_streaming_backward_cuda(const at::Tensor& grad_row_sum, const at::Tensor& embeddings,
                                                    const at::Tensor& labels_in, double margin,
                                                    c10::string_view metric_name, int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] =
      prepare_streaming_backward("semihard_triplet_streaming_backward", grad_row_sum, {embeddings.size(0)}, embeddings,
                                 labels_in, margin, metric_name);
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  // Every block's gradient is computed and accumulated in float32 for
  // float16/bfloat16 (x_acc), and rounded to the input dtype once.
  at::Tensor grad = at::zeros(x.sizes(), aux.options());
  if (B == 0) return grad.to(x.scalar_type());
  const at::Tensor x_acc = x.to(aux.scalar_type());
  const at::Tensor g = grad_row_sum.to(aux.scalar_type());
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    const SemihardRows r = semihard_rows(x, aux, labels, r0, rows, metric, margin);
    at::Tensor count = at::zeros({rows, B}, labels.options().dtype(at::kInt));
    AT_DISPATCH_FLOATING_TYPES(aux.scalar_type(), "metricops_semihard_streaming_backward_cuda", [&] {
      semihard_term_counts_kernel<scalar_t><<<grid_for(rows * B), kThreads, 0, current_stream()>>>(
          rows, B, r.losses.const_data_ptr<scalar_t>(), r.negative.const_data_ptr<int64_t>(),
          count.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor coef = count.to(aux.scalar_type()).mul_(g.narrow(0, r0, rows).unsqueeze(1));
    accumulate_distance_rows_backward(coef, x_acc, r.dist, r0, metric_name, grad);
  });
  return grad.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_triplet_streaming_cuda(const at::Tensor& embeddings,
                                                                                const at::Tensor& labels_in,
                                                                                double margin,
                                                                                c10::string_view metric_name,
                                                                                int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_labelled_batch(embeddings, labels_in, margin, metric_name);
  at::Tensor total = at::zeros({}, embeddings.options().dtype(at::kDouble));
  at::Tensor num_valid = at::zeros({}, labels.options());
  at::Tensor num_active = at::zeros({}, labels.options());
  if (B > 0) {
    const at::Tensor aux = row_aux_acc_cuda(x, metric);
    for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
      const BatchAllRows r = batch_all_rows(x, aux, labels, r0, rows, metric, margin);
      total.add_(r.term_sum);
      num_valid.add_(r.num_valid);
      num_active.add_(r.num_active);
    });
  }
  return {total.to(acc_dtype(embeddings)), num_valid, num_active};
}

at::Tensor batch_all_triplet_streaming_backward_cuda(const at::Tensor& grad_sum, const at::Tensor& embeddings,
                                                     const at::Tensor& labels_in, double margin,
                                                     c10::string_view metric_name, int64_t block_rows) {
  METRICOPS_CUDA_DEVICE_GUARD(embeddings.device());
  const auto [metric, x, labels, B] = prepare_streaming_backward("batch_all_triplet_streaming_backward", grad_sum, {},
                                                                 embeddings, labels_in, margin, metric_name);
  const at::Tensor aux = row_aux_acc_cuda(x, metric);
  at::Tensor grad = at::zeros(x.sizes(), aux.options());  // accumulated in float32 for float16/bfloat16
  const at::Tensor g = grad_sum.to(aux.scalar_type());
  const at::Tensor x_acc = x.to(aux.scalar_type());  // blocks' gradients in float32 for float16/bfloat16
  for_each_row_block(B, block_rows, [&](int64_t r0, int64_t rows) {
    const BatchAllRows r = batch_all_rows(x, aux, labels, r0, rows, metric, margin);
    accumulate_distance_rows_backward(r.multiplicity.mul(g), x_acc, r.dist, r0, metric_name, grad);
  });
  return grad.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(metricops, CUDA, m) {
  m.impl("semihard_triplet_streaming", &semihard_triplet_streaming_cuda);
  m.impl("semihard_triplet_streaming_backward", &semihard_triplet_streaming_backward_cuda);
  m.impl("batch_all_triplet_streaming", &batch_all_triplet_streaming_cuda);
  m.impl("batch_all_triplet_streaming_backward", &batch_all_triplet_streaming_backward_cuda);
}

}  // namespace cuda
}  // namespace metricops
