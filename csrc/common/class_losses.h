// Losses with learnable class parameters (ArcFace, CosFace, ProxyAnchor):
// the per-entry math, shared by the CPU and CUDA kernels (C10_HOST_DEVICE),
// so the CPU tests exercise what the GPU runs.
//
// Both families work on S = X Ŵᵀ, X the (already normalized) embeddings and
// Ŵ the L2-normalized rows of the class parameters, computed class chunk by
// class chunk (S_ic = <x_i, w_c> / max(‖w_c‖, eps)); nothing B×C is held.
//   margin softmax (ArcFace/CosFace): row i's logits are scale·S_ic, the
//     label's replaced by scale·φ(S_iy); loss_i = LSE_c(logits) − scale·φ(S_iy),
//     the LSE kept online across chunks (OnlineLse).
//   ProxyAnchor: a chunk holds all B rows of its classes, so per-class terms
//     log(1 + Σ e^z) are complete within a chunk.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/lse_stats.h"
#include "common/normalize.h"

namespace metricops {

// sin θ is taken as at least this in the slope of cos(θ + m), never in its
// value: at exactly parallel vectors the slope is otherwise infinite and the
// gradient NaN (metricops/reference/class_losses.py: ARCFACE_MIN_SINE).
constexpr double kArcFaceMinSine = 1e-6;

enum class MarginKind : int { ArcFace = 0, CosFace = 1 };

inline MarginKind parse_margin_kind(c10::string_view kind) {
  if (kind == "arcface") return MarginKind::ArcFace;
  if (kind == "cosface") return MarginKind::CosFace;
  TORCH_CHECK_VALUE(false, "kind must be 'arcface' or 'cosface', got '", std::string(kind), "'");
}

// log-sum-exp kept as a running max and a sum scaled by it. NaN anywhere
// makes the value NaN (comparisons with NaN are false, and the NaN lands in
// the sum). Starting from `empty()` the value is −inf until an entry arrives.
template <typename acc_t>
struct OnlineLse {
  acc_t max;
  acc_t sum;

  C10_HOST_DEVICE static OnlineLse empty() { return {static_cast<acc_t>(-INFINITY), acc_t(0)}; }

  C10_HOST_DEVICE void add(acc_t z) {
    if (z > max) {
      sum = sum * std::exp(max - z) + acc_t(1);
      max = z;
    } else {
      sum += std::exp(z - max);
    }
  }

  // The union of two sets' statistics: exact up to rounding, in any order.
  C10_HOST_DEVICE void merge(const OnlineLse& other) {
    if (other.sum == acc_t(0) && other.max == static_cast<acc_t>(-INFINITY)) return;  // other is empty
    if (other.max > max) {
      sum = sum * std::exp(max - other.max) + other.sum;
      max = other.max;
    } else {
      sum += other.sum * std::exp(other.max - max);
    }
  }

  C10_HOST_DEVICE acc_t value() const { return max + std::log(sum); }
};

// ArcFace's θ ≤ π − m (θ = acos c in [0, π]) as c ≥ threshold, for any real margin m (PML takes any):
// −cos m = cos(π − m) for m in (0, π]; every θ for m ≤ 0 (π − m ≥ π); none for m > π (π − m < 0).
inline double arcface_threshold(double margin) {
  if (margin <= 0) return -std::numeric_limits<double>::infinity();
  if (margin > M_PI) return std::numeric_limits<double>::infinity();
  return -std::cos(margin);
}

// ArcFace/CosFace constants, computed once on the host in double.
template <typename acc_t>
struct MarginSoftmaxPolicy {
  MarginKind kind;
  acc_t scale;
  acc_t margin;
  acc_t cos_m, sin_m;
  acc_t threshold;  // ArcFace: θ ≤ π − m is cos θ ≥ threshold (arcface_threshold)
  acc_t fallback;   // ArcFace: m·sin m, subtracted past the threshold

  static MarginSoftmaxPolicy make(MarginKind kind, double margin, double scale) {
    return {kind,
            static_cast<acc_t>(scale),
            static_cast<acc_t>(margin),
            static_cast<acc_t>(std::cos(margin)),
            static_cast<acc_t>(std::sin(margin)),
            static_cast<acc_t>(arcface_threshold(margin)),
            static_cast<acc_t>(margin * std::sin(margin))};
  }

  // φ(c), the label's cosine after the margin, and dφ/dc in `slope`.
  // ArcFace (as PML): c clamped to [−1, 1] (slope 0 outside), then cos(θ + m)
  // where θ ≤ π − m, else cos θ − m·sin m. CosFace: c − m.
  METRICOPS_LSE_INLINE acc_t target(acc_t c, acc_t& slope) const {
    if (kind == MarginKind::CosFace) {
      slope = acc_t(1);
      return c - margin;
    }
    const bool inside = c >= acc_t(-1) && c <= acc_t(1);  // NaN: false, and NaN flows through the value
    const acc_t cc = c > acc_t(1) ? acc_t(1) : (c < acc_t(-1) ? acc_t(-1) : c);
    acc_t value, d;
    if (cc >= threshold) {
      const acc_t one_minus_sq = acc_t(1) - cc * cc;
      const acc_t sine = std::sqrt(one_minus_sq > acc_t(0) ? one_minus_sq : acc_t(0));
      const acc_t floor = static_cast<acc_t>(kArcFaceMinSine);
      value = cc * cos_m - sine * sin_m;
      d = cos_m + cc * sin_m / (sine > floor ? sine : floor);
    } else {
      value = cc - fallback;
      d = acc_t(1);
    }
    slope = inside ? d : acc_t(0);
    return value;
  }

