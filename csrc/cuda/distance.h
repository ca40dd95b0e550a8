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

// Rows [row_begin, row_begin + out.size(0)) of that matrix, written into
// `out` (rows, B) of the accumulation dtype; `aux` is row_aux_acc_cuda(x).
// Lets kernels stream the matrix through a bounded buffer.
void self_distance_rows_acc_cuda(const at::Tensor& x, const at::Tensor& aux, int64_t row_begin, Metric metric,
                                 at::Tensor& out);

// (B,) row_aux of x in the accumulation dtype.
at::Tensor row_aux_acc_cuda(const at::Tensor& x, Metric metric);

}  // namespace cuda
}  // namespace metricops
