// The streaming log-sum-exp engine's per-row statistics and loss policies,
// shared by the CPU and CUDA tile drivers (cpu/lse_engine.h,
// cuda/lse_engine.cuh), so the CPU tests exercise the math the GPU runs.
//
// One formulation: rows X (B×D), columns Y (M×D), S = X Yᵀ. Entry (i, j) is
// positive when row_key[i] == col_key[j], negative otherwise, and ignored when
// it is the self pair (self_pairs and i == j) or the policy's keep() drops it.
// Per row, in acc_t (float32 for float32/float16/bfloat16, float64 for
// float64), the engine accumulates for each class c ∈ {pos, neg}:
//   LSE_c  = log Σ_{j∈c} exp(φ_c(s_ij))          (online: running max + scaled sum)
//   lin_c  = Σ_{j∈c} lin_c(s_ij)                  (plain sums)
//   aux_c  = Σ_{j∈c} aux_c(s_ij)
//   E_c    = Σ_{j∈c} softmax_c(φ)_j · ∂φ_c/∂scale (d LSE_c / d scale)
//   count_c, min_{pos} s, max_{neg} s            (the MS miner's thresholds; kMinMax policies only)
// A loss combines the finished statistics (metricops/similarity.py) and the
// backward turns each recomputed S entry into dL/ds from the row's statistics
// and the incoming gradients of LSE_c and lin_c.
//
// A policy is a small struct (see ScaledPolicy) with:
//   static constexpr bool kLse;        // whether φ's log-sum-exp is needed (else only lin/aux)
//   static constexpr bool kLin;        // whether lin/aux are (else they are 0 and not summed)
//   static constexpr bool kDScale;     // whether dphi_dscale is (else 0)
//   static constexpr bool kAux;        // whether aux is (else 0; the CPU epilogues skip its sums)
//   static constexpr bool kMinMax;     // whether min_pos s / max_neg s are kept (else +inf / -inf):
//                                      // only the MS miner's first pass reads them, and the CPU
//                                      // epilogues spend ~5-10% of their time on them
//   static constexpr bool kPositivesOnly;  // negatives give nothing (no φ, lin 0, aux 0, kLse false):
//                                      // the CPU epilogues evaluate only the positives (a few per row)
//   static constexpr bool kBounded;    // φ has known bounds over s in [-1, 1] (normalized rows), given by
//                                      // phi_bounds(pos, lo, hi); a policy with it defines that method: the
//                                      // CPU engine may then take exps against a fixed reference
//                                      // (cpu/lse_engine.h, the fixed-reference epilogues)
//   static constexpr bool kParamsOnlyInKeep;  // eval and grad ignore own/other (only keep reads them): the
//                                      // fixed-reference epilogues then evaluate an entry once for both views
//   bool keep(s, pos, own, other);     // whether a non-ignored entry counts (the MS miner's mask)
//   void eval(s, pos, own, other, phi, lin, aux, dphi_dscale);        // forward values
//   void grad(s, pos, own, other, phi, dphi_ds, dlin_ds);             // backward derivatives
// `own`: the row's parameters (a ParamView of row_params' row i; empty when none), `other`:
// the column's (only in the self mode, where columns are rows; else empty).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

// Forced inlining: the CPU epilogues only vectorise when exp and the
// policies' functions are inlined into their loops.
#if defined(__GNUC__) && !defined(__CUDA_ARCH__)
#define METRICOPS_LSE_INLINE C10_HOST_DEVICE inline __attribute__((always_inline))
#else
#define METRICOPS_LSE_INLINE C10_HOST_DEVICE inline
#endif

