// Shared pieces of the streaming contrastive loss (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/reduction.h"

namespace metricops {

// Checks the inputs; returns the reduction, a scalar one (never None).
inline Reduction check_contrastive_streaming_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                                                    c10::string_view reduction) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  if (reduction == "mean" || reduction == "sum" || reduction == "mean_nonzero") return parse_reduction(reduction);
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming' ",
                    "('none' returns the B×B matrix), got '", std::string(reduction), "'");
}

// The backward's embeddings and labels, checked: contiguous, labels int64; grad (the loss's) and denom (the
// forward's) are 0-dim on the embeddings' device (a wider one broadcast into the gradient).
inline std::tuple<at::Tensor, at::Tensor> prepare_contrastive_streaming_backward(const at::Tensor& grad,
                                                                                 const at::Tensor& embeddings,
                                                                                 const at::Tensor& labels,
                                                                                 const at::Tensor& denom) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  TORCH_CHECK_VALUE(grad.dim() == 0, "grad must be a 0-dim tensor (the loss's gradient), got shape ", grad.sizes());
  TORCH_CHECK_VALUE(denom.dim() == 0, "denom must be a 0-dim tensor (the forward's), got shape ", denom.sizes());
  TORCH_CHECK_VALUE(grad.device() == embeddings.device() && denom.device() == embeddings.device(),
                    "grad and denom must be on the embeddings' device (", embeddings.device(), ")");
  return {embeddings.contiguous(), labels_int64(labels)};
}

// What the summed terms are divided by: B(B-1) ordered pairs, 1, or the
// number of terms > 0 (0 when none: the loss is then 0).
inline double streaming_denominator(Reduction red, int64_t B, int64_t nonzero) {
  switch (red) {
    case Reduction::Mean:
      return static_cast<double>(B) * static_cast<double>(B - 1);
    case Reduction::Sum:
      return 1.0;
    default:
      return static_cast<double>(nonzero);
  }
}

// grad / denom on the device (no host sync), 0 where denom is 0.
inline at::Tensor streaming_grad_scale(const at::Tensor& grad, const at::Tensor& denom) {
  return at::where(denom.gt(0), grad.div(denom), at::zeros_like(grad));
}

}  // namespace metricops
