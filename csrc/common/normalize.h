// L2 normalisation with torch.nn.functional.normalize(x, p=2, dim=1, eps)
// semantics, shared by the CPU and CUDA kernels:
//   y = x / max(||x||, eps)
//   dy -> dx = (g - y <g, y>) / ||x||   when ||x|| >= eps
//              g / eps                   otherwise (the clamp is active)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/where.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "common/checks.h"

namespace metricops {

// The eps of the losses' normalize=True (F.normalize's default).
constexpr double kNormalizeEps = 1e-12;

template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalize_denominator(acc_t norm, acc_t eps) {
  return norm >= eps || norm != norm ? norm : eps;
}

// dx_k = a * g_k - b * x_k, with per-row a and b from the row's norm and
// <g, x>: a = 1/n and b = <g, x>/n³ when n >= eps, else a = 1/eps, b = 0.
template <typename acc_t>
C10_HOST_DEVICE inline void normalize_grad_coefficients(acc_t norm, acc_t g_dot_x, acc_t eps, acc_t& a, acc_t& b) {
  if (norm >= eps || norm != norm) {
    a = acc_t(1) / norm;
    b = g_dot_x * a * a * a;
  } else {
    a = acc_t(1) / eps;
    b = acc_t(0);
  }
}

// The LSE engine's factors of one row of norm n (normalize=True; cpu/similarity.cpp and cuda/similarity.cu both
// call this, so the CPU tests run the GPU's rule). As folded_norm_factors below, plus the engine's NaN rule:
// - inv_norm: 1/max(n, eps); NaN for a NaN row and for one whose norm overflows (1/n = 0: its raw products
//   overflow too, and as 0 it would pass for a zero row, giving a finite, wrong loss);
// - projection: 1/n² when n >= eps, else 0 (the clamp is active; 0 for NaN);
// - offset: the distance policies' o = -||x̂||²/2: -1/2 when n >= eps, -(n/eps)²/2 below, NaN for NaN.
template <typename acc_t>
struct EngineNormRow {
  acc_t inv_norm, projection, offset;
};

template <typename acc_t>
C10_HOST_DEVICE inline EngineNormRow<acc_t> engine_norm_row(acc_t norm, acc_t eps) {
  const bool above = norm >= eps;
  const acc_t r = acc_t(1) / normalize_denominator(norm, eps);
  const acc_t q = norm / eps;
  return {r == acc_t(0) ? acc_t(NAN) : r, above ? acc_t(1) / (norm * norm) : acc_t(0),
          above ? acc_t(-0.5) : acc_t(-0.5) * (q * q)};
}

// The same rule with the normalization folded into a GEMM: the GEMM takes the
// raw rows and its output is scaled by 1/max(n, eps) per row (the class
// losses' weight and proxies, the LSE engine's normalize=True), so no
// normalized copy is made. Per row, in `acc`: that inverse norm (NaN for a
// NaN row) and the projection factor k = 1/n² when n >= eps, else 0 (the clamp
// is active: the Jacobian is I/eps). ATen ops, so CPU and CUDA share them (the class losses).
inline std::pair<at::Tensor, at::Tensor> folded_norm_factors(const at::Tensor& rows, at::ScalarType acc) {
  const at::Tensor norm = at::linalg_vector_norm(rows, 2, {1}, false, acc);
  const at::Tensor inv_norm = norm.clamp_min(kNormalizeEps).reciprocal();  // clamp_min keeps NaN
  const at::Tensor projection = at::where(norm.ge(kNormalizeEps), norm.square().reciprocal(), 0.0);
  return {inv_norm, projection};
}

// The rest of F.normalize's backward for rows whose gradient was accumulated
// as h_r = Σ G·(other rows) / max(n_r, eps): grad_r −= <h_r, w_r>·k_r·w_r, in
// place (bmm and addcmul: no temporary the size of grad).
inline void project_folded_norm_grad(at::Tensor& grad, const at::Tensor& rows, const at::Tensor& projection) {
  if (grad.size(0) == 0) return;
  const at::Tensor k = at::bmm(grad.unsqueeze(1), rows.unsqueeze(2)).view({-1}).mul_(projection);
  grad.addcmul_(rows, k.unsqueeze(1), -1);
}

inline void check_normalize_inputs(const at::Tensor& x, double eps) {
  check_embeddings(x, "embeddings");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
}

inline void check_normalize_backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& norm,
                                            double eps) {
  check_normalize_inputs(x, eps);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "l2_normalize_backward: grad must have shape ", x.sizes(), ", got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(norm.dim() == 1 && norm.size(0) == x.size(0), "l2_normalize_backward: norm must have shape (",
                    x.size(0), "), got ", norm.sizes());
  TORCH_CHECK_VALUE(grad.device() == x.device() && norm.device() == x.device(),
                    "l2_normalize_backward: grad and norm must be on ", x.device());
}

}  // namespace metricops