// Floating-point compares may not trap here (torch builds with the same
// flag): without it GCC cannot turn the epilogues' selects into vector blends.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace metricops {
namespace lse {

// Finished statistics, one row of the ops' (B, kNumStats) outputs.
enum StatField : int {
  kLsePos = 0,
  kLseNeg,
  kLinPos,
  kLinNeg,
  kCountPos,
  kCountNeg,
  kMinPos,     // min similarity over the positives (+inf if none)
  kMaxNeg,     // max similarity over the negatives (-inf if none)
  kDScalePos,  // d LSE_pos / d scale
  kDScaleNeg,
  kAuxPos,
  kAuxNeg,
  kTerm,  // the loss head's per-anchor term (common/lse_heads.h; 0 without a head)
  kNumStats
};

// Running accumulator of one row (internal to the drivers).
enum AccField : int {
  kAccMaxPos = 0,
  kAccSumPos,
  kAccMaxNeg,
  kAccSumNeg,
  kAccWPos,  // Σ exp(φ - max) ∂φ/∂scale, scaled with the sum
  kAccWNeg,
  kAccLinPos,
  kAccLinNeg,
  kAccAuxPos,
  kAccAuxNeg,
  kAccCountPos,
  kAccCountNeg,
  kAccMinPos,
  kAccMaxNegS,
  kNumAcc
};

// Per-row backward coefficients: the finished LSEs and the incoming
// gradients of LSE_c and lin_c (times the row's upstream weight).
enum GradField : int { kGLsePos = 0, kGLseNeg, kGGradLsePos, kGGradLseNeg, kGGradLinPos, kGGradLinNeg, kNumGrad };

template <typename T>
C10_HOST_DEVICE inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}
template <typename T>
C10_HOST_DEVICE inline T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

// exp for the epilogues. Host float32: a branch-free Cephes-style polynomial
// (rel. error ~2e-7) that the compiler vectorises (std::expf is a call);
// arguments below -87 flush to 0 (they are always φ - max <= 0 here, so
// they are negligible next to the max's own term 1). float64 and device: libm.
C10_HOST_DEVICE inline double lse_exp(double x) { return ::exp(x); }
METRICOPS_LSE_INLINE float lse_exp(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  // Written for the vectoriser: selects instead of branches, rounding by the
  // 1.5·2^23 trick instead of floor (a libm call on baseline x86-64), and the
  // exponent built with a bit cast.
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float y = p * __builtin_bit_cast(float, e);
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.0f ? pos_inf<float>() : y;
  return x != x ? x : y;
#endif
}

// sqrt, float for float (::sqrt widens a float to double, and std::sqrt is an
// out-of-line call in this build): vectorises on the host.
C10_HOST_DEVICE inline double lse_sqrt(double x) { return ::sqrt(x); }
METRICOPS_LSE_INLINE float lse_sqrt(float x) {
#ifdef __CUDA_ARCH__
  return ::sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T softplus(T x) {
  // log(1 + e^x), stable on both sides; softplus(-inf) = 0.
  return x > T(0) ? x + ::log1p(::exp(-x)) : ::log1p(::exp(x));
}
template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  return x >= T(0) ? T(1) / (T(1) + ::exp(-x)) : ::exp(x) / (T(1) + ::exp(x));
}

template <typename acc_t>
C10_HOST_DEVICE inline void acc_init(acc_t* a) {
  a[kAccMaxPos] = neg_inf<acc_t>();
  a[kAccMaxNeg] = neg_inf<acc_t>();
  a[kAccSumPos] = a[kAccSumNeg] = a[kAccWPos] = a[kAccWNeg] = acc_t(0);
  a[kAccLinPos] = a[kAccLinNeg] = a[kAccAuxPos] = a[kAccAuxNeg] = acc_t(0);
  a[kAccCountPos] = a[kAccCountNeg] = acc_t(0);
  a[kAccMinPos] = pos_inf<acc_t>();
  a[kAccMaxNegS] = neg_inf<acc_t>();
}

// exp(old - new) for a running max moving from `old` to `now` (>= old):
// 1 when both are -inf (nothing accumulated yet, the sum is 0 anyway).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rescale_factor(acc_t old, acc_t now) {
  return old == now ? acc_t(1) : lse_exp(old - now);
}

