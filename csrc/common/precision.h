// The accumulation-dtype rule of every op, CPU and CUDA: float16/bfloat16
// inputs are accumulated (sums, GEMM outputs, saved coefficients) in float32,
// float32 and float64 in themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>

namespace metricops {

inline bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
inline bool is_low_precision(const at::Tensor& t) { return is_low_precision(t.scalar_type()); }

// float32 for float16/bfloat16, the dtype itself otherwise (at::toOpMathType).
inline at::ScalarType acc_dtype(at::ScalarType t) { return is_low_precision(t) ? at::kFloat : t; }
inline at::ScalarType acc_dtype(const at::Tensor& t) { return acc_dtype(t.scalar_type()); }

// a @ b.T in the accumulation dtype (tensor cores with float32 output for
// float16/bfloat16 on CUDA).
inline at::Tensor gram_acc(const at::Tensor& a, const at::Tensor& b) {
  return is_low_precision(a) ? at::mm(a, b.t(), at::kFloat) : at::mm(a, b.t());
}

// scaled - a @ b in the accumulation dtype (one fused addmm when possible).
inline at::Tensor scaled_minus_matmul(const at::Tensor& scaled, const at::Tensor& a, const at::Tensor& b) {
  if (is_low_precision(a)) return scaled.sub_(at::mm(a, b, at::kFloat));
  return at::addmm(scaled, a, b, /*beta=*/1, /*alpha=*/-1);
}

}  // namespace metricops
