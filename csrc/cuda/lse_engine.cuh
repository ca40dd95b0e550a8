// The CUDA tile driver of the streaming log-sum-exp engine: the CPU driver's
// (cpu/lse_engine.h) structure on the GPU. Each strip chunk of S is one
// cuBLAS GEMM (at::mm_out on slices, current stream) into a reused float32/
// float64 buffer, followed by epilogue kernels that call the same policy
// functions as the CPU (common/lse_stats.h): one warp per row (row
// statistics), one thread per column (column statistics: the rows j >= r1 in
// the self mode), and an elementwise backward kernel turning S into dL/dS in
// place before two GEMMs apply it. Inputs are converted to the accumulation
// dtype once (float16/bfloat16 -> float32: O((B + M)·D) extra), statistics
// are float32 (float64 for float64).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/lse_heads.h"
#include "common/lse_stats.h"
#include "cuda/cuda_helpers.h"

namespace metricops {
namespace cuda {
namespace lse_engine {

using namespace ::metricops::lse;

// Tiles: strips of 1024 rows, chunks of up to 64M entries (256 MiB of float32).
constexpr int64_t kDefaultBlockRows = 1024;
constexpr int64_t kDefaultTileEntries = int64_t{1} << 26;

// Device pointers of one problem (see cpu/lse_engine.h Problem).
template <typename acc_t>
struct DeviceProblem {
  const int64_t* row_keys;
  const int64_t* col_keys;
  const acc_t* params;  // (B, num_params) or nullptr
  int64_t num_params;
  bool self;
  // normalize=True: 1/max(||row||, eps) of x's rows (B,) and y's (M,; the same
  // in the self mode), by which each raw entry of x yᵀ is scaled; else nullptr.
  const acc_t* row_inv_norm;
  const acc_t* col_inv_norm;
  // a distance policy, else both nullptr: -||x̂||²/2 per row of x and of y (-1/2 for unit rows), added to
  // each s_ij (see cpu/lse_engine.h Problem::row_offset)
  const acc_t* row_offset;
  const acc_t* col_offset;
  // The op's 0-dim scale (1/temperature), read by the kernels: reading it on the host would sync the device on
  // every call and fail a CUDA-graph capture.
  const acc_t* scale;
  C10_DEVICE acc_t entry_scale(int64_t i, int64_t col) const {
    return row_inv_norm ? row_inv_norm[i] * col_inv_norm[col] : acc_t(1);
  }
  // s_ij from the raw product x_i · y_col
  C10_DEVICE acc_t similarity(acc_t raw, int64_t i, int64_t col) const {
    const acc_t s = raw * entry_scale(i, col);
    return row_offset ? s + (row_offset[i] + col_offset[col]) : s;
  }
  C10_DEVICE ParamView<acc_t> row_params(int64_t i) const { return {params, 1, i * num_params}; }
  C10_DEVICE ParamView<acc_t> col_params(int64_t j) const { return {self ? params : nullptr, 1, j * num_params}; }
};

template <typename Policy, typename = void>
struct has_scale : std::false_type {};
template <typename Policy>
struct has_scale<Policy, std::void_t<decltype(std::declval<Policy&>().scale)>> : std::true_type {};
// the policies with_policy builds from the op's scale
static_assert(has_scale<ScaledPolicy<float, false>>::value && has_scale<ScaledPolicy<float, true>>::value &&
              has_scale<NTXentPairsPolicy<float>>::value && !has_scale<CirclePolicy<float>>::value);

// The policy as the kernels use it: with the scale from the device (the host built it with a NaN placeholder, so
// a kernel that forgot this would turn every statistic into NaN).
template <typename Policy, typename acc_t>
C10_DEVICE inline Policy with_device_scale(Policy p, const DeviceProblem<acc_t>& pr) {
  if constexpr (has_scale<Policy>::value) p.scale = *pr.scale;
  return p;
}

inline void tile_shape(int64_t B, int64_t M, bool self, int64_t block_rows, int64_t block_cols, int64_t& R,
                       int64_t& W) {
  R = std::min(block_rows > 0 ? block_rows : kDefaultBlockRows, std::max<int64_t>(B, 1));
  W = block_cols > 0 ? block_cols : std::max<int64_t>(kDefaultTileEntries / R, R);
  if (self) W = std::max(W, R);
  W = std::max<int64_t>(std::min(W, std::max<int64_t>(M, 1)), 1);
  R = std::max<int64_t>(R, 1);
}

template <typename acc_t>
__global__ void acc_init_kernel(acc_t* acc, int64_t n) {
  METRICOPS_CUDA_KERNEL_LOOP(i, n) { acc_init(acc + i * kNumAcc); }
}

template <typename acc_t>
__global__ void finalize_kernel(const acc_t* acc, int64_t n, acc_t* stats) {
  METRICOPS_CUDA_KERNEL_LOOP(i, n) { acc_finalize(acc + i * kNumAcc, stats + i * kNumStats); }
}

// The loss head's term of each finished row (common/lse_heads.h).
template <typename acc_t>
__global__ void head_kernel(acc_t* stats, int64_t n, HeadSpec<acc_t> h) {
  METRICOPS_CUDA_KERNEL_LOOP(i, n) { head_finalize(stats + i * kNumStats, h); }
}

// grad_coefficients per row, the head's term included, stored structure-of-arrays (kNumGrad × n).
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* stats, const acc_t* grad_stats, int64_t n, HeadSpec<acc_t> h,
                                    acc_t* out) {
  METRICOPS_CUDA_KERNEL_LOOP(i, n) {
    acc_t row[kNumGrad];
    const acc_t* grad_row = grad_stats ? grad_stats + i * kNumStats : nullptr;
    grad_coefficients(stats + i * kNumStats, grad_row, row);
    head_grad_coefficients(stats + i * kNumStats, grad_row, h, row);
    for (int f = 0; f < kNumGrad; ++f) out[f * n + i] = row[f];
  }
}

// One warp per strip row: the row's entries of the chunk (columns c0..c0+cols)
// merged into its accumulator.
template <typename Policy, typename acc_t>
__global__ void rows_forward_kernel(Policy policy, DeviceProblem<acc_t> pr, const acc_t* __restrict__ S, int64_t rows,
                                    int64_t cols, int64_t r0, int64_t c0, acc_t* __restrict__ row_acc) {
  const Policy p = with_device_scale(policy, pr);
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t i = r0 + r;
    const int64_t rk = pr.row_keys[i];
    const ParamView<acc_t> own = pr.row_params(i);
    acc_t a[kNumAcc];
    acc_init(a);
    for (int64_t j = lane; j < cols; j += 32) {
      const int64_t col = c0 + j;
      if (pr.self && col == i) continue;
      const acc_t s = pr.similarity(S[r * cols + j], i, col);
      const bool pos = pr.col_keys[col] == rk;
      const ParamView<acc_t> other = pr.col_params(col);
      if (!p.keep(s, pos, own, other)) continue;
      acc_t phi, lin, aux, dsc;
      p.eval(s, pos, own, other, phi, lin, aux, dsc);
      acc_add(a, pos, s, phi, lin, aux, dsc, Policy::kLse, Policy::kMinMax);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      acc_t b[kNumAcc];
      for (int f = 0; f < kNumAcc; ++f) b[f] = __shfl_down_sync(0xffffffff, a[f], offset);
      acc_merge(a, b);
    }
    if (lane == 0) acc_merge(row_acc + i * kNumAcc, a);
  }
}

// One thread per chunk column j >= jfirst: its entries in the strip's rows
// seen from the column, merged into col_acc (global column c0 + j).
template <typename Policy, typename acc_t>
__global__ void cols_forward_kernel(Policy policy, DeviceProblem<acc_t> pr, const acc_t* __restrict__ S, int64_t rows,
                                    int64_t cols, int64_t r0, int64_t c0, int64_t jfirst, acc_t* __restrict__ col_acc) {
  const Policy p = with_device_scale(policy, pr);
  METRICOPS_CUDA_KERNEL_LOOP(t, cols - jfirst) {
    const int64_t j = jfirst + t, col = c0 + j;
    const int64_t ck = pr.col_keys[col];
    const ParamView<acc_t> own = pr.col_params(col);
    acc_t a[kNumAcc];
    acc_init(a);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t s = pr.similarity(S[r * cols + j], r0 + r, col);
      const bool pos = pr.row_keys[r0 + r] == ck;
      const ParamView<acc_t> other = pr.self ? pr.row_params(r0 + r) : ParamView<acc_t>{};
      if (!p.keep(s, pos, own, other)) continue;
      acc_t phi, lin, aux, dsc;
      p.eval(s, pos, own, other, phi, lin, aux, dsc);
      acc_add(a, pos, s, phi, lin, aux, dsc, Policy::kLse, Policy::kMinMax);
    }
    acc_merge(col_acc + col * kNumAcc, a);
  }
}