// Raise a class's running max to `tile_max`, rescaling its sums; returns the
// new max (the reference the tile's exp terms are taken against).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t raise_max(acc_t* a, int max_field, int sum_field, int w_field, acc_t tile_max) {
  const acc_t old = a[max_field];
  if (tile_max > old) {
    const acc_t f = rescale_factor(old, tile_max);
    a[sum_field] *= f;
    a[w_field] *= f;
    a[max_field] = tile_max;
  }
  return a[max_field];
}

// Merge a complete partial accumulator `b` into `a` (exact, order-independent up to rounding).
template <typename acc_t>
C10_HOST_DEVICE inline void acc_merge(acc_t* a, const acc_t* b) {
  const int fields[2][3] = {{kAccMaxPos, kAccSumPos, kAccWPos}, {kAccMaxNeg, kAccSumNeg, kAccWNeg}};
  for (int c = 0; c < 2; ++c) {
    const int mf = fields[c][0], sf = fields[c][1], wf = fields[c][2];
    const acc_t m = raise_max(a, mf, sf, wf, b[mf]);
    const acc_t f = rescale_factor(b[mf], m);
    a[sf] += b[sf] * f;
    a[wf] += b[wf] * f;
  }
  for (int f = kAccLinPos; f <= kAccCountNeg; ++f) a[f] += b[f];
  a[kAccMinPos] = b[kAccMinPos] < a[kAccMinPos] ? b[kAccMinPos] : a[kAccMinPos];
  a[kAccMaxNegS] = b[kAccMaxNegS] > a[kAccMaxNegS] ? b[kAccMaxNegS] : a[kAccMaxNegS];
}

