// Device-generic orchestration of pair_contrastive_loss (explicit pairs):
// row-wise, one fused pass per pair (no GEMM); the reduction over rows is
// the caller's.
//
// `Kernels` (cpu/ or cuda/) provides, with the math of common/hinge.h and
// common/distance.h:
//   void pair_forward(x0, x1, y, PairArgs, loss, dist)
//   void pair_backward(grad, x0, x1, y, dist, PairArgs, grad_x0, grad_x1)
// All tensors handed to Kernels are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "common/checks.h"
#include "common/hinge.h"
#include "common/precision.h"

namespace metricops {

struct PairArgs {
  double margin;
  Metric metric;
  bool squared;
};

inline void check_pair_inputs(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& y) {
  check_embeddings(x0, "x0");
  check_embeddings(x1, "x1");
  check_same_device_dtype(x0, "x0", x1, "x1");
  TORCH_CHECK_VALUE(x0.sizes() == x1.sizes(), "x1 must have the same shape as x0 ", x0.sizes(), ", got ", x1.sizes());
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
  check_not_nan_arg(margin, "margin");
  const int64_t N = x0_in.size(0);
  at::Tensor loss = at::empty({N}, x0_in.options());
  at::Tensor dist = at::empty({N}, x0_in.options().dtype(acc_dtype(x0_in)));
  if (N == 0) return {loss, dist};
  Kernels::pair_forward(x0_in.contiguous(), x1_in.contiguous(), y_in.contiguous(), PairArgs{margin, metric, squared},
                        loss, dist);
  return {loss, dist};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> pair_contrastive_loss_backward_impl(const at::Tensor& grad, const at::Tensor& x0_in,
                                                                       const at::Tensor& x1_in, const at::Tensor& y_in,
                                                                       const at::Tensor& dist, double margin,
                                                                       c10::string_view metric_name, bool squared) {
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

}  // namespace metricops
