// Device-generic orchestration of contrastive_loss.
//
// One Gram GEMM (ATen: BLAS / cuBLAS), then one fused epilogue that turns
// each Gram entry into distance, hinge term and the per-pair gradient
// weight. The backward is one more GEMM in the coefficient form of
// pairwise_distance_backward:
//     grad_x = row_coef[:, None] * x - W @ x
// For the scalar reductions W and row_coef are computed by the forward (for a
// unit upstream gradient; the backward only scales), so the backward holds no
// B×B matrix besides W. reduction="none" keeps the distance matrix instead and
// the backward builds W from the (B, B) upstream gradient in one pass.
//
// `Kernels` (cpu/ or cuda/) provides, with the math of common/hinge.h and
// common/distance.h:
//   Tensor row_aux(x, Metric)
//   void contrastive_reduce_forward(dot, x, aux, labels, ContrastiveArgs, W, row_loss, row_nnz, row_coef)
//   void contrastive_none_forward(dot, x, aux, labels, ContrastiveArgs, loss, dist)
// (x: the embeddings, for the exactness guard of common/distance.h)
//   void contrastive_none_backward(grad, dist, aux, labels, ContrastiveArgs, W, row_coef)
// All tensors handed to Kernels are contiguous; labels are int64.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/hinge.h"
#include "common/precision.h"
#include "common/reduction.h"