// Adds one evaluated entry to an accumulator, online (one entry at a time:
// the CUDA epilogues' per-thread path; the CPU ones work chunk-wise).
template <typename acc_t>
C10_HOST_DEVICE inline void acc_add(acc_t* a, bool pos, acc_t s, acc_t phi, acc_t lin, acc_t aux, acc_t dsc, bool lse,
                                    bool minmax) {
  const int mf = pos ? kAccMaxPos : kAccMaxNeg, sf = pos ? kAccSumPos : kAccSumNeg, wf = pos ? kAccWPos : kAccWNeg;
  if (lse) {
    if (phi > a[mf]) {
      const acc_t f = rescale_factor(a[mf], phi);
      a[sf] = a[sf] * f + acc_t(1);
      a[wf] = a[wf] * f + dsc;
      a[mf] = phi;
    } else {  // a NaN φ lands here and makes the sum NaN
      const acc_t e = lse_exp(phi - a[mf]);
      a[sf] += e;
      a[wf] += e * dsc;
    }
  }
  a[pos ? kAccLinPos : kAccLinNeg] += lin;
  a[pos ? kAccAuxPos : kAccAuxNeg] += aux;
  a[pos ? kAccCountPos : kAccCountNeg] += acc_t(1);
  if (!minmax) return;
  if (pos) {
    a[kAccMinPos] = s < a[kAccMinPos] ? s : a[kAccMinPos];
  } else {
    a[kAccMaxNegS] = s > a[kAccMaxNegS] ? s : a[kAccMaxNegS];
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline void acc_finalize(const acc_t* a, acc_t* out) {
  const int fields[2][4] = {{kAccMaxPos, kAccSumPos, kAccWPos, kLsePos}, {kAccMaxNeg, kAccSumNeg, kAccWNeg, kLseNeg}};
  for (int c = 0; c < 2; ++c) {
    const acc_t m = a[fields[c][0]], s = a[fields[c][1]], w = a[fields[c][2]];
    // An empty class (sum 0) has LSE -inf; a NaN entry makes the sum NaN.
    out[fields[c][3]] = s > acc_t(0) ? m + ::log(s) : (s == acc_t(0) ? neg_inf<acc_t>() : s);
    out[c == 0 ? kDScalePos : kDScaleNeg] = s > acc_t(0) ? w / s : (s == acc_t(0) ? acc_t(0) : s);
  }
  out[kLinPos] = a[kAccLinPos];
  out[kLinNeg] = a[kAccLinNeg];
  out[kAuxPos] = a[kAccAuxPos];
  out[kAuxNeg] = a[kAccAuxNeg];
  out[kCountPos] = a[kAccCountPos];
  out[kCountNeg] = a[kAccCountNeg];
  out[kMinPos] = a[kAccMinPos];
  out[kMaxNeg] = a[kAccMaxNegS];
  out[kTerm] = acc_t(0);
}

// Backward coefficients of one row from its finished statistics and the
// incoming gradient of its statistics (grad row of the (B, kNumStats) output).
template <typename acc_t>
C10_HOST_DEVICE inline void grad_coefficients(const acc_t* stats, const acc_t* grad_stats, acc_t* g) {
  g[kGLsePos] = stats[kLsePos];
  g[kGLseNeg] = stats[kLseNeg];
  g[kGGradLsePos] = grad_stats ? grad_stats[kLsePos] : acc_t(0);
  g[kGGradLseNeg] = grad_stats ? grad_stats[kLseNeg] : acc_t(0);
  g[kGGradLinPos] = grad_stats ? grad_stats[kLinPos] : acc_t(0);
  g[kGGradLinNeg] = grad_stats ? grad_stats[kLinNeg] : acc_t(0);
}

// A row's or column's policy parameters, element k at p[offset + k * stride]: rows
// read theirs from the (B, P) row_params (stride 1); the CPU epilogues read
// the columns' from a transposed (P, B) copy (stride B), so that their loops
// over columns load each parameter contiguously and vectorise.
template <typename acc_t>
struct ParamView {
  const acc_t* p = nullptr;  // nullptr: no parameters (a policy without any never reads them)
  int64_t stride = 1;
  int64_t offset = 0;  // kept apart from p: no pointer arithmetic on a null p
  METRICOPS_LSE_INLINE acc_t operator[](int64_t k) const { return p[offset + k * stride]; }
  METRICOPS_LSE_INLINE ParamView moved(int64_t j) const { return {p, stride, offset + j}; }
};

// ---------------------------------------------------------------- policies

// φ_pos = φ_neg = lin_pos = scale·(s - 1): SupCon's and InfoNCE's logits z = scale·s (scale = 1/τ), shifted by
// the constant -scale, which their losses (LSE - z_p) and NT-Xent's (NTXentPairsPolicy) do not see. Why shifted:
// near convergence the positives reach s -> 1, and unshifted both LSE_pos and lin_pos sit near 1/τ, so that their
// difference, the loss (~1e-6 there), was off by float32's rounding at 1/τ (~1e-6: 50% of the loss). Shifted, both
// sit near 0 (s - 1 is exact), and the loss keeps float32's relative precision.
// kScaleGrad ("scaled_learnable"): also the sums of d LSE/d scale (dφ/dscale = s - 1), for a learnable
// temperature; without it ("scaled") they are 0 and not summed: two fewer sums per entry, measured on a 2-core AVX2
// AMD EPYC (B = 2048, D = 128, SupCon's forward op, alternating builds, with the FMA clones of cpu/simd.h)
// 9.64 -> 8.5-8.7 ms.
template <typename acc_t, bool kScaleGrad = false>
struct ScaledPolicy {
  static constexpr bool kLse = true;
  static constexpr bool kLin = true;
  static constexpr bool kDScale = kScaleGrad;
  static constexpr bool kAux = false;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = false;
  static constexpr bool kBounded = true;
  static constexpr bool kParamsOnlyInKeep = true;
  acc_t scale;
  // s in [-1, 1]: s - 1 in [-2, 0]
  METRICOPS_LSE_INLINE void phi_bounds(bool, acc_t& lo, acc_t& hi) const {
    const acc_t far = acc_t(-2) * scale;
    lo = far < acc_t(0) ? far : acc_t(0);
    hi = far < acc_t(0) ? acc_t(0) : far;
  }
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  // dφ/dscale (the d LSE/d scale sums' weight)
  METRICOPS_LSE_INLINE acc_t dphi_dscale(acc_t s) const { return s - acc_t(1); }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& lin,
                                 acc_t& aux, acc_t& dphi_ds) const {
    phi = scale * (s - acc_t(1));
    lin = phi;
    aux = acc_t(0);
    dphi_ds = kScaleGrad ? dphi_dscale(s) : acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    phi = scale * (s - acc_t(1));
    dphi = scale;
    dlin = scale;
  }
};

// Multi-Similarity: φ_pos = -α(s - base), φ_neg = β(s - base). With the fused
// miner (kMined), own = (min positive s, max negative s) of the row from a
// first pass: a positive counts if s - ε < max_neg, a negative if
// s + ε > min_pos (PML's MultiSimilarityMiner); NaN entries always count.
template <typename acc_t, bool kMined>
struct MultiSimilarityPolicy {
  static constexpr bool kLse = true;
  static constexpr bool kLin = false;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = false;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = false;
  static constexpr bool kBounded = true;
  static constexpr bool kParamsOnlyInKeep = true;
  acc_t alpha, beta, base, epsilon;
  // linear in s: its values at s = -1 and 1
  METRICOPS_LSE_INLINE void phi_bounds(bool pos, acc_t& lo, acc_t& hi) const {
    const acc_t coef = pos ? -alpha : beta, a = coef * (acc_t(-1) - base), b = coef * (acc_t(1) - base);
    lo = a < b ? a : b;
    hi = a < b ? b : a;
  }
  METRICOPS_LSE_INLINE bool keep(acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t>) const {
    if constexpr (!kMined) {
      return true;
    } else {
      // both thresholds loaded, the two tests combined bitwise: a ternary here left GCC's vectoriser out of
      // the CPU backward ("control flow in loop": scalar code, 3x the unmined loss's time)
      const acc_t min_pos = own[0], max_neg = own[1];
      return (pos & !(s - epsilon >= max_neg)) | (!pos & !(s + epsilon <= min_pos));
    }
  }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& lin,
                                 acc_t& aux, acc_t& dphi_dscale) const {
    const acc_t coef = pos ? -alpha : beta;  // a select of constants: if-converts
    phi = coef * (s - base);
    lin = aux = dphi_dscale = acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    dphi = pos ? -alpha : beta;
    phi = dphi * (s - base);
    dlin = acc_t(0);
  }
};

