// Device-generic parts of the triplet ops: argument checks, mining
// strategies, and the batch-hard backward, which is a gather/scatter of
// O(B·D) (each anchor touches one positive and one negative) built from
// per-anchor coefficients that a device kernel computes with common/triplet.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/distance.h"
#include "common/normalize.h"
#include "common/triplet.h"

namespace metricops {

inline void check_triplet_inputs(const at::Tensor& embeddings, const at::Tensor& labels, double margin) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be a finite number, got ", margin);
}

enum class MiningStrategy { All, Violating, Semihard, Hard, Easy, BatchHard };

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

// Whether a valid triplet with m = d_an - d_ap is selected.
template <typename T>
C10_HOST_DEVICE inline bool strategy_selects(MiningStrategy strategy, T m, T margin) {
  switch (strategy) {
    case MiningStrategy::All:
      return true;
    case MiningStrategy::Violating:
      return m <= margin;
    case MiningStrategy::Semihard:
      return m > T(0) && m <= margin;
    case MiningStrategy::Hard:
      return m <= T(0);
    case MiningStrategy::Easy:
      return m > margin;
    default:
      return false;
  }
}

// Whether a saved positive/negative index names a row of a batch of B: a
// direct torch.ops call may pass any value, and a kernel that cannot refuse
// it (a CUDA graph capture skips the host check) treats it as "no triplet".
C10_HOST_DEVICE inline bool index_in_batch(int64_t index, int64_t B) { return index >= 0 && index < B; }

// Refuses (ValueError) an index tensor with an entry outside [-1, B). One
// host sync: run only where the caller may sync (not during a CUDA graph
// capture; the kernels then skip out-of-range entries instead).
inline void check_index_range(const at::Tensor& index, int64_t B, const char* op, const char* name) {
  if (index.numel() == 0) return;
  const bool in_range = index.ge(-1).logical_and_(index.lt(B)).all().item<bool>();
  TORCH_CHECK_VALUE(in_range, op, ": ", name, " must hold indices in [-1, ", B,
                    ") (-1: no triplet), got a value outside that range");
}

// Per-anchor backward coefficients of batch-hard. With c_p, c_n the
// gradients reaching d_ap, d_an:
//   grad[a] += anchor_self * x[a] - cross_positive * x[p] - cross_negative * x[n]
//   grad[p] += positive_self * x[p] - cross_positive * x[a]
//   grad[n] += negative_self * x[n] - cross_negative * x[a]
template <typename T>
C10_HOST_DEVICE inline void batch_hard_anchor_coefficients(Metric metric, int64_t B, int64_t a, int64_t p, int64_t n, T g,
                                                           T g_ap, T g_an, T d_ap, T d_an, const T* aux, T margin,
                                                           bool soft, T& anchor_self, T& cross_positive,
                                                           T& cross_negative, T& positive_self, T& negative_self) {
  if (!index_in_batch(p, B) || !index_in_batch(n, B)) {  // no triplet (or a foreign index: no term)
    anchor_self = cross_positive = cross_negative = positive_self = negative_self = T(0);
    return;
  }
  const T t = triplet_term_grad(d_ap, d_an, margin, soft);
  const T c_p = g * t + g_ap;
  const T c_n = -g * t + g_an;
  T q_p = T(0), q_n = T(0);
  distance_grad_weights<T>(metric, c_p, d_ap, aux[a], aux[p], cross_positive, q_p);
  distance_grad_weights<T>(metric, c_n, d_an, aux[a], aux[n], cross_negative, q_n);
  anchor_self = norm_term_scale<T>(metric, aux[a]) * (q_p + q_n);
  positive_self = norm_term_scale<T>(metric, aux[p]) * q_p;
  negative_self = norm_term_scale<T>(metric, aux[n]) * q_n;
}

struct BatchHardGradInputs {
  at::Tensor grad_losses, grad_dist_ap, grad_dist_an, positive, negative, dist_ap, dist_an, aux;  // contiguous
  double margin;
  Metric metric;
  bool soft;
};

struct BatchHardGradCoefficients {
  at::Tensor anchor_self, cross_positive, cross_negative, positive_self, negative_self;  // (B,) acc dtype
};

