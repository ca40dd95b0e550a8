// Device-generic orchestration of the contrastive and explicit-triplet losses.
//
// contrastive_loss: one Gram GEMM (ATen: BLAS / cuBLAS), then one fused
// epilogue that turns each Gram entry into distance, hinge term and the
// per-pair gradient weight. The backward is one more GEMM in the coefficient
// form of pairwise_distance_backward:
//     grad_x = row_coef[:, None] * x - W @ x
// For the scalar reductions W and row_coef are computed by the forward (for a
// unit upstream gradient; the backward only scales), so the backward holds no
// B×B matrix besides W. reduction="none" keeps the distance matrix instead and
// the backward builds W from the (B, B) upstream gradient in one pass.
//
// pair_contrastive_loss and triplet_margin_loss are row-wise: one fused pass
// per row (no GEMM); the reduction over rows is done by the caller.
//
// `Kernels` (cpu/ or cuda/) provides, with the math of common/hinge.h and
// common/distance.h:
//   Tensor row_aux(x, Metric)
//   void contrastive_reduce_forward(dot, x, aux, labels, ContrastiveArgs, W, row_loss, row_nnz, row_coef)
//   void contrastive_none_forward(dot, x, aux, labels, ContrastiveArgs, loss, dist)
// (x: the embeddings, for the exactness guard of common/distance.h)
//   void contrastive_none_backward(grad, dist, aux, labels, ContrastiveArgs, W, row_coef)
//   void pair_forward(x0, x1, y, PairArgs, loss, dist)
//   void pair_backward(grad, x0, x1, y, dist, PairArgs, grad_x0, grad_x1)
//   void triplet_forward(a, p, n, TripletArgs, loss, dists)
//   void triplet_backward(grad, a, p, n, dists, TripletArgs, grad_a, grad_p, grad_n)
// All tensors handed to Kernels are contiguous; labels are int64.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/hinge.h"
#include "common/pairwise_distance_impl.h"

namespace metricops {

enum class Reduction : int { Mean = 0, Sum = 1, MeanNonzero = 2, None = 3 };

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  if (name == "mean_nonzero") return Reduction::MeanNonzero;
  if (name == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got '",
                    std::string(name), "'");
}

struct ContrastiveArgs {
  double pos_margin;
  double neg_margin;
  Metric metric;
  bool squared;
};

struct PairArgs {
  double margin;
  Metric metric;
  bool squared;
};

struct TripletArgs {
  double margin;
  double p;
  double eps;
  bool swap;
  NormKind kind;
};

inline void check_finite_arg(double v, const char* name) {
  TORCH_CHECK_VALUE(!std::isnan(v), name, " must not be NaN");
}

inline NormKind triplet_norm_kind(double p, bool squared) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, "p must be a finite number > 0, got ", p);
  if (squared) {
    TORCH_CHECK_VALUE(p == 2.0, "squared=True requires p=2 (squared L2 distances), got p=", p);
    return NormKind::SquaredL2;
  }
  if (p == 1.0) return NormKind::L1;
  if (p == 2.0) return NormKind::L2;
  return NormKind::Lp;
}

// ------------------------------------------------------------------ contrastive_loss

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
  check_finite_arg(pos_margin, "pos_margin");
  check_finite_arg(neg_margin, "neg_margin");
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
  at::Tensor lab = labels.to(at::kLong).contiguous();
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
  // No valid term: 0, and the backward scales the gradient by 0 as well.
  at::Tensor loss = at::where(denom.gt(0), total.div(denom.clamp_min(1)), at::zeros({}, acc_opts)).to(x.scalar_type());
  return {loss, W, row_coef, denom};
}

