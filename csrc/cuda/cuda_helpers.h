// Small helpers shared by the CUDA kernels. Narrow includes on purpose: the
// broad torch/extension.h or ATen/cuda/CUDAContext.h triple compile times.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

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

}  // namespace cuda
}  // namespace metricops

// 64-bit grid-stride loop: index tensors of more than 2^31 elements are valid.
#define METRICOPS_CUDA_KERNEL_LOOP(i, n)                                               \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Device guard of a CUDA entry point, from the device of its first tensor
// argument (`device`: a c10::Device). A call that mixes a CPU and a CUDA
// tensor dispatches here too: a plain CUDAGuard on the CPU device would throw
// "CUDAGuardImpl initialized with non-CUDA DeviceType" before the input checks
// could name the argument, so the guard only switches devices for a CUDA
// device and leaves the mixed call to the checks.
#define METRICOPS_CUDA_DEVICE_GUARD(device)                                         \
  c10::cuda::OptionalCUDAGuard metricops_device_guard;                              \
  if (const c10::Device metricops_guard_device = (device); metricops_guard_device.is_cuda()) \
  metricops_device_guard.set_device(metricops_guard_device)