// Kernels must provide:
//   Tensor row_norms(const Tensor& x)  -> (B,) ||x_i||, for normalize=True
//   Tensor row_aux(const Tensor& x, Metric, const Tensor& norm)  -> (B,) acc dtype
//     (norm defined: the row aux of y = F.normalize(x), from the norms)
//   void batch_hard_coefficients(const BatchHardGradInputs&, BatchHardGradCoefficients&)
//   bool may_sync()  -> whether a host check (one sync) may run now
//   Tensor batch_hard_assemble(const Tensor& x, const Tensor& positive, const Tensor& negative,
//                              const BatchHardGradCoefficients&, const Tensor& norm)  -> (B, D) acc dtype
//     grad[a] += anchor_self x[a] - cross_positive x[p] - cross_negative x[n]
//     grad[p] += positive_self x[p] - cross_positive x[a]   (likewise n)
//     (norm defined: the same in y = F.normalize(x), then through F.normalize's backward)

// The gather/scatter through ATen (index_add_: atomics on CUDA, with a
// deterministic path under torch.use_deterministic_algorithms).
inline at::Tensor batch_hard_assemble_aten(const at::Tensor& x, const at::Tensor& positive, const at::Tensor& negative,
                                           const BatchHardGradCoefficients& c) {
  // Anchors without a triplet point at themselves with zero coefficients, so
  // no index is ever out of range (a foreign index that a capture let
  // through counts as "no triplet", as in batch_hard_anchor_coefficients).
  const int64_t B = x.size(0);
  const at::Tensor self_index = at::arange(B, positive.options());
  const at::Tensor pos = at::where(positive.ge(0).logical_and_(positive.lt(B)), positive, self_index);
  const at::Tensor neg = at::where(negative.ge(0).logical_and_(negative.lt(B)), negative, self_index);
  const at::Tensor x_pos = x.index_select(0, pos);
  const at::Tensor x_neg = x.index_select(0, neg);
  const at::Tensor w_p = c.cross_positive.unsqueeze(1), w_n = c.cross_negative.unsqueeze(1);
  at::Tensor grad = x.mul(c.anchor_self.unsqueeze(1)).sub_(x_pos.mul(w_p)).sub_(x_neg.mul(w_n));
  grad.index_add_(0, pos, x_pos.mul(c.positive_self.unsqueeze(1)).sub_(x.mul(w_p)));
  grad.index_add_(0, neg, x_neg.mul(c.negative_self.unsqueeze(1)).sub_(x.mul(w_n)));
  return grad;
}
template <class Kernels>
at::Tensor batch_hard_triplet_backward_impl(const at::Tensor& grad_losses, const at::Tensor& grad_dist_ap,
                                            const at::Tensor& grad_dist_an, const at::Tensor& embeddings,
                                            const at::Tensor& positive, const at::Tensor& negative,
                                            const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin,
                                            c10::string_view metric_name, bool soft, bool normalize) {
  const Metric metric = parse_metric(metric_name);
  check_embeddings(embeddings, "embeddings");
  const int64_t B = embeddings.size(0);
  for (const at::Tensor* t : {&grad_losses, &grad_dist_ap, &grad_dist_an, &positive, &negative, &dist_ap, &dist_an}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, "batch_hard_triplet_backward: every per-anchor input must have shape (",
                      B, ",), got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == embeddings.device(), "batch_hard_triplet_backward: inputs must be on ",
                      embeddings.device(), ", got ", t->device());
  }
  TORCH_CHECK_TYPE(positive.scalar_type() == at::kLong && negative.scalar_type() == at::kLong,
                   "batch_hard_triplet_backward: positive and negative must be int64");
  if (B == 0) return at::zeros_like(embeddings);
  // A direct torch.ops call with a foreign index is refused with a
  // ValueError (a device-side assert would poison the CUDA context for the
  // rest of the process). Where no host sync may run (a CUDA graph capture),
  // the kernels treat such an index as "no triplet" and never read through it.
  if (Kernels::may_sync()) {
    check_index_range(positive, B, "batch_hard_triplet_backward", "positive");
    check_index_range(negative, B, "batch_hard_triplet_backward", "negative");
  }
  const at::ScalarType acc = (embeddings.scalar_type() == at::kHalf || embeddings.scalar_type() == at::kBFloat16)
                                 ? at::kFloat
                                 : embeddings.scalar_type();
  const at::Tensor x = embeddings.to(acc).contiguous();
  const at::Tensor norm = normalize ? Kernels::row_norms(x) : at::Tensor();  // computed once, used twice
  BatchHardGradInputs in{grad_losses.to(acc).contiguous(), grad_dist_ap.to(acc).contiguous(),
                         grad_dist_an.to(acc).contiguous(), positive.contiguous(), negative.contiguous(),
                         dist_ap.to(acc).contiguous(), dist_an.to(acc).contiguous(),
                         Kernels::row_aux(x, metric, norm).to(acc), margin, metric, soft};
  BatchHardGradCoefficients c;
  for (at::Tensor* t : {&c.anchor_self, &c.cross_positive, &c.cross_negative, &c.positive_self, &c.negative_self}) {
    *t = at::empty({B}, x.options());
  }
  Kernels::batch_hard_coefficients(in, c);
  at::Tensor grad = Kernels::batch_hard_assemble(x, in.positive, in.negative, c, norm);
  return grad.to(embeddings.scalar_type());
}

