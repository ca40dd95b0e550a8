// Row and column sums of an (M, N) matrix whose entries f(i, j) are computed
// on the fly (a functor: the per-element math of common/*.h), never written.
// Deterministic: fixed summation orders, no atomics.
//
// The backwards that need Σ_j p_ij and Σ_i p_ij (pairwise distance, the
// contrastive matrix) used to write p to a B×B buffer and sum it with ATen,
// or sum the columns with one thread per column (N threads: at B = 4096 a
// handful of the SMs). Here the column sums run over chunks of
// kColumnSumRows rows (blocks of kThreads columns × M / kColumnSumRows
// chunks, each thread one column of its chunk: coalesced) into an
// (chunks, N) partial that ATen sums. METRICOPS_CUDA_COLUMN_SUMS selects
// "serial" (the previous kernels, the default until a GPU run has compared
// both: `make gpu-check` does) or "chunked" (these).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {

constexpr int64_t kColumnSumRows = 128;

inline bool chunked_column_sums() { return env_selects_new_path("METRICOPS_CUDA_COLUMN_SUMS", "serial", "chunked"); }

// out[i] = Σ_j f(i, j): one block per row (grid-stride over rows), block_sum.
template <typename acc_t, typename EntryFn>
__global__ void row_sums_kernel(int64_t M, int64_t N, EntryFn f, acc_t* __restrict__ out) {
  __shared__ acc_t shared[kWarp];
  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    acc_t s = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += f(i, j);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) out[i] = s;
  }
}

// partial[c][j] = Σ_{i in chunk c} f(i, j).
template <typename acc_t, typename EntryFn>
__global__ void column_partial_sums_kernel(int64_t M, int64_t N, EntryFn f, acc_t* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kColumnSumRows;
  const int64_t i1 = i0 + kColumnSumRows < M ? i0 + kColumnSumRows : M;
  acc_t s = 0;
  for (int64_t i = i0; i < i1; ++i) s += f(i, j);
  partial[static_cast<int64_t>(blockIdx.y) * N + j] = s;
}

// (M,) row sums, in acc_options' dtype (acc_t).
template <typename acc_t, typename EntryFn>
at::Tensor row_sums(int64_t M, int64_t N, const EntryFn& f, const at::TensorOptions& acc_options) {
  at::Tensor out = at::empty({M}, acc_options);
  if (M == 0) return out;
  row_sums_kernel<acc_t><<<block_rows_grid(M), kThreads, 0, current_stream()>>>(M, N, f, out.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (N,) column sums, in acc_options' dtype (acc_t).
template <typename acc_t, typename EntryFn>
at::Tensor column_sums(int64_t M, int64_t N, const EntryFn& f, const at::TensorOptions& acc_options) {
  const int64_t chunks = std::max<int64_t>(1, ceil_div(M, kColumnSumRows));
  TORCH_CHECK(chunks <= 65535, "metricops: column sums over ", M, " rows exceed the grid's y limit");
  at::Tensor partial = at::empty({chunks, N}, acc_options);
  if (N > 0) {
    const dim3 grid(static_cast<unsigned int>(ceil_div(N, kThreads)), static_cast<unsigned int>(chunks));
    column_partial_sums_kernel<acc_t>
        <<<grid, kThreads, 0, current_stream()>>>(M, N, f, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return partial.sum(0);
}

}  // namespace cuda
}  // namespace metricops