namespace metricops {

struct ContrastiveArgs {
  double pos_margin;
  double neg_margin;
  Metric metric;
  bool squared;
};

// Returns (loss, aux, row_coef, denom):
//   scalar reductions: loss (), aux = W (B, B) acc dtype for a unit upstream
//                      gradient, row_coef (B,) acc dtype, denom () acc dtype
//                      (0: no term);
//   "none":            loss (B, B), aux = distances (B, B), row_coef (0,), denom ().
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_impl(
    const at::Tensor& x_in, const at::Tensor& labels, double pos_margin, double neg_margin,
    c10::string_view metric_name, bool squared, c10::string_view reduction_name) {
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  check_embeddings(x_in, "embeddings");
  check_labels(labels, x_in);
  check_not_nan_arg(pos_margin, "pos_margin");
  check_not_nan_arg(neg_margin, "neg_margin");
  const ContrastiveArgs args{pos_margin, neg_margin, metric, squared};
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const auto acc = acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const bool none = reduction == Reduction::None;
  at::Tensor denom = at::zeros({}, acc_opts);
  if (B == 0) {
    at::Tensor loss = none ? at::zeros({0, 0}, x.options()) : at::zeros({}, x.options());
    return {loss, at::zeros({0, 0}, x.options()), at::zeros({none ? 0 : B}, acc_opts), denom};
  }
  at::Tensor dot = gram_acc(x, x);
  at::Tensor aux = Kernels::row_aux(x, metric);
  at::Tensor lab = labels_int64(labels);
  if (none) {
    // The distances overwrite the Gram matrix in place unless the dtypes differ.
    at::Tensor dist = is_low_precision(x) ? at::empty({B, B}, x.options()) : dot;
    at::Tensor loss = at::empty({B, B}, x.options());
    Kernels::contrastive_none_forward(dot, x, aux, lab, args, loss, dist);
    return {loss, dist, at::empty({0}, acc_opts), denom};
  }
  // W overwrites the Gram matrix in place, in the accumulation dtype: its
  // entries (2·slope/d for euclidean, 2·slope/(‖x_i‖‖x_j‖) for cosine) pass
  // float16's range for near pairs or small rows, where the loss and its
  // gradient are finite.
  at::Tensor W = dot;
  at::Tensor row_loss = at::empty({B}, acc_opts);
  at::Tensor row_nnz = at::empty({B}, acc_opts);
  at::Tensor row_coef = at::empty({B}, acc_opts);
  Kernels::contrastive_reduce_forward(dot, x, aux, lab, args, W, row_loss, row_nnz, row_coef);
  at::Tensor total = row_loss.sum();
  if (reduction == Reduction::Sum) {
    denom.fill_(1);
  } else if (reduction == Reduction::Mean) {
    denom.fill_(static_cast<double>(B) * static_cast<double>(B - 1));
  } else {
    denom = row_nnz.sum();
  }
  // No valid term: the total itself, 0 (the backward scales the gradient by 0 as well), or NaN from a NaN term,
  // which mean_nonzero does not count (NaN > 0 is false), as the streaming path and the reference give.
  at::Tensor loss = total.div(denom.clamp_min(1)).to(x.scalar_type());
  return {loss, W, row_coef, denom};
}

template <class Kernels>
at::Tensor contrastive_loss_backward_impl(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& labels,
                                          const at::Tensor& aux_mat, const at::Tensor& row_coef_in,
                                          const at::Tensor& denom, double pos_margin, double neg_margin,
                                          c10::string_view metric_name, bool squared, c10::string_view reduction_name) {
  const Metric metric = parse_metric(metric_name);
  const Reduction reduction = parse_reduction(reduction_name);
  check_embeddings(x_in, "embeddings");
  check_labels(labels, x_in);
  const ContrastiveArgs args{pos_margin, neg_margin, metric, squared};
  const int64_t B = x_in.size(0);
  TORCH_CHECK_VALUE(aux_mat.dim() == 2 && aux_mat.size(0) == B && aux_mat.size(1) == B,
                    "contrastive_loss_backward: saved matrix must have shape (", B, ", ", B, "), got ",
                    aux_mat.sizes());
  // The saved matrix: W in the accumulation dtype, or the distances ("none")
  // in the embeddings' dtype.
  const auto acc = acc_dtype(x_in);
  const auto mat_dtype = reduction == Reduction::None ? x_in.scalar_type() : acc;
  TORCH_CHECK_VALUE(aux_mat.device() == x_in.device(), "saved matrix must be on the same device as embeddings (",
                    x_in.device(), "), got ", aux_mat.device());
  TORCH_CHECK_TYPE(aux_mat.scalar_type() == mat_dtype, "saved matrix must have dtype ", mat_dtype, " for reduction '",
                   std::string(reduction_name), "' and ", x_in.scalar_type(), " embeddings, got ",
                   aux_mat.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == x_in.device(), "grad must be on the embeddings' device");
  if (B == 0 || x_in.size(1) == 0) return at::zeros_like(x_in);
  const at::Tensor x = x_in.contiguous();
  if (reduction != Reduction::None) {
    TORCH_CHECK_VALUE(grad.dim() == 0, "grad must be a scalar for reduction '", std::string(reduction_name),
                      "', got shape ", grad.sizes());
    TORCH_CHECK_VALUE(row_coef_in.dim() == 1 && row_coef_in.size(0) == B, "row_coef must have shape (", B, ",), got ",
                      row_coef_in.sizes());
    const at::Tensor W = aux_mat.contiguous();
    // Scale computed on device (no host sync); 0 when there was no term.
    at::Tensor d = denom.to(acc);
    at::Tensor scale = at::where(d.gt(0), grad.to(acc).div(d.clamp_min(1)), at::zeros({}, x.options().dtype(acc)));
    const at::Tensor x_acc = x.to(acc);  // W is in the accumulation dtype: so is the GEMM
    at::Tensor gx = scaled_minus_matmul(x_acc.mul(row_coef_in.to(acc).unsqueeze(1)), W, x_acc);
    return gx.mul_(scale).to(x.scalar_type());
  }
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == B, "grad must have shape (", B, ", ", B,
                    ") for reduction 'none', got ", grad.sizes());
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const at::Tensor dist = aux_mat.contiguous();
  at::Tensor aux = Kernels::row_aux(x, metric);
  at::Tensor lab = labels_int64(labels);
  at::Tensor W = at::empty({B, B}, x.options());
  at::Tensor row_coef = at::empty({B}, x.options().dtype(acc));
  Kernels::contrastive_none_backward(g, dist, aux, lab, args, W, row_coef);
  at::Tensor gx = scaled_minus_matmul(x.to(acc).mul(row_coef.unsqueeze(1)), W, x);
  return gx.to(x.scalar_type());
}

}  // namespace metricops