template <class Kernels>
at::Tensor contrastive_loss_backward_impl(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& labels,
                                          const at::Tensor& aux_mat, const at::Tensor& row_coef_in,
                                          const at::Tensor& denom, double pos_margin, double neg_margin,
                                          c10::string_view metric_name, bool squared,
                                          c10::string_view reduction_name) {
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
  TORCH_CHECK_TYPE(aux_mat.scalar_type() == mat_dtype, "saved matrix must have dtype ", mat_dtype,
                   " for reduction '", std::string(reduction_name), "' and ", x_in.scalar_type(),
                   " embeddings, got ", aux_mat.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == x_in.device(), "grad must be on the embeddings' device");
  if (B == 0 || x_in.size(1) == 0) return at::zeros_like(x_in);
  const at::Tensor x = x_in.contiguous();
  if (reduction != Reduction::None) {
    TORCH_CHECK_VALUE(grad.dim() == 0, "grad must be a scalar for reduction '", std::string(reduction_name),
                      "', got shape ", grad.sizes());
    TORCH_CHECK_VALUE(row_coef_in.dim() == 1 && row_coef_in.size(0) == B, "row_coef must have shape (", B,
                      ",), got ", row_coef_in.sizes());
    const at::Tensor W = aux_mat.contiguous();
    // Scale computed on device (no host sync); 0 when there was no term.
    at::Tensor d = denom.to(acc);
    at::Tensor scale = at::where(d.gt(0), grad.to(acc).div(d.clamp_min(1)), at::zeros({}, x.options().dtype(acc)));
    const at::Tensor x_acc = x.to(acc);  // W is in the accumulation dtype: so is the GEMM
    at::Tensor gx = scaled_minus_matmul(x_acc.mul(row_coef_in.to(acc).unsqueeze(1)), W, x_acc);
    return gx.mul_(scale).to(x.scalar_type());
  }
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == B, "grad must have shape (", B, ", ",
                    B, ") for reduction 'none', got ", grad.sizes());
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const at::Tensor dist = aux_mat.contiguous();
  at::Tensor aux = Kernels::row_aux(x, metric);
  at::Tensor lab = labels.to(at::kLong).contiguous();
  at::Tensor W = at::empty({B, B}, x.options());
  at::Tensor row_coef = at::empty({B}, x.options().dtype(acc));
  Kernels::contrastive_none_backward(g, dist, aux, lab, args, W, row_coef);
  at::Tensor gx = scaled_minus_matmul(x.to(acc).mul(row_coef.unsqueeze(1)), W, x);
  return gx.to(x.scalar_type());
}

// ------------------------------------------------------------------ pair_contrastive_loss

inline void check_pair_inputs(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y) {
  check_embeddings(x0, "x0");
  check_embeddings(x1, "x1");
  check_same_device_dtype(x0, "x0", x1, "x1");
  TORCH_CHECK_VALUE(x0.sizes() == x1.sizes(), "x1 must have the same shape as x0 ", x0.sizes(), ", got ",
                    x1.sizes());
  TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == x0.size(0), "y must be a 1-D tensor of length N=", x0.size(0),
                    " (one label per pair), got shape ", y.sizes());
  TORCH_CHECK_TYPE(y.scalar_type() == at::kBool, "y must be a bool tensor here (the Python wrapper converts it), got ",
                   y.scalar_type());
  TORCH_CHECK_VALUE(y.device() == x0.device(), "y must be on x0's device (", x0.device(), "), got ", y.device());
}

