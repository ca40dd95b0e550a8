// Hinge math shared by the CPU and CUDA contrastive/triplet kernels, so the
// CPU tests exercise the exact per-element arithmetic the GPU runs.
//
// Two hinges, named after the torch function whose autograd convention they
// follow. Both have slope 0 at the kink x = 0; they differ at NaN:
//  * relu_hinge (contrastive losses): relu(x)^q, slope NaN for NaN;
//  * clamp_min_hinge (triplet losses): torch.clamp_min(x, 0), whose backward
//    masks with `x > 0`, so the slope is 0 for NaN.
// Both give NaN values for NaN.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cmath>

namespace metricops {

// relu(x)^q with q = 2 if squared else 1; `slope` = d value / d x.
template <typename acc_t>
C10_HOST_DEVICE inline void relu_hinge(acc_t x, bool squared, acc_t& value, acc_t& slope) {
  // `x < 0` is false for NaN, so NaN propagates to the value.
  const acc_t r = x < acc_t(0) ? acc_t(0) : x;
  // relu'(x): 1 above 0, 0 at or below 0, NaN for NaN (r is NaN then).
  const acc_t s = x > acc_t(0) ? acc_t(1) : (x <= acc_t(0) ? acc_t(0) : r);
  value = squared ? r * r : r;
  slope = squared ? acc_t(2) * r : s;
}

// One contrastive term for a pair at distance d:
//   same label:      relu(d - pos_margin)^q
//   different label: relu(neg_margin - d)^q
// `slope` = d term / d d.
template <typename acc_t>
C10_HOST_DEVICE inline void contrastive_term(acc_t d, bool same, acc_t pos_margin, acc_t neg_margin, bool squared,
                                             acc_t& value, acc_t& slope) {
  acc_t s;
  relu_hinge<acc_t>(same ? d - pos_margin : neg_margin - d, squared, value, s);
  slope = same ? s : -s;
}

// One explicit-pair contrastive term: y·d^q + (1−y)·relu(margin − d)^q.
// The similar branch is not hinged (d >= 0 for every metric up to rounding).
template <typename acc_t>
C10_HOST_DEVICE inline void pair_contrastive_term(acc_t d, bool similar, acc_t margin, bool squared, acc_t& value,
                                                  acc_t& slope) {
  if (similar) {
    value = squared ? d * d : d;
    slope = squared ? acc_t(2) * d : acc_t(1);
    return;
  }
  acc_t s;
  relu_hinge<acc_t>(margin - d, squared, value, s);
  slope = -s;
}

// torch.clamp_min(x, 0) (NaN stays NaN: NaN < 0 is false) and its backward
// mask (x > 0: slope 0 at the kink and for NaN, as torch gives).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clamp_min_hinge_value(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clamp_min_hinge_slope(acc_t x) {
  return x > acc_t(0) ? acc_t(1) : acc_t(0);
}
template <typename acc_t>
C10_HOST_DEVICE inline void clamp_min_hinge(acc_t x, acc_t& value, acc_t& slope) {
  value = clamp_min_hinge_value(x);
  slope = clamp_min_hinge_slope(x);
}

// Backward of torch.minimum(a, b) (the swap rule): ties split the gradient,
// as torch's derivative formula does. Returns the shares of a and b.
template <typename acc_t>
C10_HOST_DEVICE inline void min_shares(acc_t a, acc_t b, acc_t& share_a, acc_t& share_b) {
  if (a == b) {
    share_a = share_b = acc_t(0.5);
    return;
  }
  share_a = a > b ? acc_t(0) : acc_t(1);
  share_b = a < b ? acc_t(0) : acc_t(1);
}

// torch.minimum forward (NaN propagates).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t nan_min(acc_t a, acc_t b) {
  if (a != a) return a;
  if (b != b) return b;
  return a < b ? a : b;
}

// How a triplet distance is measured: ‖e‖_p of e = x − y + eps (torch's
// pairwise_distance), with fast paths for p = 1 and 2, or the squared L2 norm
// without eps (squared=True).
enum class NormKind : int { L1 = 0, L2 = 1, Lp = 2, SquaredL2 = 3 };

// Per-element contribution to the reduced sum that gives the norm.
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_accumulate(acc_t e, acc_t p) {
  switch (kKind) {
    case NormKind::L1:
      return std::abs(e);
    case NormKind::L2:
    case NormKind::SquaredL2:
      return e * e;
    case NormKind::Lp:
      return std::pow(std::abs(e), p);
  }
  return e;
}

// Norm from the reduced sum.
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_finish(acc_t s, acc_t p) {
  switch (kKind) {
    case NormKind::L1:
    case NormKind::SquaredL2:
      return s;
    case NormKind::L2:
      return std::sqrt(s);
    case NormKind::Lp:
      return std::pow(s, acc_t(1) / p);
  }
  return s;
}

// Per-row factor r such that d norm / d e_k = r * f(e_k) (see norm_grad_elem):
// 1/d for L2, 1/d^(p-1) for Lp, 1 for L1 (f = sign) and 2 for SquaredL2.
// Zero norm gives 0 (torch masks its norm backward there).
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_grad_scale(acc_t d, acc_t p) {
  switch (kKind) {
    case NormKind::L1:
      return acc_t(1);
    case NormKind::SquaredL2:
      return acc_t(2);
    case NormKind::L2:
      return d == acc_t(0) ? acc_t(0) : acc_t(1) / d;
    case NormKind::Lp:
      return d == acc_t(0) ? acc_t(0) : std::pow(d, acc_t(1) - p);
  }
  return acc_t(0);
}

// f(e_k): e for the L2 norms, sign(e) for L1, sign(e)|e|^(p-1) for Lp
// (0 at e = 0, as torch's sgn-based formula gives).
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_grad_elem(acc_t e, acc_t p) {
  switch (kKind) {
    case NormKind::L2:
    case NormKind::SquaredL2:
      return e;
    case NormKind::L1:
      return e > acc_t(0) ? acc_t(1) : (e < acc_t(0) ? acc_t(-1) : e * acc_t(0));
    case NormKind::Lp: {
      if (e == acc_t(0)) return acc_t(0);
      const acc_t m = std::pow(std::abs(e), p - acc_t(1));
      return e > acc_t(0) ? m : (e < acc_t(0) ? -m : e);
    }
  }
  return e;
}

}  // namespace metricops