// The MS miner's first pass: only each row's min positive s and max negative
// s (kMinMax), the thresholds of the second pass's multi_similarity_mined;
// no exp, no sums beyond the counts. Piecewise constant: no gradient.
template <typename acc_t>
struct SimilarityRangePolicy {
  static constexpr bool kLse = false;
  static constexpr bool kLin = false;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = false;
  static constexpr bool kMinMax = true;
  static constexpr bool kPositivesOnly = false;
  static constexpr bool kBounded = false;
  static constexpr bool kParamsOnlyInKeep = true;
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  METRICOPS_LSE_INLINE void eval(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& lin, acc_t& aux,
                                 acc_t& dphi_dscale) const {
    phi = lin = aux = dphi_dscale = acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    phi = dphi = dlin = acc_t(0);
  }
};

// Circle loss: φ_pos = -γ a_p (s - 1 + m), a_p = relu(1 + m - s);
// φ_neg = γ a_n (s - m), a_n = relu(s + m); the a's are held constant.
template <typename acc_t>
struct CirclePolicy {
  static constexpr bool kLse = true;
  static constexpr bool kLin = false;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = false;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = false;
  static constexpr bool kBounded = false;
  static constexpr bool kParamsOnlyInKeep = true;
  acc_t m, gamma;
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  METRICOPS_LSE_INLINE void coeffs(acc_t s, bool pos, acc_t& phi, acc_t& dphi) const {
    const acc_t ap = acc_t(1) + m - s, an = s + m;
    const acc_t a = pos ? (ap > acc_t(0) ? ap : acc_t(0)) : (an > acc_t(0) ? an : acc_t(0));
    dphi = pos ? -gamma * a : gamma * a;
    phi = dphi * (pos ? s - acc_t(1) + m : s - m);
    // NaN in, NaN out (relu of NaN is NaN, as torch.relu)
    phi = s != s ? s : phi;
    dphi = s != s ? s : dphi;
  }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& lin,
                                 acc_t& aux, acc_t& dphi_dscale) const {
    acc_t dphi;
    coeffs(s, pos, phi, dphi);
    lin = aux = dphi_dscale = acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    coeffs(s, pos, phi, dphi);
    dlin = acc_t(0);
  }
};

