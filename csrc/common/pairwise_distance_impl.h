// Device-generic orchestration of pairwise_distance forward and backward.
//
// The GEMMs go through ATen (BLAS on CPU, cuBLAS on CUDA); everything else is
// an elementwise epilogue supplied by `Kernels` (cpu/ or cuda/), which must
// provide:
//   Tensor row_aux(const Tensor& x, Metric)                  -> (rows,) acc dtype
//   void distance_epilogue(const Tensor& dot, const Tensor& x, const Tensor& y,
//                          const Tensor& x_aux, const Tensor& y_aux, Metric, bool self,
//                          Tensor& out)    (x, y contiguous: the exactness guard reads them)
//   GradCoefficients grad_coefficients(const Tensor& grad, const Tensor& dist,
//                     const Tensor& x_aux, const Tensor& y_aux, Metric, bool self)
// with the math of common/distance.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/precision.h"

namespace metricops {

// Backward of pairwise_distance in coefficient form:
//   grad_x = row_coef[:, None] * x - cross @ y
//   grad_y = col_coef[:, None] * y - cross.T @ x
// When y is None a device may either symmetrise cross (w_ij + w_ji) with
// row_coef holding both roles of x and col_coef undefined (one GEMM), or
// return the plain coefficients (then both roles are added: two GEMMs).
struct GradCoefficients {
  at::Tensor cross;     // (M, N), input dtype (a GEMM operand)
  at::Tensor row_coef;  // (M,), accumulation dtype
  at::Tensor col_coef;  // (N,), accumulation dtype
};

inline void check_pairwise_inputs(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  check_embeddings(x, "x");
  if (y.has_value()) {
    check_embeddings(*y, "y");
    check_same_device_dtype(x, "x", *y, "y");
    TORCH_CHECK_VALUE(x.size(1) == y->size(1), "y must have the same embedding size D as x (", x.size(1),
                      "), got shape ", y->sizes());
  }
}

template <class Kernels>
at::Tensor pairwise_distance_impl(const at::Tensor& x_in, const std::optional<at::Tensor>& y_opt,
                                  c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_pairwise_inputs(x_in, y_opt);
  const bool self = !y_opt.has_value();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = self ? x : y_opt->contiguous();
  if (x.size(0) == 0 || y.size(0) == 0) return at::empty({x.size(0), y.size(0)}, x.options());
  at::Tensor dot = gram_acc(x, y);
  // Write the distances over the Gram matrix unless the dtypes differ.
  at::Tensor out = is_low_precision(x) ? at::empty(dot.sizes(), x.options()) : dot;
  at::Tensor x_aux = Kernels::row_aux(x, metric);
  at::Tensor y_aux = self ? x_aux : Kernels::row_aux(y, metric);
  Kernels::distance_epilogue(dot, x, y, x_aux, y_aux, metric, self, out);
  return out;
}

// Returns (grad_x, grad_y); grad_y is an empty (0, D) tensor when y is None
// (then grad_x already holds both roles of x).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& y_opt,
                                                                   const at::Tensor& dist,
                                                                   c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  check_pairwise_inputs(x, y_opt);
  const bool self = !y_opt.has_value();
  const at::Tensor& y = self ? x : *y_opt;
  const int64_t M = x.size(0), N = y.size(0);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == N, "grad must have shape (", M, ", ", N,
                    "), got ", grad.sizes());
  TORCH_CHECK_VALUE(dist.dim() == 2 && dist.size(0) == M && dist.size(1) == N, "dist must have shape (", M, ", ", N,
                    "), got ", dist.sizes());
  check_same_device_dtype(x, "x", grad, "grad");
  check_same_device_dtype(x, "x", dist, "dist");

  at::Tensor grad_y_empty = at::empty({0, x.size(1)}, x.options());
  if (M == 0 || N == 0 || x.size(1) == 0) {
    return {at::zeros_like(x), self ? grad_y_empty : at::zeros_like(y)};
  }
  const auto acc = acc_dtype(x);
  at::Tensor x_aux = Kernels::row_aux(x, metric);
  at::Tensor y_aux = self ? x_aux : Kernels::row_aux(y, metric);
  GradCoefficients c = Kernels::grad_coefficients(grad, dist, x_aux, y_aux, metric, self);
  const at::Tensor& cross = c.cross;
  const at::Tensor& row_coef = c.row_coef;
  const at::Tensor& col_coef = c.col_coef;
  if (self && col_coef.defined()) {
    at::Tensor scaled = x.to(acc).mul(row_coef.add(col_coef).unsqueeze(1));
    at::Tensor grad_x = scaled_minus_matmul(scaled_minus_matmul(scaled, cross, x), cross.t(), x);
    return {grad_x.to(x.scalar_type()), grad_y_empty};
  }
  at::Tensor grad_x = scaled_minus_matmul(x.to(acc).mul(row_coef.unsqueeze(1)), cross, y);
  if (self) return {grad_x.to(x.scalar_type()), grad_y_empty};
  at::Tensor grad_y = scaled_minus_matmul(y.to(acc).mul(col_coef.unsqueeze(1)), cross.t(), x);
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace metricops