template <typename Policy, typename acc_t>
__device__ inline acc_t direction_grad(const Policy& p, acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t> other,
                                       const acc_t* g, int64_t n, int64_t k) {
  acc_t phi, dphi, dlin;
  p.grad(s, pos, own, other, phi, dphi, dlin);
  acc_t d = g[(pos ? kGGradLinPos : kGGradLinNeg) * n + k] * dlin;
  if (Policy::kLse) {
    d += g[(pos ? kGGradLsePos : kGGradLseNeg) * n + k] * lse_exp(phi - g[(pos ? kGLsePos : kGLseNeg) * n + k]) * dphi;
  }
  return d;
}

// S -> dL/dS in place over a strip chunk: the row direction from the rows'
// coefficients (rg, SoA over B rows), plus, for columns j >= col_from, the
// column direction from the columns' coefficients (cg, SoA over ncols).
template <typename Policy, typename acc_t>
__global__ void backward_kernel(Policy policy, DeviceProblem<acc_t> pr, acc_t* __restrict__ S, int64_t rows,
                                int64_t cols, int64_t r0, int64_t c0, const acc_t* __restrict__ rg, int64_t nrows,
                                const acc_t* __restrict__ cg, int64_t ncols, int64_t col_from) {
  const Policy p = with_device_scale(policy, pr);
  METRICOPS_CUDA_KERNEL_LOOP(e, rows * cols) {
    const int64_t r = e / cols, j = e % cols;
    const int64_t i = r0 + r, col = c0 + j;
    const acc_t scale = pr.entry_scale(i, col);  // normalize: dL/ds to the raw rows
    const acc_t s = pr.similarity(S[e], i, col);
    const bool pos = pr.row_keys[i] == pr.col_keys[col];
    const ParamView<acc_t> own = pr.row_params(i);
    const ParamView<acc_t> other = pr.col_params(col);
    acc_t out = acc_t(0);
    if (!(pr.self && col == i) && p.keep(s, pos, own, other)) out = direction_grad(p, s, pos, own, other, rg, nrows, i);
    if (cg && j >= col_from && p.keep(s, pos, other, own)) out += direction_grad(p, s, pos, other, own, cg, ncols, col);
    S[e] = out * scale;
  }
}