// Lifted structure on d = ‖x̂ - ŷ‖ of normalized rows: φ_pos = d - pos_margin,
// φ_neg = neg_margin - d. The entries the distance policies read are not s but
// e = s + o_i + o_j = -d²/2 (the offsets o = -||x̂||²/2, -1/2 for unit rows):
// near 0 for nearly equal rows, where float32 keeps d²'s relative precision
// (s itself, near 1, would round d² to ~1e-7), so that the CPU engine can put
// the rows' exact -||x̂_i - x̂_j||²/2 there (lse_engine.h refine_entries).
// d is 0 (and so is its gradient, never inf) for d² within `tol`: the Gram
// form's rounding ((2D + 8)·ε) where entries are not recomputed, (8ε)² where
// they are. Duplicated rows are at distance exactly 0.
template <typename acc_t>
struct LiftedPolicy {
  static constexpr bool kLse = true;
  static constexpr bool kLin = false;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = false;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = false;
  static constexpr bool kBounded = true;
  static constexpr bool kParamsOnlyInKeep = true;
  acc_t pos_margin, neg_margin, tol;
  // d = sqrt(-2e) in [0, 2]
  METRICOPS_LSE_INLINE void phi_bounds(bool pos, acc_t& lo, acc_t& hi) const {
    lo = pos ? -pos_margin : neg_margin - acc_t(2);
    hi = pos ? acc_t(2) - pos_margin : neg_margin;
  }
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  // e = -d²/2 -> d, and dd/ds (= dd/de: the offsets are constants)
  METRICOPS_LSE_INLINE void distance(acc_t e, acc_t& d, acc_t& dd_ds) const {
    const acc_t d2 = acc_t(-2) * e;
    d = d2 > tol ? lse_sqrt(d2) : (d2 != d2 ? d2 : acc_t(0));
    dd_ds = d2 > tol ? -acc_t(1) / d : acc_t(0);
  }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& lin,
                                 acc_t& aux, acc_t& dphi_dscale) const {
    acc_t d, dd;
    distance(s, d, dd);
    phi = pos ? d - pos_margin : neg_margin - d;
    lin = aux = dphi_dscale = acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool pos, ParamView<acc_t>, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    acc_t d, dd;
    distance(s, d, dd);
    phi = pos ? d - pos_margin : neg_margin - d;
    dphi = pos ? dd : -dd;
    dlin = acc_t(0);
  }
};

// NT-Xent's second pass: own[0] = m_i = LSE over the row's negatives of
// ScaledPolicy's logits z = scale·(s - 1) (first pass), and z here the same.
// Each positive gives lin = softplus(m_i - z) (its -log(e^z / (e^z + Σ_n
// e^{z_n})), which the common shift leaves alone) and aux = σ(m_i - z) =
// d lin / d m_i. Negatives give nothing.
template <typename acc_t>
struct NTXentPairsPolicy {
  static constexpr bool kLse = false;
  static constexpr bool kLin = true;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = true;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = true;
  static constexpr bool kBounded = false;
  static constexpr bool kParamsOnlyInKeep = false;
  acc_t scale;
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t>, acc_t& phi, acc_t& lin,
                                 acc_t& aux, acc_t& dphi_dscale) const {
    const acc_t u = own[0] - scale * (s - acc_t(1));
    phi = dphi_dscale = acc_t(0);
    lin = pos ? softplus(u) : acc_t(0);
    aux = pos ? sigmoid(u) : acc_t(0);
    lin = pos && s != s ? s : lin;  // NaN in, NaN out, for the positives: negatives give nothing
    aux = pos && s != s ? s : aux;
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t>, acc_t& phi, acc_t& dphi,
                                 acc_t& dlin) const {
    phi = dphi = acc_t(0);
    dlin = pos ? -scale * sigmoid(own[0] - scale * (s - acc_t(1))) : acc_t(0);
  }
};

