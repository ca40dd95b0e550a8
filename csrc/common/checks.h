// Argument checks shared by every operator (CPU and CUDA).
//
// Python validates first with the same wording; these TORCH_CHECKs are the
// last line, so that a direct torch.ops call can never reach a kernel with
// arguments it would misread.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "common/distance.h"

namespace metricops {

inline Metric parse_metric(c10::string_view name) {
  if (name == "euclidean") return Metric::Euclidean;
  if (name == "sqeuclidean") return Metric::SqEuclidean;
  if (name == "cosine") return Metric::Cosine;
  TORCH_CHECK_VALUE(false, "metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got '", std::string(name), "'");
}

inline bool is_supported_float(const at::Tensor& t) {
  auto st = t.scalar_type();
  if (st == at::kFloat || st == at::kDouble) return true;
  return t.is_cuda() && (st == at::kHalf || st == at::kBFloat16);
}

// A (rows, dim) floating matrix on a supported device and dtype.
inline void check_embeddings(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D tensor of shape (B, D), got ", t.dim(), "-D tensor of shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t), name, " must be float32 or float64 (float16/bfloat16 on CUDA), got ",
                   t.scalar_type(), " on ", t.device());
}

inline void check_same_device_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the same device as ", a_name, " (", a.device(),
                    "), got ", b.device());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the same dtype as ", a_name, " (",
                   a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_labels(const at::Tensor& labels, const at::Tensor& embeddings) {
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0),
                    "labels must be a 1-D tensor of length B=", embeddings.size(0),
                    " (one label per embedding), got shape ", labels.sizes());
  auto st = labels.scalar_type();
  TORCH_CHECK_TYPE(st == at::kLong || st == at::kInt, "labels must be int32 or int64, got ", st);
  TORCH_CHECK_VALUE(labels.device() == embeddings.device(), "labels must be on the embeddings' device (",
                    embeddings.device(), "), got ", labels.device());
}

// A float argument that may be infinite (it can switch a group of terms off)
// but not NaN.
inline void check_not_nan_arg(double v, const char* name) {
  TORCH_CHECK_VALUE(!std::isnan(v), name, " must not be NaN");
}

// Labels as contiguous int64 (the kernels read them as int64_t).
inline at::Tensor labels_int64(const at::Tensor& labels) { return labels.to(at::kLong).contiguous(); }

}  // namespace metricops