  // Row i's logit for class c with cosine s (is_target: c == labels[i]).
  METRICOPS_LSE_INLINE acc_t logit(acc_t s, bool is_target) const {
    acc_t unused;
    return scale * (is_target ? target(s, unused) : s);
  }

  // d(loss)/d(S_ic) for a row with upstream gradient g and final log-sum-exp
  // lse: g·scale·(softmax_ic − [c = y_i])·(dφ/dc at the target, else 1).
  METRICOPS_LSE_INLINE acc_t grad(acc_t s, bool is_target, acc_t g, acc_t lse) const {
    if (!is_target) return g * scale * lse::lse_exp(scale * s - lse);
    acc_t slope;
    const acc_t z = scale * target(s, slope);
    return g * scale * (lse::lse_exp(z - lse) - acc_t(1)) * slope;
  }
};

// ProxyAnchor constants: positive exponent −α(S − δ), negative α(S + δ).
template <typename acc_t>
struct ProxyAnchorPolicy {
  acc_t alpha;
  acc_t margin;

  static ProxyAnchorPolicy make(double margin, double alpha) {
    return {static_cast<acc_t>(alpha), static_cast<acc_t>(margin)};
  }
  METRICOPS_LSE_INLINE acc_t pos_exponent(acc_t s) const { return -alpha * (s - margin); }
  METRICOPS_LSE_INLINE acc_t neg_exponent(acc_t s) const { return alpha * (s + margin); }

  METRICOPS_LSE_INLINE acc_t exponent(acc_t s, bool is_pos) const { return is_pos ? pos_exponent(s) : neg_exponent(s); }

  // d(loss)/d(S_ic) given the upstream gradients of the class's two terms:
  // a term t = log(1 + Σ e^z) has dt/dz = e^{z − t} (≤ 1). Branch-free, one
  // exp (lse_stats.h's lse_exp: a polynomial on the host), so the CPU loop
  // calling it vectorizes.
  METRICOPS_LSE_INLINE acc_t grad(acc_t s, bool is_pos, acc_t g_pos, acc_t g_neg, acc_t pos_term,
                                  acc_t neg_term) const {
    const acc_t z = exponent(s, is_pos) - (is_pos ? pos_term : neg_term);
    return (is_pos ? -alpha * g_pos : alpha * g_neg) * lse::lse_exp(z);
  }
};

// The contiguous (rows, cols) view at the start of a flat tile buffer (mm_out
// writes it without a copy).
inline at::Tensor tile_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

inline void check_margin_softmax_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& lse, int64_t B) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B && lse.sizes() == grad_loss.sizes(),
                    "margin_softmax_loss_backward: grad and lse must have shape (", B, "), got ", grad_loss.sizes(),
                    " and ", lse.sizes());
}

inline void check_proxy_anchor_backward_inputs(std::initializer_list<const at::Tensor*> per_class, int64_t C) {
  for (const at::Tensor* t : per_class) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "proxy_anchor_loss_backward: per-class tensors must have ",
                      "shape (", C, "), got ", t->sizes());
  }
}

// The forward's saved tile, as the backward receives it: (C, B) in the
// accumulation dtype (used instead of recomputing the dot products), or
// (0, B) (recompute). Returns whether it is a saved tile.
inline bool check_proxy_anchor_saved_tile(const at::Tensor& tile, const at::Tensor& embeddings, int64_t C,
                                          at::ScalarType acc) {
  const int64_t B = embeddings.size(0);
  TORCH_CHECK_VALUE(tile.dim() == 2 && tile.size(1) == B && (tile.size(0) == C || tile.size(0) == 0),
                    "proxy_anchor_loss_backward: tile must have shape (", C, ", ", B,
                    ") (saved by the forward) or (0, ", B, "), got ", tile.sizes());
  TORCH_CHECK_VALUE(tile.scalar_type() == acc && tile.device() == embeddings.device(),
                    "proxy_anchor_loss_backward: tile must be ", acc, " on ", embeddings.device(), ", got ",
                    tile.scalar_type(), " on ", tile.device());
  return tile.size(0) == C && B > 0;
}

// Classes per chunk: `forced` when > 0 (tests cross chunk boundaries), else
// the chunk whose B×chunk tile of `element_size`-byte entries fills
// budget_bytes; at least 1, at most C.
inline int64_t class_chunk_size(int64_t forced, int64_t B, int64_t C, int64_t element_size, int64_t budget_bytes) {
  int64_t chunk = forced > 0 ? forced : budget_bytes / (element_size * std::max<int64_t>(B, 1));
  return std::max<int64_t>(1, std::min(chunk, std::max<int64_t>(C, 1)));
}

// Argument checks of the class-parameter ops (Python checks first with the
// same wording; these guard direct torch.ops calls).
inline void check_class_loss_inputs(const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& weight,
                                    const char* weight_name) {
  check_embeddings(embeddings, "embeddings");
  check_labels(labels, embeddings);
  TORCH_CHECK_VALUE(weight.dim() == 2, weight_name, " must be a 2-D tensor of shape (C, D), got ", weight.dim(),
                    "-D tensor of shape ", weight.sizes());
  check_same_device_dtype(embeddings, "embeddings", weight, weight_name);
  TORCH_CHECK_VALUE(weight.size(1) == embeddings.size(1), weight_name,
                    " must have the same embedding size D as embeddings (", embeddings.size(1), "), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, weight_name, " must hold at least one class (C >= 1), got shape ",
                    weight.sizes());
}

// Any finite values, as PML takes them (scale 0 gives log C; the running-max LSEs take logits of either sign).
inline void check_margin_softmax_args(double margin, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be a finite number, got ", margin);
}

inline void check_proxy_anchor_args(double margin, double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha), "alpha must be a finite number, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be a finite number, got ", margin);
}

}  // namespace metricops
