// Distance helpers that other CUDA kernels build on (cuda/pairwise_distance.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/distance.h"

namespace metricops {
namespace cuda {

// (B, B) self-distance matrix of x in the accumulation dtype (float32 for
// float16/bfloat16): cuBLAS Gram + the shared epilogue, exact 0 diagonal
// for the euclidean metrics.
at::Tensor self_distance_acc_cuda(const at::Tensor& x, Metric metric);

// (B,) row_aux of x in the accumulation dtype.
at::Tensor row_aux_acc_cuda(const at::Tensor& x, Metric metric);

}  // namespace cuda
}  // namespace metricops
