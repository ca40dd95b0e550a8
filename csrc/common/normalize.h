// L2 normalisation with torch.nn.functional.normalize(x, p=2, dim=1, eps)
// semantics, shared by the CPU and CUDA kernels:
//   y = x / max(||x||, eps)
//   dy -> dx = (g - y <g, y>) / ||x||   when ||x|| >= eps
//              g / eps                   otherwise (the clamp is active)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/full_like.h>
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

// The same rule with the normalization folded into a GEMM: the GEMM takes the
// raw rows and its output is scaled by 1/max(n, eps) per row (the class
// losses' weight and proxies, the LSE engine's normalize=True), so no
// normalized copy is made. Per row, in `acc`: that inverse norm (NaN for a
// NaN row) and the projection factor k = 1/n² when n >= eps, else 0 (the clamp
// is active: the Jacobian is I/eps). ATen ops, so CPU and CUDA share them.
//
// distance_offsets (optional), from the same norms: o = -||x̂||²/2 per row for x̂ = F.normalize(row),
// -1/2 for a row of norm >= eps (x̂ is a unit vector, exactly -1/2 here), -(n/eps)²/2 below (0 for a zero
// row), NaN for a NaN row. The lifted policies read e = s_ij + o_i + o_j = -||x̂_i - x̂_j||²/2 for every row
// (the LSE engine's Problem::row_offset; common/lse_stats.h LiftedPolicy).
inline std::pair<at::Tensor, at::Tensor> folded_norm_factors(const at::Tensor& rows, at::ScalarType acc,
                                                             at::Tensor* distance_offsets = nullptr) {
  const at::Tensor norm = at::linalg_vector_norm(rows, 2, {1}, false, acc);
  const at::Tensor inv_norm = norm.clamp_min(kNormalizeEps).reciprocal();  // clamp_min keeps NaN
  const at::Tensor projection = at::where(norm.ge(kNormalizeEps), norm.square().reciprocal(), 0.0);
  if (distance_offsets) {
    const at::Tensor q = norm.div(kNormalizeEps).square();  // ||x̂||² below eps
    *distance_offsets = at::where(norm.ge(kNormalizeEps), at::full_like(norm, -0.5), q.mul(-0.5));
  }
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
