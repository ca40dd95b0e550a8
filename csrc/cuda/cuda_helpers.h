// Small helpers shared by the CUDA kernels. Narrow includes on purpose: the
// broad torch/extension.h or ATen/cuda/CUDAContext.h triple compile times.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace metricops {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never
// over the 1-D grid limit.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), 65535 * 8)));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Whether a host check (one sync) may run: not while the current stream is
// capturing a CUDA graph (a sync there fails the capture).
inline bool may_sync_now() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// A kernel path chosen by an environment variable, read at each call (tests
// and `make gpu-check` switch it in-process): false for `old_path` (also when
// unset or empty: the default until a GPU run has compared the two), true for
// `new_path`, any other value refused naming the variable.
inline bool env_selects_new_path(const char* variable, const char* old_path, const char* new_path) {
  const char* env = std::getenv(variable);
  if (env == nullptr || *env == '\0' || std::strcmp(env, old_path) == 0) return false;
  if (std::strcmp(env, new_path) == 0) return true;
  TORCH_CHECK_VALUE(false, variable, " must be '", old_path, "' or '", new_path, "', got '", env, "'");
}

constexpr int kWarp = 32;

// Rows handled one warp each: blocks of kThreads / 32 warps.
inline unsigned int warp_rows_grid(int64_t rows) {
  const int64_t warps_per_block = kThreads / kWarp;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, warps_per_block), 65535)));
}

// Rows handled one block each.
inline unsigned int block_rows_grid(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535)));
}

#ifdef __CUDACC__
// Sum over a warp by a butterfly; every lane gets the result (lane 0's is
// the same as a shfl_down tree's: each step adds the same two partials).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result
// is valid in thread 0. `shared` holds 32 entries and may be reused at once.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  v = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// The transposed-tile pattern of the symmetric weight kernels: kTile x kTile
// tiles, blocks of (kTile, kTileRows) threads, tile (i0, j0) of the output at
// (blockIdx.y, blockIdx.x).
constexpr int kTile = 32;
constexpr int kTileRows = 8;

// Calls fn(i, j, idx, a_ji, b_ji) for every entry (i, j), idx = i * N + j,
// of this block's tile of the (N, N) matrices a and b, with the mirrored
// entries (j, i) in acc_t: the mirrored tile (rows j0.., columns i0..) is
// staged transposed through shared memory, so every global read stays
// coalesced (the +1 column avoids bank conflicts).
template <typename acc_t, typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_tile_entry_with_mirror(const scalar_t* __restrict__ a,
                                                                const scalar_t* __restrict__ b, int64_t N,
                                                                const Fn& fn) {
  __shared__ acc_t a_t[kTile][kTile + 1];
  __shared__ acc_t b_t[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t row = j0 + r, col = i0 + threadIdx.x;
    if (row < N && col < N) {
      a_t[threadIdx.x][r] = static_cast<acc_t>(a[row * N + col]);
      b_t[threadIdx.x][r] = static_cast<acc_t>(b[row * N + col]);
    }
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t i = i0 + r, j = j0 + threadIdx.x;
    if (i < N && j < N) fn(i, j, i * N + j, a_t[r][threadIdx.x], b_t[r][threadIdx.x]);
  }
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace metricops

// 64-bit grid-stride loop: index tensors of more than 2^31 elements are valid.
#define METRICOPS_CUDA_KERNEL_LOOP(i, n)                                                 \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Rows handled one warp each, in a grid-stride loop (blocks of blockDim.x / 32 warps).
#define METRICOPS_WARP_ROW_LOOP(row, rows)                                                                  \
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; row < (rows); \
       row += static_cast<int64_t>(gridDim.x) * (blockDim.x / 32))

// AT_DISPATCH over the dtypes the CUDA kernels take.
#define METRICOPS_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Device guard of a CUDA entry point, from the device of its first tensor
// argument (`device`: a c10::Device). A call that mixes a CPU and a CUDA
// tensor dispatches here too: a plain CUDAGuard on the CPU device would throw
// "CUDAGuardImpl initialized with non-CUDA DeviceType" before the input checks
// could name the argument, so the guard only switches devices for a CUDA
// device and leaves the mixed call to the checks.
#define METRICOPS_CUDA_DEVICE_GUARD(device)                                                  \
  c10::cuda::OptionalCUDAGuard metricops_device_guard;                                       \
  if (const c10::Device metricops_guard_device = (device); metricops_guard_device.is_cuda()) \
  metricops_device_guard.set_device(metricops_guard_device)