// Forward: row_acc (B, kNumAcc) and, non-self with col_acc, column
// accumulators (M, kNumAcc), both acc_init'ed by the caller.
template <typename Policy, typename acc_t>
void forward(const Policy& p, const DeviceProblem<acc_t>& pr, const at::Tensor& x, const at::Tensor& y,
             int64_t block_rows, int64_t block_cols, acc_t* row_acc, acc_t* col_acc) {
  const int64_t B = x.size(0), M = y.size(0);
  if (B == 0 || M == 0) return;
  int64_t R, W;
  tile_shape(B, M, pr.self, block_rows, block_cols, R, W);
  at::Tensor buffer = at::empty({R * W}, x.options());
  acc_t* cacc = pr.self ? row_acc : col_acc;
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(S, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
      const acc_t* sp = S.const_data_ptr<acc_t>();
      rows_forward_kernel<<<grid_for(rows, kThreads / 32), kThreads, 0, current_stream()>>>(p, pr, sp, rows, cols, r0,
                                                                                            c0, row_acc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!cacc) continue;
      const int64_t jfirst = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
      if (jfirst >= cols) continue;
      cols_forward_kernel<<<grid_for(cols - jfirst), kThreads, 0, current_stream()>>>(p, pr, sp, rows, cols, r0, c0,
                                                                                      jfirst, cacc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Backward: grad_x (B, D) and, non-self, grad_y (M, D) (zero-initialised, acc dtype).
template <typename Policy, typename acc_t>
void backward(const Policy& p, const DeviceProblem<acc_t>& pr, const at::Tensor& x, const at::Tensor& y,
              int64_t block_rows, int64_t block_cols, const acc_t* rg, const acc_t* cg, at::Tensor& grad_x,
              at::Tensor* grad_y) {
  const int64_t B = x.size(0), M = y.size(0);
  if (B == 0 || M == 0) return;
  int64_t R, W;
  tile_shape(B, M, pr.self, block_rows, block_cols, R, W);
  at::Tensor buffer = at::empty({R * W}, x.options());
  const acc_t* col_g = pr.self ? rg : cg;
  const int64_t ncols = pr.self ? B : M;
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    const at::Tensor x_rows = x.narrow(0, r0, rows);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(S, x_rows, y.narrow(0, c0, cols).t());
      const int64_t col_from = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
      backward_kernel<<<grid_for(rows * cols), kThreads, 0, current_stream()>>>(
          p, pr, S.mutable_data_ptr<acc_t>(), rows, cols, r0, c0, rg, B, col_g, ncols, col_from);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor y_cols = y.narrow(0, c0, cols);
      if (pr.self) {
        if (col_from > 0) {
          at::Tensor diag = S.narrow(1, 0, col_from);
          diag.add_(diag.t().clone());
        }
        grad_x.narrow(0, r0, rows).addmm_(S, y_cols);
        if (col_from < cols) {
          grad_x.narrow(0, c0 + col_from, cols - col_from).addmm_(S.narrow(1, col_from, cols - col_from).t(), x_rows);
        }
      } else {
        grad_x.narrow(0, r0, rows).addmm_(S, y_cols);
        if (grad_y) grad_y->narrow(0, c0, cols).addmm_(S.t(), x_rows);
      }
    }
  }
}

}  // namespace lse_engine
}  // namespace cuda
}  // namespace metricops