// PML's LiftedStructureLoss, second pass, on d as LiftedPolicy: own/other =
// (L, w) of the row and of the column (self mode only), L = LSE over the
// row's negatives of neg_margin - d (first pass; -inf if none). Each
// positive pair gives r = relu(LA + d - pos_margin), LA = logaddexp(L_own,
// L_other) (0 when both sets are empty, as PML), and
//   lin = r²/2 (count_mode: 1 if r > 0), aux = w_other · r · e^{L_own - LA}
// (with w = 1: d lin / d L_own summed over the row; the backward calls the
// pass again with w = the rows' upstream gradients for the column side).
template <typename acc_t>
struct LiftedPairsPolicy {
  static constexpr bool kLse = false;
  static constexpr bool kLin = true;
  static constexpr bool kDScale = false;
  static constexpr bool kAux = true;
  static constexpr bool kMinMax = false;
  static constexpr bool kPositivesOnly = true;
  static constexpr bool kBounded = false;
  static constexpr bool kParamsOnlyInKeep = false;
  acc_t pos_margin, tol;
  bool count_mode;
  METRICOPS_LSE_INLINE bool keep(acc_t, bool, ParamView<acc_t>, ParamView<acc_t>) const { return true; }
  METRICOPS_LSE_INLINE void terms(acc_t s, ParamView<acc_t> own, ParamView<acc_t> other, acc_t& r, acc_t& dr_ds,
                                  acc_t& w_own) const {
    const acc_t d2 = acc_t(-2) * s;  // s: the entry e = -d²/2 (LiftedPolicy)
    const acc_t d = d2 > tol ? ::sqrt(d2) : (d2 != d2 ? d2 : acc_t(0));
    const acc_t dd = d2 > tol ? -acc_t(1) / d : acc_t(0);
    const acc_t li = own[0], lj = other[0];
    const acc_t m = li > lj ? li : lj;
    const bool empty = m == neg_inf<acc_t>();
    const acc_t mm = empty ? acc_t(0) : m;
    const acc_t la = empty ? acc_t(0) : mm + ::log(::exp(li - mm) + ::exp(lj - mm));
    const acc_t u = la + d - pos_margin;
    r = u > acc_t(0) ? u : (u != u ? u : acc_t(0));
    dr_ds = u > acc_t(0) ? dd : acc_t(0);
    w_own = empty ? acc_t(0) : ::exp(li - la);
  }
  METRICOPS_LSE_INLINE void eval(acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t> other, acc_t& phi,
                                 acc_t& lin, acc_t& aux, acc_t& dphi_dscale) const {
    acc_t r, dr, w_own;
    terms(s, own, other, r, dr, w_own);
    phi = dphi_dscale = acc_t(0);
    const acc_t value = count_mode ? (r > acc_t(0) ? acc_t(1) : acc_t(0)) : acc_t(0.5) * r * r;
    lin = pos ? value : acc_t(0);
    aux = pos ? other[1] * r * w_own : acc_t(0);
  }
  METRICOPS_LSE_INLINE void grad(acc_t s, bool pos, ParamView<acc_t> own, ParamView<acc_t> other, acc_t& phi,
                                 acc_t& dphi, acc_t& dlin) const {
    acc_t r, dr, w_own;
    terms(s, own, other, r, dr, w_own);
    phi = dphi = acc_t(0);
    dlin = pos ? r * dr : acc_t(0);
  }
};

}  // namespace lse
}  // namespace metricops

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC pop_options
#endif
