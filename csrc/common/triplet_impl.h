// Host-side parts of the triplet ops shared by the CPU and CUDA kernels:
// argument checks and input preparation, the batch-hard backward's inputs
// (its per-anchor coefficients come from common/triplet.h; each device
// assembles the O(B·D) gather/scatter itself), and the distance backward of
// the semi-hard and streaming ops through pairwise_distance_backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/distance.h"
#include "common/op_calls.h"
#include "common/precision.h"
#include "common/triplet.h"

namespace metricops {

// The mining and loss ops on a labelled batch: (B, D) embeddings, (B,) labels, a finite margin.
inline void check_labelled_batch_inputs(const at::Tensor& embeddings, const at::Tensor& labels, double margin) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be a finite number, got ", margin);
}

// A labelled batch, checked: contiguous embeddings and int64 labels.
struct LabelledBatch {
  Metric metric;
  at::Tensor x;       // (B, D) contiguous
  at::Tensor labels;  // (B,) int64 contiguous
  int64_t B;
};

inline LabelledBatch prepare_labelled_batch(const at::Tensor& embeddings, const at::Tensor& labels, double margin,
                                            c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_labelled_batch_inputs(embeddings, labels, margin);
  return {metric, embeddings.contiguous(), labels_int64(labels), embeddings.size(0)};
}

inline MiningStrategy parse_strategy(c10::string_view name) {
  if (name == "all") return MiningStrategy::All;
  if (name == "violating") return MiningStrategy::Violating;
  if (name == "semihard") return MiningStrategy::Semihard;
  if (name == "hard") return MiningStrategy::Hard;
  if (name == "easy") return MiningStrategy::Easy;
  if (name == "batch_hard") return MiningStrategy::BatchHard;
  TORCH_CHECK_VALUE(false,
                    "strategy must be one of 'all', 'violating', 'semihard', 'hard', 'easy', 'batch_hard', got '",
                    std::string(name), "'");
}

// Refuses (ValueError) an index tensor with an entry outside [-1, B). One
// host sync: run only where the caller may sync (not during a CUDA graph
// capture; the kernels then skip out-of-range entries instead).
inline void check_index_range(const at::Tensor& index, int64_t B, const char* op, const char* name) {
  if (index.numel() == 0) return;
  const bool in_range = index.ge(-1).logical_and_(index.lt(B)).all().item<bool>();
  TORCH_CHECK_VALUE(in_range, op, ": ", name, " must hold indices in [-1, ", B,
                    ") (-1: no triplet), got a value outside that range");
}

// ---------------------------------------------------------------- batch-hard backward
//
// grad[a] += anchor_self x[a] - cross_positive x[p] - cross_negative x[n]
// grad[p] += positive_self x[p] - cross_positive x[a]   (likewise n)
// with the per-anchor coefficients of batch_hard_anchor_coefficients.

struct BatchHardGradInputs {
  at::Tensor grad_losses, grad_dist_ap, grad_dist_an, positive, negative, dist_ap, dist_an, aux;  // contiguous
  double margin;
  Metric metric;
  bool soft;
};

struct BatchHardGradCoefficients {
  at::Tensor anchor_self, cross_positive, cross_negative, positive_self, negative_self;  // (B,) acc dtype
};

// Checks batch_hard_triplet_backward's arguments. A direct torch.ops call
// with a foreign index is refused with a ValueError (a device-side assert
// would poison the CUDA context for the rest of the process) when may_sync;
// where no host sync may run (a CUDA graph capture) the kernels treat such
// an index as "no triplet" and never read through it.
inline Metric check_batch_hard_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                               const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                               const at::Tensor& positive, const at::Tensor& negative,
                                               const at::Tensor& dist_ap, const at::Tensor& dist_an,
                                               c10::string_view metric_name, bool may_sync) {
  const Metric metric = parse_metric(metric_name);
  check_embeddings(embeddings, "embeddings");
  const int64_t B = embeddings.size(0);
  for (const at::Tensor* t : {&grad_losses, &grad_dist_ap, &grad_dist_an, &positive, &negative, &dist_ap, &dist_an}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B,
                      "batch_hard_triplet_backward: every per-anchor input must have shape (", B, ",), got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == embeddings.device(), "batch_hard_triplet_backward: inputs must be on ",
                      embeddings.device(), ", got ", t->device());
  }
  TORCH_CHECK_TYPE(positive.scalar_type() == at::kLong && negative.scalar_type() == at::kLong,
                   "batch_hard_triplet_backward: positive and negative must be int64");
  if (may_sync) {
    check_index_range(positive, B, "batch_hard_triplet_backward", "positive");
    check_index_range(negative, B, "batch_hard_triplet_backward", "negative");
  }
  return metric;
}