// Returns (loss (N,), dist (N,) acc dtype).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_impl(const at::Tensor& x0_in, const at::Tensor& x1_in,
                                                              const at::Tensor& y_in, double margin,
                                                              c10::string_view metric_name, bool squared) {
  const Metric metric = parse_metric(metric_name);
  check_pair_inputs(x0_in, x1_in, y_in);
  check_finite_arg(margin, "margin");
  const int64_t N = x0_in.size(0);
  at::Tensor loss = at::empty({N}, x0_in.options());
  at::Tensor dist = at::empty({N}, x0_in.options().dtype(acc_dtype(x0_in)));
  if (N == 0) return {loss, dist};
  Kernels::pair_forward(x0_in.contiguous(), x1_in.contiguous(), y_in.contiguous(), PairArgs{margin, metric, squared},
                        loss, dist);
  return {loss, dist};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_backward_impl(
    const at::Tensor& grad, const at::Tensor& x0_in, const at::Tensor& x1_in, const at::Tensor& y_in,
    const at::Tensor& dist, double margin, c10::string_view metric_name, bool squared) {
  const Metric metric = parse_metric(metric_name);
  check_pair_inputs(x0_in, x1_in, y_in);
  const int64_t N = x0_in.size(0);
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == N, "grad must have shape (", N, ",), got ", grad.sizes());
  TORCH_CHECK_VALUE(dist.dim() == 1 && dist.size(0) == N, "dist must have shape (", N, ",), got ", dist.sizes());
  at::Tensor g0 = at::empty_like(x0_in, at::MemoryFormat::Contiguous);
  at::Tensor g1 = at::empty_like(x1_in, at::MemoryFormat::Contiguous);
  if (N == 0 || x0_in.size(1) == 0) return {g0.zero_(), g1.zero_()};
  Kernels::pair_backward(grad.to(x0_in.scalar_type()).contiguous(), x0_in.contiguous(), x1_in.contiguous(),
                         y_in.contiguous(), dist.to(acc_dtype(x0_in)).contiguous(), PairArgs{margin, metric, squared},
                         g0, g1);
  return {g0, g1};
}

// ------------------------------------------------------------------ triplet_margin_loss

inline void check_triplet_inputs(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n) {
  check_embeddings(a, "anchor");
  check_embeddings(p, "positive");
  check_embeddings(n, "negative");
  check_same_device_dtype(a, "anchor", p, "positive");
  check_same_device_dtype(a, "anchor", n, "negative");
  TORCH_CHECK_VALUE(p.sizes() == a.sizes(), "positive must have the same shape as anchor ", a.sizes(), ", got ",
                    p.sizes());
  TORCH_CHECK_VALUE(n.sizes() == a.sizes(), "negative must have the same shape as anchor ", a.sizes(), ", got ",
                    n.sizes());
}

// Returns (loss (N,), dists (N, 3) acc dtype: d(a,p), d(a,n), d(p,n) (0 without swap)).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> triplet_margin_loss_impl(const at::Tensor& a, const at::Tensor& p,
                                                            const at::Tensor& n, double margin, double norm_p,
                                                            double eps, bool swap, bool squared) {
  check_triplet_inputs(a, p, n);
  check_finite_arg(margin, "margin");
  check_finite_arg(eps, "eps");
  const NormKind kind = triplet_norm_kind(norm_p, squared);
  const int64_t N = a.size(0);
  at::Tensor loss = at::empty({N}, a.options());
  at::Tensor dists = at::empty({N, 3}, a.options().dtype(acc_dtype(a)));
  if (N == 0) return {loss, dists};
  Kernels::triplet_forward(a.contiguous(), p.contiguous(), n.contiguous(), TripletArgs{margin, norm_p, eps, swap, kind},
                           loss, dists);
  return {loss, dists};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_margin_loss_backward_impl(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, const at::Tensor& dists,
    double margin, double norm_p, double eps, bool swap, bool squared) {
  check_triplet_inputs(a, p, n);
  const NormKind kind = triplet_norm_kind(norm_p, squared);
  const int64_t N = a.size(0);
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == N, "grad must have shape (", N, ",), got ", grad.sizes());
  TORCH_CHECK_VALUE(dists.dim() == 2 && dists.size(0) == N && dists.size(1) == 3, "dists must have shape (", N,
                    ", 3), got ", dists.sizes());
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gp = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor gn = at::empty_like(n, at::MemoryFormat::Contiguous);
  if (N == 0 || a.size(1) == 0) return {ga.zero_(), gp.zero_(), gn.zero_()};
  Kernels::triplet_backward(grad.to(a.scalar_type()).contiguous(), a.contiguous(), p.contiguous(), n.contiguous(),
                            dists.to(acc_dtype(a)).contiguous(), TripletArgs{margin, norm_p, eps, swap, kind}, ga, gp,
                            gn);
  return {ga, gp, gn};
}

}  // namespace metricops
