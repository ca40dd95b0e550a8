// Device-generic orchestration of triplet_margin_loss (explicit triplets,
// torch.nn.functional.triplet_margin_loss semantics): row-wise, one fused
// pass per triplet (no GEMM); the reduction over rows is the caller's.
//
// `Kernels` (cpu/ or cuda/) provides, with the math of common/hinge.h:
//   void triplet_forward(a, p, n, TripletArgs, loss, dists)
//   void triplet_backward(grad, a, p, n, dists, TripletArgs, grad_a, grad_p, grad_n)
// All tensors handed to Kernels are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "common/checks.h"
#include "common/hinge.h"
#include "common/precision.h"

namespace metricops {

struct TripletArgs {
  double margin;
  double p;
  double eps;
  bool swap;
  NormKind kind;
};

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

inline void check_explicit_triplet_inputs(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n) {
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
  check_explicit_triplet_inputs(a, p, n);
  check_not_nan_arg(margin, "margin");
  check_not_nan_arg(eps, "eps");
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
  check_explicit_triplet_inputs(a, p, n);
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
