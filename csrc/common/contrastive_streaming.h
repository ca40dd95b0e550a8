// Shared pieces of the streaming contrastive loss (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"

namespace metricops {

enum class StreamingReduction { Mean, Sum, MeanNonzero };

inline StreamingReduction check_contrastive_streaming_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                                                             c10::string_view reduction) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  if (reduction == "mean") return StreamingReduction::Mean;
  if (reduction == "sum") return StreamingReduction::Sum;
  if (reduction == "mean_nonzero") return StreamingReduction::MeanNonzero;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming' ",
                    "('none' returns the B×B matrix), got '", std::string(reduction), "'");
}

// What the summed terms are divided by: B(B-1) ordered pairs, 1, or the
// number of terms > 0 (0 when none: the loss is then 0).
inline double streaming_denominator(StreamingReduction red, int64_t B, int64_t nonzero) {
  switch (red) {
    case StreamingReduction::Mean:
      return static_cast<double>(B) * static_cast<double>(B - 1);
    case StreamingReduction::Sum:
      return 1.0;
    default:
      return static_cast<double>(nonzero);
  }
}

// Rows per block of the streaming contrastive loss: block_rows when > 0,
// else the device's default (`default_rows`), both at most B and at least 1.
// block_rows <= 0 never means "all B rows": the op promises never to hold
// the B×B matrix.
inline int64_t contrastive_streaming_rows(int64_t block_rows, int64_t B, int64_t default_rows) {
  const int64_t rows = block_rows > 0 ? block_rows : default_rows;
  return std::max<int64_t>(1, std::min(rows, B));
}

// The CPU default: a cache-sized block (metricops/triplet.py's
// _CPU_STREAM_BLOCK_ROWS).
constexpr int64_t kCpuContrastiveStreamingRows = 256;

// The CUDA default: rows of `element_size`-byte distances that fill
// budget_bytes (256 MiB, metricops/triplet.py's _CUDA_STREAM_BLOCK_BYTES).
inline int64_t cuda_contrastive_streaming_default_rows(int64_t B, int64_t element_size,
                                                       int64_t budget_bytes = int64_t{256} << 20) {
  return std::max<int64_t>(1, budget_bytes / (element_size * std::max<int64_t>(B, 1)));
}

// grad / denom on the device (no host sync), 0 where denom is 0.
inline at::Tensor streaming_grad_scale(const at::Tensor& grad, const at::Tensor& denom) {
  return at::where(denom.gt(0), grad.div(denom), at::zeros_like(grad));
}

}  // namespace metricops