// The per-anchor inputs in aux's dtype (the accumulation dtype), contiguous;
// aux: the device's row aux of the embeddings the distances were taken on.
inline BatchHardGradInputs batch_hard_grad_inputs(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                                  const at::Tensor& grad_dist_an, const at::Tensor& positive,
                                                  const at::Tensor& negative, const at::Tensor& dist_ap,
                                                  const at::Tensor& dist_an, const at::Tensor& aux, double margin,
                                                  Metric metric, bool soft) {
  const at::ScalarType acc = aux.scalar_type();
  return {grad_losses.to(acc).contiguous(),
          grad_dist_ap.to(acc).contiguous(),
          grad_dist_an.to(acc).contiguous(),
          positive.contiguous(),
          negative.contiguous(),
          dist_ap.to(acc).contiguous(),
          dist_an.to(acc).contiguous(),
          aux,
          margin,
          metric,
          soft};
}

// Uninitialised (B,) coefficients in x's dtype, for a kernel to fill.
inline BatchHardGradCoefficients empty_batch_hard_coefficients(const at::Tensor& x) {
  BatchHardGradCoefficients c;
  for (at::Tensor* t : {&c.anchor_self, &c.cross_positive, &c.cross_negative, &c.positive_self, &c.negative_self}) {
    *t = at::empty({x.size(0)}, x.options());
  }
  return c;
}

// ---------------------------------------------------------------- semi-hard backward

// may_sync: whether the host check of `negative` may run (see
// check_index_range); semihard_coefficients_row skips foreign indices.
inline void check_semihard_backward_inputs(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_dist,
                                           const at::Tensor& embeddings, const at::Tensor& losses,
                                           const at::Tensor& negative, const at::Tensor& dist, bool may_sync) {
  check_embeddings(embeddings, "embeddings");
  const int64_t B = embeddings.size(0);
  std::vector<const at::Tensor*> matrices = {&grad_losses, &losses, &negative, &dist};
  // grad_dist seeds the coefficient matrix, which is indexed as B×B.
  if (grad_dist.has_value()) matrices.push_back(&*grad_dist);
  for (const at::Tensor* t : matrices) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == B,
                      "semihard_triplet_backward: every matrix input must have shape (", B, ", ", B, "), got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == embeddings.device(), "semihard_triplet_backward: inputs must be on ",
                      embeddings.device(), ", got ", t->device());
  }
  TORCH_CHECK_TYPE(negative.scalar_type() == at::kLong, "semihard_triplet_backward: negative must be int64");
  // The coefficients are written at (a, negative[a, p]): a foreign index from
  // a direct torch.ops call must be refused, not written out of bounds.
  if (may_sync) check_index_range(negative, B, "semihard_triplet_backward", "negative");
}

// pairwise_distance_backward of the self-distance matrix: the gradient of x.
inline at::Tensor self_distance_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dist,
                                         c10::string_view metric) {
  return std::get<0>(pairwise_distance_backward_op(grad, x, std::nullopt, dist, metric));
}

// ---------------------------------------------------------------- streaming backwards

// Adds to `grad` (B, D) the gradient of sum(coef * dist_rows), where
// dist_rows (rows, B) are rows [row_begin, row_begin + rows) of the
// self-distance matrix of x: pairwise_distance_backward of those rows against
// all of x gives both the rows' side and the columns' side. Streaming
// backwards call it block by block, so the B×B matrix is never held.
inline void accumulate_distance_rows_backward(const at::Tensor& coef, const at::Tensor& x, const at::Tensor& dist_rows,
                                              int64_t row_begin, c10::string_view metric, at::Tensor& grad) {
  const int64_t rows = coef.size(0);
  auto [grad_rows, grad_cols] = pairwise_distance_backward_op(coef, x.narrow(0, row_begin, rows), x, dist_rows, metric);
  grad.narrow(0, row_begin, rows).add_(grad_rows);
  grad.add_(grad_cols);
}

// Checks of a streaming triplet backward: `grad` must have `shape` (the
// forward output's) on the embeddings' device. Returns the prepared batch.
inline LabelledBatch prepare_streaming_backward(const char* op, const at::Tensor& grad, at::IntArrayRef shape,
                                                const at::Tensor& embeddings, const at::Tensor& labels, double margin,
                                                c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_labelled_batch_inputs(embeddings, labels, margin);
  TORCH_CHECK_VALUE(grad.sizes() == shape, op, ": grad must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == embeddings.device(), op, ": grad must be on ", embeddings.device(), ", got ",
                    grad.device());
  return {metric, embeddings.contiguous(), labels_int64(labels), embeddings.size(0)};
}

}  // namespace metricops