// Whether the semi-hard term of a pair with chosen negative n and loss l
// passes a gradient: a valid pair (n >= 0) whose hinge is active. relu' is 0
// at 0, as autograd takes it; NaN terms pass their gradient on.
template <typename T>
C10_HOST_DEVICE inline bool semihard_term_has_gradient(int64_t n, T l) {
  return n >= 0 && (l > T(0) || l != l);
}

// Semi-hard's gradient w.r.t. the distance matrix, row a only (rows are
// independent: both (a, p) and (a, n*) lie in row a, so no atomics).
// coef may be wider than T (float32 for float16/bfloat16 on CUDA).
template <typename T, typename acc_t = T>
C10_HOST_DEVICE inline void semihard_coefficients_row(int64_t a, int64_t B, const T* grad_losses, const T* losses,
                                                      const int64_t* negative, acc_t* coef) {
  for (int64_t p = 0; p < B; ++p) {
    const int64_t idx = a * B + p;
    const int64_t n = negative[idx];
    if (n >= B || !semihard_term_has_gradient(n, static_cast<acc_t>(losses[idx]))) continue;  // n >= B: foreign
    const acc_t g = static_cast<acc_t>(grad_losses[idx]);
    coef[idx] += g;
    coef[a * B + n] -= g;
  }
}

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

// l2_normalize and its backward through the dispatcher (their kernels live
// in another translation unit), with the losses' eps.
inline std::tuple<at::Tensor, at::Tensor> l2_normalize_op(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metricops::l2_normalize", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double)>();
  return op.call(x, kNormalizeEps);
}

inline at::Tensor l2_normalize_backward_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metricops::l2_normalize_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad, x, norm, kNormalizeEps);
}

// pairwise_distance_backward through the dispatcher (its kernels live in
// another translation unit); returns the gradient of x when y is None.
inline at::Tensor self_distance_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dist,
                                         c10::string_view metric) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metricops::pairwise_distance_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                                 c10::string_view)>();
  return std::get<0>(op.call(grad, x, std::nullopt, dist, metric));
}

// Adds to `grad` (B, D) the gradient of sum(coef * dist_rows), where
// dist_rows (rows, B) are rows [row_begin, row_begin + rows) of the
// self-distance matrix of x: pairwise_distance_backward of those rows against
// all of x gives both the rows' side and the columns' side. Streaming
// backwards call it block by block, so the B×B matrix is never held.
inline void accumulate_distance_rows_backward(const at::Tensor& coef, const at::Tensor& x, const at::Tensor& dist_rows,
                                              int64_t row_begin, c10::string_view metric, at::Tensor& grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metricops::pairwise_distance_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                                 c10::string_view)>();
  const int64_t rows = coef.size(0);
  auto [grad_rows, grad_cols] = op.call(coef, x.narrow(0, row_begin, rows), x, dist_rows, metric);
  grad.narrow(0, row_begin, rows).add_(grad_rows);
  grad.add_(grad_cols);
}

// Checks of a streaming triplet backward: `grad` must have `shape` (the
// forward output's) on the embeddings' device.
inline void check_streaming_backward_inputs(const char* op, const at::Tensor& grad, at::IntArrayRef shape,
                                            const at::Tensor& embeddings, const at::Tensor& labels, double margin) {
  check_triplet_inputs(embeddings, labels, margin);
  TORCH_CHECK_VALUE(grad.sizes() == shape, op, ": grad must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == embeddings.device(), op, ": grad must be on ", embeddings.device(), ", got ",
                    grad.device());
}

}  // namespace metricops
