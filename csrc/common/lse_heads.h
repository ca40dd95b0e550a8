// Loss heads of the log-sum-exp engine: a loss's per-anchor term as a function
// of one row's finished statistics, computed inside lse_stats (its column
// kTerm) and differentiated inside lse_stats_backward, so that a loss is one
// op and one autograd node instead of a dozen small tensor ops around it (at
// B = 128 those took more time than the engine). Shared by the CPU and CUDA
// ops, so the CPU tests exercise what the GPU runs.
//
// Each head reads a row's LSE_pos, LSE_neg, lin_pos and counts, and the batch
// totals of the counts (some losses give 0 for a batch without any positive,
// say); it returns the term and its derivatives w.r.t. LSE_pos, LSE_neg and
// lin_pos. The math is in double: B values, and the terms near convergence are
// differences of nearly equal numbers.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "common/hinge.h"
#include "common/lse_stats.h"
#include "common/triplet.h"

namespace metricops {
namespace lse {

enum class HeadKind : int {
  None = 0,
  SupCon,                // "scaled": LSE over all of the row's pairs − the positives' mean z
  MultiSimilarity,       // "multi_similarity": log(1 + Σ_p)/α + log(1 + Σ_n)/β
  MultiSimilarityMined,  // "multi_similarity_mined": the same, 0 for a miner output of <= 1 pair per class
  Circle,                // "circle": softplus(LSE_pos + LSE_neg), torch's threshold 20
  GeneralizedLifted,     // "lifted": relu(LSE_pos + LSE_neg), an empty set's LSE counting as 0
  InfoNCE,               // "scaled" on paired views: cross-entropy, LSE over all − the positive's z
};

// A head's constants: MS's 1/α, 1/β, and the batch totals of count_pos and
// count_neg over the rows (or columns) the head runs on, at `totals` (2
// values, on the device the head runs on; null for heads that do not read them).
template <typename acc_t>
struct HeadSpec {
  HeadKind kind = HeadKind::None;
  double inv_alpha = 0, inv_beta = 0;
  const acc_t* totals = nullptr;
};

// Whether `kind` reads the batch totals.
C10_HOST_DEVICE inline bool head_reads_totals(HeadKind kind) {
  return kind == HeadKind::SupCon || kind == HeadKind::MultiSimilarityMined;
}

// log(e^a + e^b) as torch.logaddexp computes it, and e^{a - result}, e^{b - result} (its derivatives).
C10_HOST_DEVICE inline double head_logaddexp(double a, double b, double& da, double& db) {
  if (a != a || b != b) {
    da = db = a + b;  // NaN
    return a + b;
  }
  if (a == b && (a == pos_inf<double>() || a == neg_inf<double>())) {  // both -inf (an empty pair set) or both +inf
    da = db = a < 0 ? 0.0 : 0.5;
    return a;
  }
  const double m = a > b ? a : b;
  const double r = m + ::log1p(::exp(-::fabs(a - b)));
  da = ::exp(a - r);
  db = ::exp(b - r);
  return r;
}

// A row's term; d[0..2] = ∂term/∂(LSE_pos, LSE_neg, lin_pos). Rows a head
// leaves out give 0 with zero derivatives (the formulas' masks: an empty set's
// -inf LSE never reaches an exp whose gradient it would poison).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t head_term(const acc_t* st, const HeadSpec<acc_t>& h, double* d) {
  d[0] = d[1] = d[2] = 0;
  const double lp = st[kLsePos], ln = st[kLseNeg], lin = st[kLinPos];
  const double np = st[kCountPos], nn = st[kCountNeg];
  switch (h.kind) {
    case HeadKind::None:
      return acc_t(0);
    case HeadKind::SupCon: {
      // PML: 0 for an anchor without a positive, and for every anchor of a batch without any positive or
      // any negative pair
      if (!(np > 0 && h.totals[0] > 0 && h.totals[1] > 0)) return acc_t(0);
      const double all = head_logaddexp(lp, ln, d[0], d[1]);
      d[2] = -1.0 / np;
      return static_cast<acc_t>(all - lin / np);
    }
    case HeadKind::MultiSimilarity:
    case HeadKind::MultiSimilarityMined: {
      // PML's miner path: a miner output of <= 1 positive and <= 1 negative pair gives 0
      if (h.kind == HeadKind::MultiSimilarityMined && !(h.totals[0] > 1 || h.totals[1] > 1)) return acc_t(0);
      // log(1 + Σ) exactly (lse_stats.h softplus), not F.softplus's threshold: PML's log1p is exact
      double term = 0;
      if (np > 0) {
        term += softplus(lp) * h.inv_alpha;
        d[0] = sigmoid(lp) * h.inv_alpha;
      }
      if (nn > 0) {
        term += softplus(ln) * h.inv_beta;
        d[1] = sigmoid(ln) * h.inv_beta;
      }
      return static_cast<acc_t>(term);
    }
    case HeadKind::Circle: {
      if (!(np > 0 && nn > 0)) return acc_t(0);
      // F.softplus (beta 1, threshold 20), as PML: common/triplet.h's
      const double t = lp + ln;
      d[0] = d[1] = ::metricops::softplus_grad(t);
      return static_cast<acc_t>(::metricops::softplus(t));
    }
    case HeadKind::GeneralizedLifted: {
      const double t = (np > 0 ? lp : 0.0) + (nn > 0 ? ln : 0.0);
      // relu as torch: NaN stays NaN, gradient 0 at 0 and for NaN (common/hinge.h)
      double value, slope;
      clamp_min_hinge(t, value, slope);
      d[0] = np > 0 ? slope : 0.0;
      d[1] = nn > 0 ? slope : 0.0;
      return static_cast<acc_t>(value);
    }
    case HeadKind::InfoNCE: {
      const double all = head_logaddexp(lp, ln, d[0], d[1]);
      d[2] = -1;
      return static_cast<acc_t>(all - lin);
    }
  }
  return acc_t(0);
}

// Writes the term into the row's kTerm column.
template <typename acc_t>
C10_HOST_DEVICE inline void head_finalize(acc_t* st, const HeadSpec<acc_t>& h) {
  double d[3];
  st[kTerm] = head_term(st, h, d);
}

// Adds the term's incoming gradient, through the head, to the row's gradient
// coefficients (grad_coefficients' kGGradLsePos, kGGradLseNeg, kGGradLinPos).
template <typename acc_t>
C10_HOST_DEVICE inline void head_grad_coefficients(const acc_t* st, const acc_t* grad_stats, const HeadSpec<acc_t>& h,
                                                   acc_t* g) {
  if (h.kind == HeadKind::None || !grad_stats) return;
  const double gt = grad_stats[kTerm];
  double d[3];
  head_term(st, h, d);
  g[kGGradLsePos] += static_cast<acc_t>(gt * d[0]);
  g[kGGradLseNeg] += static_cast<acc_t>(gt * d[1]);
  g[kGGradLinPos] += static_cast<acc_t>(gt * d[2]);
}

}  // namespace lse
}  // namespace metricops
