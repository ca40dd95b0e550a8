// The CPU tile driver of the streaming log-sum-exp engine (common/lse_stats.h
// has the statistics and the policies). Usable from any .cpp: templates on a
// policy.
//
// Tiles: the rows go in strips of block_rows; each strip's similarities with
// the columns are one BLAS GEMM per chunk of block_cols columns (at::mm_out
// into one reused buffer), followed by vectorised epilogues that update
// per-row (and per-column) statistics. Nothing rows × columns is held beyond
// one strip chunk (extra memory O(block_rows·block_cols + (B + M)·D)), unless
// the caller asks the forward to keep every tile (`saved`) so that the
// backward reads them instead of recomputing their GEMMs: B = 2048, D = 128
// SupCon forward+backward 13.9 -> 12.1-12.8 ms side by side, Circle 16.8 ->
// 15.0-15.7, for ~B²/2 floats.
//
// Self mode (Y is X, same keys, the self pair ignored): S is symmetric, so
// strip I only computes its columns j >= r0 (the upper triangle): the row
// direction updates rows of I from every column of the strip, the column
// direction updates rows j >= r1 (outside I's diagonal block) from the same
// entries. Half the GEMM and half the exps. The backward does the same with
// G_ij = dL/ds_ij + dL/ds_ji.
//
// Determinism: strips and chunks run in a fixed order, each row's and
// column's epilogue is done by one thread in a fixed order, and gradients
// accumulate through sequential GEMMs: results do not depend on the thread
// count beyond BLAS's own.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "common/lse_stats.h"
#include "cpu/simd.h"
#include "cpu/triangle.h"

// Floating-point compares may not trap here (torch builds with the same
// flag): without it GCC cannot turn the epilogues' selects into vector blends.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace metricops {
namespace cpu {
namespace lse_engine {

using namespace ::metricops::lse;

// The default tile: strips of 128 rows, chunks of up to 1M entries (4 MiB of
// float32 similarities, 1 MiB at B = 2048): large enough for BLAS, small
// enough to stay in L2 between the GEMM and the epilogues. Measured side by
// side (2 threads, D = 128, SupCon's policy): 128-row strips took 6.6-6.9 ms
// forward and 10.7-11.0 backward at B = 2048 against 7.2-7.5 and 11.9-12.1
// with 256, 111 against 124 ms forward at B = 8192, and 1.16-1.18 s against
// 1.31 s for InfoNCE's N = 16384, D = 256 forward.
constexpr int64_t kDefaultBlockRows = 128;
constexpr int64_t kDefaultTileEntries = int64_t{1} << 20;
// Columns per task of the column-direction epilogue.
constexpr int64_t kColChunk = 64;
// Rows ahead the column direction prefetches.
constexpr int64_t kColPrefetchRows = 4;

// The most row parameters a policy takes (lifted_pairs and multi_similarity_mined: 2).
constexpr int64_t kMaxParams = 2;

template <typename acc_t>
struct Problem {
  at::Tensor x;  // (B, D) contiguous, acc_t
  at::Tensor y;  // (M, D) contiguous, acc_t; x itself in the self mode
  bool self = false;
  const int64_t* row_keys = nullptr;  // (B,)
  const int64_t* col_keys = nullptr;  // (M,); row_keys in the self mode
  // Row parameters stored transposed, (num_params, B), or nullptr: parameter k of row i at
  // params_t[k·B + i], so that the loops over columns (the self mode's other rows) load them contiguously.
  const acc_t* params_t = nullptr;
  int64_t num_params = 0;
  bool col_stats = false;  // non-self mode: also accumulate per-column statistics
  int64_t block_rows = 0;  // <= 0: the defaults
  int64_t block_cols = 0;
  // normalize=True: S = x̂ ŷᵀ from the raw rows, each GEMM tile scaled by
  // 1/den_i · 1/den_j (den = max(||row||, eps), F.normalize's), so no
  // normalized copy of x or y is made; nullptr: S = x yᵀ.
  const acc_t* row_inv_norm = nullptr;  // (B,)
  const acc_t* col_inv_norm = nullptr;  // (M,); row_inv_norm in the self mode
  // The distance policies read e = -d²/2 (common/lse_stats.h LiftedPolicy). With q = ||x̂||² (1 for unit rows;
  // F.normalize leaves a row of norm n < eps at norm n/eps, a zero row at 0), d² = q_i + q_j - 2 s_ij, so each
  // entry of the tiles the policy reads is s + o_i + o_j for o = -q/2 (-1/2 for every row of norm >= eps, and for
  // every row with normalize=False). nullptr: no offsets (both or neither are set).
  const acc_t* row_offset = nullptr;  // (B,)
  const acc_t* col_offset = nullptr;  // (M,); row_offset in the self mode
  // A distance policy with normalize=True (the offsets make each entry e = -d²/2): entries with d² below this are
  // recomputed from the rows (refine_entries); 0: none.
  acc_t refine_below = 0;
  acc_t gram_tolerance = 0;  // with refine_below: the Gram form's rounding of d², (2D + 8)·ε

  int64_t rows() const { return x.size(0); }
  int64_t cols() const { return y.size(0); }
  ParamView<acc_t> row_params(int64_t i) const { return {params_t, rows(), i}; }
  // the columns' (rows of x in the self mode; none otherwise); moved(j') reads column j + j'
  ParamView<acc_t> col_params(int64_t j) const { return {self ? params_t : nullptr, rows(), j}; }
};

// Row i's parameters copied into `values` (kMaxParams), as a view of them (none without parameters): the
// backward's and the fixed-reference loops read locals, which GCC keeps in registers (through the problem's
// pointer it may reload them per entry and leave a loop scalar).
template <typename acc_t>
inline ParamView<acc_t> local_params(const Problem<acc_t>& pr, int64_t i, acc_t* values) {
  if (!pr.params_t) return {};
  const ParamView<acc_t> view = pr.row_params(i);
  for (int64_t k = 0; k < pr.num_params; ++k) values[k] = view[k];
  return {values, 1, 0};
}

// (strip rows, chunk columns) for a problem: block_rows/block_cols when > 0,
// else the defaults; at least 1, and in the self mode chunk columns >= strip
// rows (the diagonal block must sit in a strip's first chunk).
template <typename acc_t>
inline void tile_shape(const Problem<acc_t>& pr, int64_t& R, int64_t& W) {
  const int64_t B = std::max<int64_t>(pr.rows(), 1), M = std::max<int64_t>(pr.cols(), 1);
  R = std::min(pr.block_rows > 0 ? pr.block_rows : kDefaultBlockRows, B);
  W = pr.block_cols > 0 ? pr.block_cols : std::max<int64_t>(kDefaultTileEntries / R, R);
  if (pr.self) W = std::max(W, R);
  W = std::min(W, M);
  R = std::max<int64_t>(R, 1);
  W = std::max<int64_t>(W, 1);
}

// Entries of the tiles a forward keeps for its backward (save_tiles): strip
// by strip (R rows), its columns from the strip's first row on in the self
// mode (the upper triangle), all M otherwise. metricops/_registrations/
// similarity.py repeats it for the fake kernel.
inline int64_t saved_tiles_size(int64_t B, int64_t M, bool self, int64_t block_rows) {
  if (!self) return B * M;
  const int64_t R = std::max<int64_t>(1, std::min(block_rows, B));  // the strips' rows, as tile_shape
  int64_t total = 0;
  for (int64_t r0 = 0; r0 < B; r0 += R) total += std::min(R, B - r0) * (M - r0);
  return total;
}

// normalize=True: row i of a raw GEMM tile (columns c0..c0+n) scaled in
// place to cosine similarities, s_ij = (x_i·y_j) / (den_i den_j). In the
// backward the same scaling turns dL/ds into the coefficients of the raw rows.
template <typename acc_t>
METRICOPS_SIMD_CLONES void scale_tile_row(const Problem<acc_t>& pr, acc_t* __restrict__ s, int64_t n, int64_t i,
                                          int64_t c0) {
  if (!pr.row_inv_norm) return;
  const acc_t ri = pr.row_inv_norm[i];
  const acc_t* __restrict__ rc = pr.col_inv_norm + c0;
  for (int64_t j = 0; j < n; ++j) s[j] *= ri * rc[j];
}

// Max and min of v[0..n) in kSimdLanes lanes (vectorised; NaN entries are skipped).
template <typename acc_t>
inline acc_t lane_max(const acc_t* v, int64_t n) {
  constexpr int64_t L = kSimdLanes;
  acc_t lanes[L];
  for (int64_t l = 0; l < L; ++l) lanes[l] = neg_inf<acc_t>();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] = v[j + l] > lanes[l] ? v[j + l] : lanes[l];
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] = v[j] > lanes[l] ? v[j] : lanes[l];
  acc_t m = neg_inf<acc_t>();
  for (int64_t l = 0; l < L; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

template <typename acc_t>
inline acc_t lane_min(const acc_t* v, int64_t n) {
  constexpr int64_t L = kSimdLanes;
  acc_t lanes[L];
  for (int64_t l = 0; l < L; ++l) lanes[l] = pos_inf<acc_t>();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] = v[j + l] < lanes[l] ? v[j + l] : lanes[l];
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] = v[j] < lanes[l] ? v[j] : lanes[l];
  acc_t m = pos_inf<acc_t>();
  for (int64_t l = 0; l < L; ++l) m = lanes[l] < m ? lanes[l] : m;
  return m;
}

// ------------------------------------------------------------ entries near zero distance
//
// The distance policies read e = s + o_i + o_j = -d²/2. From the GEMM, e carries the Gram form's rounding,
// ~(2D + 8)·ε absolute: for nearly equal rows that is most of d² (float32, D = 64: d = 1e-3 came out as 0), and
// the gradient's 1/d amplifies it. With normalize=True the entries with d² below refine_threshold are recomputed
// as -||x̂_i - x̂_j||²/2 from the rows (x̂ = row / max(||row||, eps), F.normalize's, so rows of norm below eps
// too): a relative error of ~ε/d instead of ~D·ε/d². Such pairs are rare (near-duplicates, a collapsed class), and
// a row's check is one vectorised max when it has none.

// d² below which entries are recomputed: 2^10 times the Gram form's rounding, so that the others keep d² to
// ~1e-3 relative (float32, D = 128: d² < 0.032, s > 0.984).
template <typename acc_t>
acc_t refine_threshold(int64_t dim) {
  return static_cast<acc_t>(1024.0 * static_cast<double>(2 * dim + 8) * std::numeric_limits<acc_t>::epsilon());
}

// -||x̂_i - ŷ_j||²/2 from the raw rows and their inverse norms.
template <typename acc_t>
acc_t exact_distance_entry(const Problem<acc_t>& pr, int64_t i, int64_t j) {
  const int64_t D = pr.x.size(1);
  const acc_t* __restrict__ xi = pr.x.template const_data_ptr<acc_t>() + i * D;
  const acc_t* __restrict__ yj = pr.y.template const_data_ptr<acc_t>() + j * D;
  const acc_t a = pr.row_inv_norm[i], b = pr.col_inv_norm[j];
  return acc_t(-0.5) * lane_sum<acc_t>(D, [&](int64_t k) {
           const acc_t diff = xi[k] * a - yj[k] * b;
           return diff * diff;
         });
}

// The entries the engine recomputes are those above this bound (e = -d²/2 > -refine_below/2: d² < refine_below;
// NaN: never).
template <typename acc_t>
acc_t refine_bound(const Problem<acc_t>& pr) {
  return acc_t(-0.5) * pr.refine_below;
}

// The entry (i, j) of Gram value e (d² < refine_below) recomputed, unless a row has norm below eps (offset other than
// -1/2): the backward holds that row's offset constant, missing the term through ||x̂||², which 1/d would amplify
// at a small exact d; such an entry keeps the Gram form's value, 0 within its rounding (gram_tolerance), as before.
template <typename acc_t>
acc_t refined_entry(const Problem<acc_t>& pr, int64_t i, int64_t j, acc_t e) {
  if (pr.row_offset[i] != acc_t(-0.5) || pr.col_offset[j] != acc_t(-0.5))
    return acc_t(-2) * e <= pr.gram_tolerance ? acc_t(0) : e;
  return exact_distance_entry(pr, i, j);
}

// Entries e[0..n) of row i (columns c0..) with d² < refine_below, recomputed (the self pair is left: ignored).
template <typename acc_t>
METRICOPS_SIMD_CLONES void refine_entries(const Problem<acc_t>& pr, acc_t* __restrict__ e, int64_t n, int64_t i,
                                          int64_t c0) {
  const acc_t bound = refine_bound(pr);
  const int64_t skip = pr.self && i >= c0 && i < c0 + n ? i - c0 : n;
  const acc_t* after = e + std::min(skip + 1, n);
  if (!(lane_max(e, skip) > bound || lane_max(after, n - std::min(skip + 1, n)) > bound)) return;
  for (int64_t j = 0; j < n; ++j)
    if (j != skip && e[j] > bound) e[j] = refined_entry(pr, i, c0 + j, e[j]);
}

// Row i of a raw GEMM tile -> the entries the policy reads: scale_tile_row, then the rows' offsets
// (Problem::row_offset) where the problem has them, and the entries near zero distance recomputed. (The gradient
// dL/ds is scaled only: the offsets do not depend on the rows, except through q for a row of norm below eps,
// whose share of the gradient is left out.)
template <typename acc_t>
METRICOPS_SIMD_CLONES void similarity_tile_row(const Problem<acc_t>& pr, acc_t* __restrict__ s, int64_t n, int64_t i,
                                               int64_t c0) {
  scale_tile_row(pr, s, n, i, c0);
  if (!pr.row_offset) return;
  const acc_t oi = pr.row_offset[i];
  const acc_t* __restrict__ oc = pr.col_offset + c0;
  for (int64_t j = 0; j < n; ++j) s[j] += oi + oc[j];
  if (pr.refine_below > acc_t(0)) refine_entries(pr, s, n, i, c0);
}

// ------------------------------------------------------------ forward epilogues
//
// Written as simple loops over small scratch arrays (selects, no branches,
// lane-split reductions) so that GCC vectorises them in each
// METRICOPS_SIMD_CLONES clone; the policies' functions inline into them.

// Entries per scratch chunk of the row epilogue (L1-resident).
constexpr int64_t kRowChunk = 512;

// The reference an exp pass subtracts: the running max, or 0 while a class
// is still empty (its φ's are all -inf then, and exp(-inf - 0) = 0).
template <typename acc_t>
inline acc_t exp_reference(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Scratch of one chunk: φ of the kept entries (-inf elsewhere) and their
// class (1 positive, 0 otherwise: a negative when φ > -inf).
template <typename acc_t>
struct ChunkScratch {
  acc_t ph[kRowChunk], pos[kRowChunk], neg[kRowChunk], sp[kRowChunk], sn[kRowChunk], dsc[kRowChunk];
  acc_t lp[kRowChunk], ln[kRowChunk], ap[kRowChunk], an[kRowChunk];
};

// Evaluates entries s[0..n) of one row (keys ck, the row's key rk, the self
// pair at local index `skip` or -1) into the scratch: a plain loop over the
// entries, no reductions (those follow in lanes).
// kColumn: the entries are seen from their columns (the column direction of
// the self mode): `own` is then entry j's column's parameters (varying0 moved by j)
// and `other` the row's (fixed); else `own` is the row's and varying0 moved by j the
// column's.
template <typename Policy, typename acc_t, bool kColumn = false>
inline void eval_chunk(const Policy& p, const acc_t* __restrict__ s, int64_t n, const int64_t* __restrict__ ck,
                       int64_t rk, int64_t skip, ParamView<acc_t> fixed, ParamView<acc_t> varying0,
                       ChunkScratch<acc_t>& __restrict__ t) {
  const acc_t ninf = neg_inf<acc_t>(), pinf = pos_inf<acc_t>();
  if constexpr (Policy::kPositivesOnly) {
    static_assert(!Policy::kLse && !Policy::kMinMax && !Policy::kDScale, "a positives-only policy sums lin/aux");
    // Negatives give nothing: a dense pass for the classes and the counts, then the policy (libm-heavy: NT-Xent's
    // softplus, lifted structure's sqrt/log/exp) on the few positives only. B = 2048, 8 per class: ~7 of 2047.
    for (int64_t j = 0; j < n; ++j) {
      const bool pos = ck[j] == rk, valid = j != skip;
      t.ph[j] = ninf;
      t.pos[j] = valid & pos ? acc_t(1) : acc_t(0);
      t.neg[j] = valid & !pos ? acc_t(1) : acc_t(0);
      t.lp[j] = t.ln[j] = t.ap[j] = t.an[j] = acc_t(0);
    }
    for (int64_t j = 0; j < n; ++j) {
      if (t.pos[j] == acc_t(0)) continue;
      const ParamView<acc_t> varying = varying0.moved(j);
      const ParamView<acc_t> own = kColumn ? varying : fixed;
      const ParamView<acc_t> other = kColumn ? fixed : varying;
      if (!p.keep(s[j], true, own, other)) {
        t.pos[j] = acc_t(0);
        continue;
      }
      acc_t phi, lin, aux, dsc;
      p.eval(s[j], true, own, other, phi, lin, aux, dsc);
      t.lp[j] = lin;
      t.ap[j] = aux;
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const bool pos = ck[j] == rk;
    const ParamView<acc_t> varying = varying0.moved(j);
    const ParamView<acc_t> own = kColumn ? varying : fixed;
    const ParamView<acc_t> other = kColumn ? fixed : varying;
    const bool valid = (j != skip) & p.keep(s[j], pos, own, other);
    acc_t phi, lin, aux, dsc;
    p.eval(s[j], pos, own, other, phi, lin, aux, dsc);
    const bool vp = valid & pos, vn = valid & !pos;
    t.ph[j] = valid ? phi : ninf;
    t.pos[j] = vp ? acc_t(1) : acc_t(0);
    t.neg[j] = vn ? acc_t(1) : acc_t(0);
    if (Policy::kMinMax) {
      t.sp[j] = vp ? s[j] : pinf;
      t.sn[j] = vn ? s[j] : ninf;
    }
    if (Policy::kDScale) t.dsc[j] = dsc;
    if (Policy::kLin) {
      t.lp[j] = vp ? lin : acc_t(0);
      t.ln[j] = vn ? lin : acc_t(0);
    }
    if (Policy::kAux) {
      t.ap[j] = vp ? aux : acc_t(0);
      t.an[j] = vn ? aux : acc_t(0);
    }
  }
}

// Row i's entries s[0..n) (columns c0..c0+n): merges their statistics into
// acc. `skip`: the local index of the self pair, or -1. Per chunk of
// kRowChunk entries, two fused passes with kSimdLanes partial results each:
// evaluate (φ, class, maxima, sums), then exp against the raised maxima.
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void row_forward(const Policy& p, const Problem<acc_t>& pr, const acc_t* s_row, int64_t n,
                                       int64_t i, int64_t c0, int64_t skip_row, acc_t* acc, ChunkScratch<acc_t>& t) {
  constexpr int64_t L = kSimdLanes;
  const ParamView<acc_t> own = pr.row_params(i);
  const int64_t rk = pr.row_keys[i];
  const acc_t ninf = neg_inf<acc_t>(), pinf = pos_inf<acc_t>();
  for (int64_t k0 = 0; k0 < n; k0 += kRowChunk) {
    const int64_t k = std::min(kRowChunk, n - k0);
    const acc_t* s = s_row + k0;
    const int64_t* ck = pr.col_keys + c0 + k0;
    const ParamView<acc_t> other0 = pr.col_params(c0 + k0);
    const int64_t skip = skip_row - k0;
    acc_t mp[L], mn[L], cp[L], cn[L], lp[L], ln[L], ap[L], an[L], minp[L], maxn[L];
    for (int64_t l = 0; l < L; ++l) {
      mp[l] = mn[l] = maxn[l] = ninf;
      minp[l] = pinf;
      cp[l] = cn[l] = lp[l] = ln[l] = ap[l] = an[l] = acc_t(0);
    }
    eval_chunk(p, s, k, ck, rk, skip, own, other0, t);
    // reduce, in lanes
    auto reduce = [&](int64_t j, int64_t l) {
      const bool vp = t.pos[j] != acc_t(0), vn = t.neg[j] != acc_t(0);
      const acc_t php = vp ? t.ph[j] : ninf, phn = vn ? t.ph[j] : ninf;
      mp[l] = php > mp[l] ? php : mp[l];
      mn[l] = phn > mn[l] ? phn : mn[l];
      cp[l] += t.pos[j];
      cn[l] += t.neg[j];
      if (Policy::kMinMax) {
        minp[l] = t.sp[j] < minp[l] ? t.sp[j] : minp[l];
        maxn[l] = t.sn[j] > maxn[l] ? t.sn[j] : maxn[l];
      }
      if (Policy::kLin) {
        lp[l] += t.lp[j];
        ln[l] += t.ln[j];
      }
      if (Policy::kAux) {
        ap[l] += t.ap[j];
        an[l] += t.an[j];
      }
    };
    int64_t j = 0;
    for (; j + L <= k; j += L)
      for (int64_t l = 0; l < L; ++l) reduce(j + l, l);
    for (int64_t l = 0; j < k; ++j, ++l) reduce(j, l);
    acc_t tmp = ninf, tmn = ninf;
    for (int64_t l = 0; l < L; ++l) {
      tmp = mp[l] > tmp ? mp[l] : tmp;
      tmn = mn[l] > tmn ? mn[l] : tmn;
      acc[kAccCountPos] += cp[l];
      acc[kAccCountNeg] += cn[l];
      acc[kAccLinPos] += lp[l];
      acc[kAccLinNeg] += ln[l];
      acc[kAccAuxPos] += ap[l];
      acc[kAccAuxNeg] += an[l];
      acc[kAccMinPos] = minp[l] < acc[kAccMinPos] ? minp[l] : acc[kAccMinPos];
      acc[kAccMaxNegS] = maxn[l] > acc[kAccMaxNegS] ? maxn[l] : acc[kAccMaxNegS];
    }
    if (!Policy::kLse) continue;
    const acc_t refp = exp_reference(raise_max(acc, kAccMaxPos, kAccSumPos, kAccWPos, tmp));
    const acc_t refn = exp_reference(raise_max(acc, kAccMaxNeg, kAccSumNeg, kAccWNeg, tmn));
    for (int64_t l = 0; l < L; ++l) cp[l] = cn[l] = lp[l] = ln[l] = acc_t(0);
    auto sum = [&](int64_t j, int64_t l) {  // one exp per entry; ph = -inf (not kept) gives 0
      const bool pos = t.pos[j] != acc_t(0);
      const acc_t e = lse_exp(t.ph[j] - (pos ? refp : refn));
      const acc_t ep = pos ? e : acc_t(0), en = pos ? acc_t(0) : e;
      cp[l] += ep;
      cn[l] += en;
      if (Policy::kDScale) {
        lp[l] += ep * t.dsc[j];
        ln[l] += en * t.dsc[j];
      }
    };
    j = 0;
    for (; j + L <= k; j += L)
      for (int64_t l = 0; l < L; ++l) sum(j + l, l);
    for (int64_t l = 0; j < k; ++j, ++l) sum(j, l);
    for (int64_t l = 0; l < L; ++l) {
      acc[kAccSumPos] += cp[l];
      acc[kAccSumNeg] += cn[l];
      acc[kAccWPos] += lp[l];
      acc[kAccWNeg] += ln[l];
    }
  }
}

// Columns [j0, j1) (j1 - j0 <= kColChunk) of a strip (rows r0..r0+rows of S,
// row stride `ld`): merges each column's statistics (its entries s_ij seen
// from column j, which is row j in the self mode) into col_acc (global
// column index c0 + j). Column-major reductions over row-major scratch.
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void cols_forward(const Policy& p, const Problem<acc_t>& pr, const acc_t* S, int64_t ld,
                                        int64_t rows, int64_t r0, int64_t c0, int64_t j0, int64_t j1, acc_t* col_acc,
                                        std::vector<acc_t>& scratch, ChunkScratch<acc_t>& t) {
  constexpr int64_t C = kColChunk;
  static_assert(C <= kRowChunk, "a column chunk's row of entries fits the evaluation scratch");
  const int64_t w = j1 - j0;
  const int64_t* ck = pr.col_keys + c0 + j0;
  const acc_t ninf = neg_inf<acc_t>(), pinf = pos_inf<acc_t>();
  scratch.resize(2 * rows * C);
  acc_t* php = scratch.data();
  acc_t* phn = php + rows * C;
  acc_t mp[C], mn[C], lp[C], ln[C], ap[C], an[C], cp[C], cn[C], minp[C], maxn[C], wp[C], wn[C];
  for (int64_t l = 0; l < C; ++l) {
    mp[l] = mn[l] = maxn[l] = ninf;
    minp[l] = pinf;
    lp[l] = ln[l] = ap[l] = an[l] = cp[l] = cn[l] = wp[l] = wn[l] = acc_t(0);
  }
  const ParamView<acc_t> own0 = pr.col_params(c0 + j0);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = S + r * ld + j0;
    // The rows are ld apart (a page or more): no hardware prefetcher follows them, and each row's few
    // lines would be a cache miss; ask for those of a row a few ahead.
    if (r + kColPrefetchRows < rows) {
      const char* ahead = reinterpret_cast<const char*>(s + kColPrefetchRows * ld);
      for (int64_t b = 0; b < w * static_cast<int64_t>(sizeof(acc_t)); b += 64) __builtin_prefetch(ahead + b);
    }
    const int64_t rk = pr.row_keys[r0 + r];
    const ParamView<acc_t> other = pr.self ? pr.row_params(r0 + r) : ParamView<acc_t>{};
    acc_t* qp = php + r * C;
    acc_t* qn = phn + r * C;
    // Evaluate as the row direction does (a plain loop into scratch), then merge column-wise: one fused loop
    // left GCC's vectoriser out for policies with more selects (Circle: scalar code, 3x the row direction's time).
    eval_chunk<Policy, acc_t, true>(p, s, w, ck, rk, -1, other, own0, t);
    for (int64_t l = 0; l < w; ++l) {
      const bool vp = t.pos[l] != acc_t(0), vn = t.neg[l] != acc_t(0);
      qp[l] = vp ? t.ph[l] : ninf;
      qn[l] = vn ? t.ph[l] : ninf;
      mp[l] = qp[l] > mp[l] ? qp[l] : mp[l];
      mn[l] = qn[l] > mn[l] ? qn[l] : mn[l];
      cp[l] += t.pos[l];
      cn[l] += t.neg[l];
      if (Policy::kMinMax) {
        minp[l] = t.sp[l] < minp[l] ? t.sp[l] : minp[l];
        maxn[l] = t.sn[l] > maxn[l] ? t.sn[l] : maxn[l];
      }
      if (Policy::kLin) {
        lp[l] += t.lp[l];
        ln[l] += t.ln[l];
      }
      if (Policy::kAux) {
        ap[l] += t.ap[l];
        an[l] += t.an[l];
      }
    }
  }
  for (int64_t l = 0; l < w; ++l) {
    acc_t* a = col_acc + (c0 + j0 + l) * kNumAcc;
    a[kAccLinPos] += lp[l];
    a[kAccLinNeg] += ln[l];
    a[kAccAuxPos] += ap[l];
    a[kAccAuxNeg] += an[l];
    a[kAccCountPos] += cp[l];
    a[kAccCountNeg] += cn[l];
    a[kAccMinPos] = minp[l] < a[kAccMinPos] ? minp[l] : a[kAccMinPos];
    a[kAccMaxNegS] = maxn[l] > a[kAccMaxNegS] ? maxn[l] : a[kAccMaxNegS];
    mp[l] = exp_reference(raise_max(a, kAccMaxPos, kAccSumPos, kAccWPos, mp[l]));
    mn[l] = exp_reference(raise_max(a, kAccMaxNeg, kAccSumNeg, kAccWNeg, mn[l]));
    cp[l] = cn[l] = acc_t(0);
  }
  if (!Policy::kLse) return;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* qp = php + r * C;
    const acc_t* qn = phn + r * C;
    const acc_t* s = S + r * ld + j0;
    for (int64_t l = 0; l < w; ++l) {
      const bool pos = qp[l] != ninf;
      const acc_t e = lse_exp((pos ? qp[l] : qn[l]) - (pos ? mp[l] : mn[l]));
      const acc_t ep = pos ? e : acc_t(0), en = pos ? acc_t(0) : e;
      cp[l] += ep;
      cn[l] += en;
      if constexpr (Policy::kDScale) {  // again: eval_chunk's values were one row's
        const acc_t dsc = p.dphi_dscale(s[l]);
        wp[l] += ep * dsc;
        wn[l] += en * dsc;
      }
    }
  }
  for (int64_t l = 0; l < w; ++l) {
    acc_t* a = col_acc + (c0 + j0 + l) * kNumAcc;
    a[kAccSumPos] += cp[l];
    a[kAccSumNeg] += cn[l];
    a[kAccWPos] += wp[l];
    a[kAccWNeg] += wn[l];
  }
}

// ------------------------------------------------------------ backward epilogue

// Backward coefficients, structure of arrays (kNumGrad arrays of n rows or
// columns): contiguous loads in the column direction of the epilogue.
template <typename acc_t>
struct GradCoefficients {
  const acc_t* data = nullptr;
  int64_t n = 0;
  const acc_t* field(int f) const { return data + f * n; }
};

// Row i's entries s[0..n) (columns c0..) -> g[0..n): dL/ds_ij from the row's
// coefficients, plus (for columns j >= col_from) dL/ds seen from column j
// with the column's coefficients. g may be s (in place).
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void row_backward(const Policy& p, const Problem<acc_t>& pr, const acc_t* s, acc_t* g, int64_t n,
                                        int64_t i, int64_t c0, int64_t skip, const GradCoefficients<acc_t>& rg,
                                        const GradCoefficients<acc_t>& cg, int64_t col_from) {
  // Locals and __restrict__ inputs: g may alias s only (same index), and without them GCC needs more
  // run-time alias checks than it allows and leaves the loops scalar (the mined MS policy: ~3x slower).
  const Policy pol = p;
  const int64_t rk = pr.row_keys[i];
  const int64_t* __restrict__ ck = pr.col_keys + c0;
  acc_t own_values[kMaxParams] = {};
  const ParamView<acc_t> own = local_params(pr, i, own_values);
  const ParamView<acc_t> other0 = pr.col_params(c0);
  const acc_t lp = rg.field(kGLsePos)[i], ln = rg.field(kGLseNeg)[i];
  const acc_t gp = rg.field(kGGradLsePos)[i], gn = rg.field(kGGradLseNeg)[i];
  const acc_t glp = rg.field(kGGradLinPos)[i], gln = rg.field(kGGradLinNeg)[i];
  if (!cg.data) col_from = n;
  if constexpr (Policy::kPositivesOnly) {  // negatives give nothing (eval_chunk): the policy on positives only
    const acc_t* __restrict__ cglp = cg.data ? cg.field(kGGradLinPos) + c0 : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t sj = s[j];
      if (ck[j] != rk) {
        g[j] = acc_t(0);
        continue;
      }
      const ParamView<acc_t> other = other0.moved(j);
      acc_t phi, dphi, dlin, out = acc_t(0);
      if (j != skip && pol.keep(sj, true, own, other)) {
        pol.grad(sj, true, own, other, phi, dphi, dlin);
        out = glp * dlin;
      }
      if (j >= col_from && pol.keep(sj, true, other, own)) {
        pol.grad(sj, true, other, own, phi, dphi, dlin);
        out += cglp[j] * dlin;
      }
      g[j] = out;
    }
    return;
  }
  // The policy's values go through memory (ph, dph, dl) before exp(φ - LSE): the forward's LSE is made of φ rounded
  // (row_forward stores it before its exps), and with FMA (the x86-64-v3/v4 clones) φ - LSE straight from the
  // policy's product contracted into fma(scale, s - 1, -LSE), the unrounded φ. With logits of 1e4-1e5 (info_nce_loss
  // on raw dot products) a lone positive's exp(φ - LSE) = 1 came out exp(±ulp/2), and dL/ds = scale·(e - 1) ~ O(1)
  // where the loss and its gradient are 0. (fp-contract=off on this function instead cost Circle 1.6x: it kept the
  // helpers from inlining.) The fixed-reference epilogues take exp(φ - bound) alike forward and backward.
  acc_t ph[kRowChunk], dph[kRowChunk], dl[kRowChunk];
  for (int64_t j0 = 0; j0 < col_from; j0 += kRowChunk) {
    const int64_t j1 = std::min(col_from, j0 + kRowChunk);
    for (int64_t j = j0; j < j1; ++j)
      pol.grad(s[j], ck[j] == rk, own, other0.moved(j), ph[j - j0], dph[j - j0], dl[j - j0]);
    for (int64_t j = j0; j < j1; ++j) {
      const bool pos = ck[j] == rk;
      const bool valid = (j != skip) & pol.keep(s[j], pos, own, other0.moved(j));
      acc_t d = (pos ? glp : gln) * dl[j - j0];
      if (Policy::kLse) d += (pos ? gp : gn) * lse_exp(ph[j - j0] - (pos ? lp : ln)) * dph[j - j0];
      g[j] = valid ? d : acc_t(0);
    }
  }
  if (col_from >= n) return;
  const acc_t* __restrict__ clp = cg.field(kGLsePos) + c0;
  const acc_t* __restrict__ cln = cg.field(kGLseNeg) + c0;
  const acc_t* __restrict__ cgp = cg.field(kGGradLsePos) + c0;
  const acc_t* __restrict__ cgn = cg.field(kGGradLseNeg) + c0;
  const acc_t* __restrict__ cglp = cg.field(kGGradLinPos) + c0;
  const acc_t* __restrict__ cgln = cg.field(kGGradLinNeg) + c0;
  acc_t ph_t[kRowChunk], dph_t[kRowChunk], dl_t[kRowChunk];
  for (int64_t j0 = col_from; j0 < n; j0 += kRowChunk) {
    const int64_t j1 = std::min(n, j0 + kRowChunk);
    for (int64_t j = j0; j < j1; ++j) {
      const bool pos = ck[j] == rk;
      const ParamView<acc_t> other = other0.moved(j);
      pol.grad(s[j], pos, own, other, ph[j - j0], dph[j - j0], dl[j - j0]);
      pol.grad(s[j], pos, other, own, ph_t[j - j0], dph_t[j - j0], dl_t[j - j0]);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const bool pos = ck[j] == rk;
      const ParamView<acc_t> other = other0.moved(j);
      const bool valid = pol.keep(s[j], pos, own, other);
      const bool valid_t = pol.keep(s[j], pos, other, own);
      const int64_t l = j - j0;
      acc_t d = (pos ? glp : gln) * dl[l];
      acc_t dt = (pos ? cglp[j] : cgln[j]) * dl_t[l];
      if (Policy::kLse) {
        d += (pos ? gp : gn) * lse_exp(ph[l] - (pos ? lp : ln)) * dph[l];
        dt += (pos ? cgp[j] : cgn[j]) * lse_exp(ph_t[l] - (pos ? clp[j] : cln[j])) * dph_t[l];
      }
      g[j] = (valid ? d : acc_t(0)) + (valid_t ? dt : acc_t(0));
    }
  }
}

// The self mode's diagonal block (n × n at the start of rows of stride ld):
// both orders of each pair are row-direction entries, so G += Gᵀ, in place
// (row i owns the pairs j > i: no two tasks touch the same entry; rows go out
// in pairs of equal work, cpu/triangle.h).
template <typename acc_t>
void symmetrize_block(acc_t* G, int64_t ld, int64_t n) {
  parallel_for_triangle_rows(n, 8, [&](int64_t i) {
    acc_t* gi = G + i * ld;
    gi[i] += gi[i];
    for (int64_t j = i + 1; j < n; ++j) {
      const acc_t both = gi[j] + G[j * ld + i];
      gi[j] = both;
      G[j * ld + i] = both;
    }
  });
}

// ------------------------------------------------------------ fixed-reference (shared-exp) epilogues
//
// The general epilogues above take each exp against a running maximum, once for the entry's row and once for
// its column (the self mode's upper triangle serves both): per entry two evaluations, two exps, and max passes.
// When φ has known bounds (Policy::kBounded: rows normalized, so s in [-1, 1]) that span at most
// kSharedMaxRange, every row and column can take exp(φ - hi_c) against its class's upper bound hi_c instead:
// one evaluation and one exp per entry, added to its row's and its column's sums in one pass, no max pass.
// Row parameters that only keep() reads (the MS miner's thresholds) are tested once from the row and once
// from the column. The backward's dL/ds then takes one exp per entry instead of two. B = 2048, D = 128, 2 threads,
// alternating runs (medians of 4): forward+backward of SupCon 14.4 -> 13.2 ms, MS 14.6 -> 12.8, MS with its miner
// 22.8 -> 18.0, GeneralizedLifted 14.9 -> 12.6, the CLIP loss at N = 4096, D = 256 171 -> 156 ms.
// Exact unless a sum falls so low that its terms flushed to 0 (φ - hi_c < -87: lse_exp) would show: the
// forward checks every sum against e^kSharedMinLogSum per term (flushed terms then stay below 1e-7 of it) and
// redoes the call with the general epilogues if one is lower; the backward applies the same test to the LSEs.
// kSharedMaxRange: beyond it a fallback (the whole call again) grows likely; MS's default β = 50 spans 100, and
// at B = 2048 falls back only when some row's negatives all lie below s = -0.25.
constexpr double kSharedMaxRange = 120.0;
constexpr double kSharedMinLogSum = -70.0;
// Columns per task of the forward's fixed-reference epilogue.
constexpr int64_t kSharedBlockCols = 128;
// The sums the fixed-reference epilogues add up, as accumulator fields.
constexpr int kNumSharedSums = 10;
constexpr int kSharedSumFields[kNumSharedSums] = {kAccSumPos, kAccSumNeg, kAccWPos,   kAccWNeg,     kAccLinPos,
                                                  kAccLinNeg, kAccAuxPos, kAccAuxNeg, kAccCountPos, kAccCountNeg};

template <typename acc_t>
inline void add_shared_sums(acc_t* acc, const acc_t* sums) {
  for (int f = 0; f < kNumSharedSums; ++f) acc[kSharedSumFields[f]] += sums[f];
}

// The backward's per-row (per-column) coefficients on the fixed reference: dL/ds_ij = g_lin·dlin/ds +
// a·exp(φ_ij - ref)·dφ/ds, a = g_LSE·exp(ref - LSE) (0 for an empty class, whose entries do not exist).
template <typename acc_t>
struct SharedCoefficients {
  std::vector<acc_t> a;         // (2, n): the positives' a, then the negatives'
  const acc_t* glin = nullptr;  // (2, n): GradCoefficients' kGGradLinPos and kGGradLinNeg fields
  int64_t n = 0;
  bool exact = true;  // every LSE passes the forward's test, and no a overflows
};

// The fixed references of a call: each class's upper bound of φ.
template <typename acc_t>
struct SharedReference {
  acc_t pos = 0, neg = 0;

  // An accumulator with no terms yet and its maxima at the references: acc_finalize's LSE is ref + log(sum).
  void start(acc_t* a) const {
    acc_init(a);
    a[kAccMaxPos] = pos;
    a[kAccMaxNeg] = neg;
  }

  // Whether n accumulators' sums (of at most `terms` terms each) are exact: each non-empty class's sum is at
  // least terms·e^kSharedMinLogSum (NaN passes: it stays NaN either way).
  bool sums_exact(const acc_t* acc, int64_t n, int64_t terms) const {
    const acc_t floor = static_cast<acc_t>(static_cast<double>(terms) * std::exp(kSharedMinLogSum));
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* a = acc + i * kNumAcc;
      if ((a[kAccCountPos] > acc_t(0) && a[kAccSumPos] < floor) ||
          (a[kAccCountNeg] > acc_t(0) && a[kAccSumNeg] < floor))
        return false;
    }
    return true;
  }

  // The backward's coefficients from g (n rows or columns), with the same test on LSE = ref + log(sum).
  SharedCoefficients<acc_t> coefficients(const GradCoefficients<acc_t>& g, int64_t terms) const {
    SharedCoefficients<acc_t> c;
    c.n = g.n;
    c.glin = g.field(kGGradLinPos);
    c.a.assign(2 * g.n, acc_t(0));
    const double floor = kSharedMinLogSum + std::log(static_cast<double>(terms));
    for (int k = 0; k < 2; ++k) {
      const acc_t* lse = g.field(k == 0 ? kGLsePos : kGLseNeg);
      const acc_t* grad = g.field(k == 0 ? kGGradLsePos : kGGradLseNeg);
      const double ref = k == 0 ? pos : neg;
      for (int64_t i = 0; i < g.n; ++i) {
        const double l = lse[i];
        if (l == -std::numeric_limits<double>::infinity()) continue;  // an empty class
        if (l - ref < floor) c.exact = false;                         // (NaN passes)
        const acc_t a = grad[i] * static_cast<acc_t>(std::exp(ref - l));
        if (std::isfinite(static_cast<double>(grad[i])) && std::isfinite(l) && !std::isfinite(static_cast<double>(a)))
          c.exact = false;
        c.a[k * g.n + i] = a;
      }
    }
    return c;
  }
};

// Whether a call can take the fixed-reference epilogues, and its references.
// (A policy that never can is not instantiated with them.)
template <typename Policy>
constexpr bool shared_reference_policy() {
  return Policy::kBounded && Policy::kLse && !Policy::kMinMax && !Policy::kPositivesOnly;
}

template <typename Policy, typename acc_t>
bool shared_reference(const Policy& p, const Problem<acc_t>& pr, SharedReference<acc_t>& ref) {
  if constexpr (!shared_reference_policy<Policy>()) {
    return false;
  } else {
    // bounds hold for normalized rows only; parameters that φ reads are the general epilogues' business
    if (!pr.row_inv_norm || (pr.num_params != 0 && !Policy::kParamsOnlyInKeep)) return false;
    acc_t lo_pos, hi_pos, lo_neg, hi_neg;
    p.phi_bounds(true, lo_pos, hi_pos);
    p.phi_bounds(false, lo_neg, hi_neg);
    if (!(hi_pos - lo_pos <= kSharedMaxRange && hi_neg - lo_neg <= kSharedMaxRange)) return false;  // (NaN: no)
    ref.pos = hi_pos;
    ref.neg = hi_neg;
    return true;
  }
}

// Columns [j0, j1) (at most kSharedBlockCols) of a tile (rows r0.., columns c0.., row stride ld), raw products
// scaled here: each entry's exp once, into its row's sums (part: rows × kNumSharedSums, this block's) and, with
// kColumns, its column's accumulator (col_acc[c0 + j]).
template <bool kColumns, typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void shared_block_forward(const Policy& p, const Problem<acc_t>& pr,
                                                const SharedReference<acc_t>& ref, acc_t* S, int64_t ld, int64_t rows,
                                                int64_t r0, int64_t c0, int64_t j0, int64_t j1, acc_t* part,
                                                acc_t* col_acc) {
  constexpr int64_t L = kSimdLanes, C = kSharedBlockCols;
  constexpr int N = kNumSharedSums;
  const Policy pol = p;
  const int64_t w = j1 - j0;
  const int64_t* __restrict__ ck = pr.col_keys + c0 + j0;
  const ParamView<acc_t> none{};
  const ParamView<acc_t> col_params0 = pr.col_params(c0 + j0);
  const acc_t ref_pos = ref.pos, ref_neg = ref.neg;
  acc_t col[N][C];  // the block's column sums, field-major
  if (kColumns)
    for (int f = 0; f < N; ++f)
      for (int64_t l = 0; l < C; ++l) col[f][l] = acc_t(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r0 + r;
    acc_t* __restrict__ s = S + r * ld + j0;
    similarity_tile_row(pr, s, w, i, c0 + j0);  // in place: saved tiles hold the entries
    const int64_t rk = pr.row_keys[i];
    const int64_t skip = pr.self && i >= c0 + j0 && i < c0 + j1 ? i - (c0 + j0) : -1;
    acc_t row_values[kMaxParams] = {};
    const ParamView<acc_t> row_params = local_params(pr, i, row_values);
    acc_t lanes[N][L];
    for (int f = 0; f < N; ++f)
      for (int64_t l = 0; l < L; ++l) lanes[f][l] = acc_t(0);
    auto entry = [&](int64_t j, int64_t l) {
      const bool pos = ck[j] == rk;
      const ParamView<acc_t> col_params = col_params0.moved(j);
      acc_t phi, lin, aux, dsc;
      pol.eval(s[j], pos, none, none, phi, lin, aux, dsc);  // the same from the row and from the column
      const acc_t e = lse_exp(phi - (pos ? ref_pos : ref_neg));
      // the entry's terms where `valid` (seen from its row, or from its column)
      auto terms = [&](bool valid, acc_t* v) {
        const bool vp = valid & pos, vn = valid & !pos;
        v[0] = vp ? e : acc_t(0);
        v[1] = vn ? e : acc_t(0);
        v[2] = Policy::kDScale ? v[0] * dsc : acc_t(0);
        v[3] = Policy::kDScale ? v[1] * dsc : acc_t(0);
        v[4] = Policy::kLin && vp ? lin : acc_t(0);
        v[5] = Policy::kLin && vn ? lin : acc_t(0);
        v[6] = Policy::kAux && vp ? aux : acc_t(0);
        v[7] = Policy::kAux && vn ? aux : acc_t(0);
        v[8] = vp ? acc_t(1) : acc_t(0);
        v[9] = vn ? acc_t(1) : acc_t(0);
      };
      auto used = [](int f) {
        return !(((f == 2 || f == 3) && !Policy::kDScale) || ((f == 4 || f == 5) && !Policy::kLin) ||
                 ((f == 6 || f == 7) && !Policy::kAux));
      };
      acc_t v[N];
      terms((j != skip) & pol.keep(s[j], pos, row_params, col_params), v);
      for (int f = 0; f < N; ++f)
        if (used(f)) lanes[f][l] += v[f];
      if (kColumns) {
        if (pr.num_params != 0) terms(pol.keep(s[j], pos, col_params, row_params), v);  // (no self pair here)
        for (int f = 0; f < N; ++f)
          if (used(f)) col[f][j] += v[f];
      }
    };
    int64_t j = 0;
    for (; j + L <= w; j += L)
      for (int64_t l = 0; l < L; ++l) entry(j + l, l);
    for (int64_t l = 0; j < w; ++j, ++l) entry(j, l);
    acc_t* out = part + r * N;
    for (int f = 0; f < N; ++f) {
      acc_t total = acc_t(0);
      for (int64_t l = 0; l < L; ++l) total += lanes[f][l];
      out[f] += total;
    }
  }
  if (kColumns)
    for (int64_t l = 0; l < w; ++l) {
      acc_t* a = col_acc + (c0 + j0 + l) * kNumAcc;
      for (int f = 0; f < N; ++f) a[kSharedSumFields[f]] += col[f][l];
    }
}

// row_backward on the fixed reference: one exp per entry (rc: the rows' coefficients, cc: the columns').
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void shared_row_backward(const Policy& p, const Problem<acc_t>& pr,
                                               const SharedReference<acc_t>& ref, const acc_t* s, acc_t* g, int64_t n,
                                               int64_t i, int64_t c0, int64_t skip, const SharedCoefficients<acc_t>& rc,
                                               const SharedCoefficients<acc_t>* cc, int64_t col_from) {
  const Policy pol = p;
  const int64_t rk = pr.row_keys[i];
  const int64_t* __restrict__ ck = pr.col_keys + c0;
  const ParamView<acc_t> none{};
  const acc_t ref_pos = ref.pos, ref_neg = ref.neg;
  const acc_t ap = rc.a[i], an = rc.a[rc.n + i], glp = rc.glin[i], gln = rc.glin[rc.n + i];
  acc_t row_values[kMaxParams] = {};
  const ParamView<acc_t> row_params = local_params(pr, i, row_values);
  const ParamView<acc_t> col_params0 = pr.col_params(c0);
  if (!cc) col_from = n;
  for (int64_t j = 0; j < col_from; ++j) {
    const acc_t sj = s[j];
    const bool pos = ck[j] == rk;
    const bool valid = (j != skip) & pol.keep(sj, pos, row_params, col_params0.moved(j));
    acc_t phi, dphi, dlin;
    pol.grad(sj, pos, none, none, phi, dphi, dlin);
    const acc_t e = lse_exp(phi - (pos ? ref_pos : ref_neg));
    const acc_t d = (pos ? glp : gln) * dlin + (pos ? ap : an) * e * dphi;
    g[j] = valid ? d : acc_t(0);
  }
  if (col_from >= n) return;
  const acc_t* __restrict__ cap = cc->a.data() + c0;
  const acc_t* __restrict__ can = cc->a.data() + cc->n + c0;
  const acc_t* __restrict__ cglp = cc->glin + c0;
  const acc_t* __restrict__ cgln = cc->glin + cc->n + c0;
  for (int64_t j = col_from; j < n; ++j) {
    const acc_t sj = s[j];
    const bool pos = ck[j] == rk;
    const ParamView<acc_t> col_params = col_params0.moved(j);
    const bool valid = pol.keep(sj, pos, row_params, col_params);
    const bool valid_t = pol.keep(sj, pos, col_params, row_params);  // seen from the column
    acc_t phi, dphi, dlin;
    pol.grad(sj, pos, none, none, phi, dphi, dlin);
    const acc_t e = lse_exp(phi - (pos ? ref_pos : ref_neg));
    const acc_t d = (pos ? glp : gln) * dlin + (pos ? ap : an) * e * dphi;
    const acc_t dt = (pos ? cglp[j] : cgln[j]) * dlin + (pos ? cap[j] : can[j]) * e * dphi;
    g[j] = (valid ? d : acc_t(0)) + (valid_t ? dt : acc_t(0));
  }
}

// ------------------------------------------------------------ drivers

// ------------------------------------------------------------ positives-only policies: sparse
//
// NT-Xent's and lifted structure's pair passes (kPositivesOnly) read only the entries of a row's own class:
// a few per row (7 of 2047 at B = 2048, 8 per class). Their similarities are then dot products and their
// gradients scaled row sums; no GEMM tile. Used when the positive pairs are at most 1/16 of the entries and
// the forward keeps no tiles; both ways compute the same sums (up to rounding order).

// Indices 0..n-1 sorted by (key, index), and the sorted keys: a key's positions are one run.
struct KeyGroups {
  std::vector<int64_t> order, keys;
  KeyGroups(const int64_t* k, int64_t n) : order(n), keys(n) {
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return k[a] < k[b]; });
    for (int64_t i = 0; i < n; ++i) keys[i] = k[order[i]];
  }
  // [first, last) of key's run in order
  std::pair<int64_t, int64_t> run(int64_t key) const {
    const auto r = std::equal_range(keys.begin(), keys.end(), key);
    return {r.first - keys.begin(), r.second - keys.begin()};
  }
};

// Positive pairs (i, j) of the problem (the self pairs excluded), from the groups of the column keys.
template <typename acc_t>
int64_t count_positive_pairs(const Problem<acc_t>& pr, const KeyGroups& cols) {
  int64_t total = 0;
  for (int64_t i = 0; i < pr.rows(); ++i) {
    const auto r = cols.run(pr.row_keys[i]);
    total += r.second - r.first - (pr.self ? 1 : 0);
  }
  return total;
}

template <typename acc_t>
bool use_sparse_positives(const Problem<acc_t>& pr, const KeyGroups& cols) {
  return count_positive_pairs(pr, cols) * 16 <= pr.rows() * pr.cols();
}

// normalize=True: the factor 1/(den_i den_j) between the raw product x_i · y_j and s_ij, and between
// dL/ds_ij and the raw rows' coefficient (scale_tile_row's, for one entry); 1 otherwise.
template <typename acc_t>
acc_t entry_scale(const Problem<acc_t>& pr, int64_t i, int64_t j) {
  return pr.row_inv_norm ? pr.row_inv_norm[i] * pr.col_inv_norm[j] : acc_t(1);
}

// s_ij as the tiles have it (similarity_tile_row; (i, j) is not the self pair).
template <typename acc_t>
acc_t pair_similarity(const Problem<acc_t>& pr, int64_t i, int64_t j) {
  const int64_t D = pr.x.size(1);
  const acc_t dot =
      dot_product(pr.x.template const_data_ptr<acc_t>() + i * D, pr.y.template const_data_ptr<acc_t>() + j * D, D);
  const acc_t e = dot * entry_scale(pr, i, j) + (pr.row_offset ? pr.row_offset[i] + pr.col_offset[j] : acc_t(0));
  return pr.refine_below > acc_t(0) && e > refine_bound(pr) ? refined_entry(pr, i, j, e) : e;
}

// forward() for a positives-only policy: each row's lin/aux sums over its positives, its counts.
template <typename Policy, typename acc_t>
void sparse_positives_forward(const Policy& p, const Problem<acc_t>& pr, const KeyGroups& cols, acc_t* row_acc) {
  const int64_t M = pr.cols();
  at::parallel_for(0, pr.rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* a = row_acc + i * kNumAcc;
      const ParamView<acc_t> own = pr.row_params(i);
      const auto run = cols.run(pr.row_keys[i]);
      a[kAccCountNeg] += static_cast<acc_t>(M - (run.second - run.first));
      for (int64_t t = run.first; t < run.second; ++t) {
        const int64_t j = cols.order[t];
        if (pr.self && j == i) continue;
        const ParamView<acc_t> other = pr.self ? pr.row_params(j) : ParamView<acc_t>{};
        const acc_t s = pair_similarity(pr, i, j);
        if (!p.keep(s, true, own, other)) continue;
        acc_t phi, lin, aux, dsc;
        p.eval(s, true, own, other, phi, lin, aux, dsc);
        a[kAccLinPos] += lin;
        a[kAccAuxPos] += aux;
        a[kAccCountPos] += acc_t(1);
      }
    }
  });
}

// dL/ds of the positive entry (i, j) from row i's coefficients (0 where the policy drops it).
template <typename Policy, typename acc_t>
acc_t positive_entry_grad(const Policy& p, acc_t s, ParamView<acc_t> own, ParamView<acc_t> other, acc_t g_lin) {
  if (!p.keep(s, true, own, other)) return acc_t(0);
  acc_t phi, dphi, dlin;
  p.grad(s, true, own, other, phi, dphi, dlin);
  return g_lin * dlin;
}

// backward() for a positive-only policy: grad_x_i += Σ_j G_ij·y_j (self: G_ij from both rows' statistics),
// grad_y_j += Σ_i G_ij·x_i, each row (column) summed by one task in a fixed order.
template <typename Policy, typename acc_t>
void sparse_positives_backward(const Policy& p, const Problem<acc_t>& pr, const KeyGroups& cols,
                               const GradCoefficients<acc_t>& row_g, at::Tensor& grad_x, at::Tensor* grad_y) {
  const int64_t D = pr.x.size(1);
  const acc_t* X = pr.x.template const_data_ptr<acc_t>();
  const acc_t* Y = pr.y.template const_data_ptr<acc_t>();
  const acc_t* glin = row_g.field(kGGradLinPos);
  acc_t* GX = grad_x.mutable_data_ptr<acc_t>();
  at::parallel_for(0, pr.rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const ParamView<acc_t> own = pr.row_params(i);
      const auto run = cols.run(pr.row_keys[i]);
      for (int64_t t = run.first; t < run.second; ++t) {
        const int64_t j = cols.order[t];
        if (pr.self && j == i) continue;
        const ParamView<acc_t> other = pr.self ? pr.row_params(j) : ParamView<acc_t>{};
        const acc_t s = pair_similarity(pr, i, j);
        acc_t d = positive_entry_grad(p, s, own, other, glin[i]);
        if (pr.self) d += positive_entry_grad(p, s, other, own, glin[j]);  // s_ji = s_ij, seen from row j
        subtract_scaled_row(Y + j * D, -d * entry_scale(pr, i, j), D, GX + i * D);
      }
    }
  });
  if (pr.self || !grad_y) return;
  const KeyGroups rows(pr.row_keys, pr.rows());
  acc_t* GY = grad_y->mutable_data_ptr<acc_t>();
  at::parallel_for(0, pr.cols(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const auto run = rows.run(pr.col_keys[j]);
      for (int64_t t = run.first; t < run.second; ++t) {
        const int64_t i = rows.order[t];
        const acc_t s = pair_similarity(pr, i, j);
        const acc_t d = positive_entry_grad(p, s, pr.row_params(i), ParamView<acc_t>{}, glin[i]);
        subtract_scaled_row(X + i * D, -d * entry_scale(pr, i, j), D, GY + j * D);
      }
    }
  });
}

// The forward's tiles, one after the other: strips of R rows, chunks of W columns (self mode: from the strip's
// first row on), each computed by one GEMM into a reused buffer or, with `saved`, into its place there; then
// epilogue(S, rows, r0, c0, cols) on the raw products (row stride cols).
template <typename acc_t, typename Epilogue>
void for_each_forward_tile(const Problem<acc_t>& pr, at::Tensor* saved, const Epilogue& epilogue) {
  const int64_t B = pr.rows(), M = pr.cols();
  int64_t R, W;
  tile_shape(pr, R, W);
  at::Tensor buffer = saved ? *saved : at::empty({R * W}, pr.x.options());
  int64_t offset = 0;  // of the current tile in `saved`
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, offset, rows * cols).view({rows, cols});
      if (saved) offset += rows * cols;
      at::mm_out(S, pr.x.narrow(0, r0, rows), pr.y.narrow(0, c0, cols).t());
      epilogue(S.mutable_data_ptr<acc_t>(), rows, r0, c0, cols);
    }
  }
}

// The general epilogues: running maxima, each entry evaluated and exponentiated once for its row and once for
// its column.
template <typename Policy, typename acc_t>
void general_forward(const Policy& p, const Problem<acc_t>& pr, acc_t* row_acc, acc_t* col_acc, at::Tensor* saved) {
  const bool cols_dir = pr.self || (pr.col_stats && col_acc);
  acc_t* cacc = pr.self ? row_acc : col_acc;
  for_each_forward_tile(pr, saved, [&](acc_t* sp, int64_t rows, int64_t r0, int64_t c0, int64_t cols) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
      std::unique_ptr<ChunkScratch<acc_t>> scratch(new ChunkScratch<acc_t>);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r0 + r;
        const int64_t skip = pr.self && i >= c0 && i < c0 + cols ? i - c0 : -1;
        similarity_tile_row(pr, sp + r * cols, cols, i, c0);  // the column pass below reads it too
        row_forward(p, pr, sp + r * cols, cols, i, c0, skip, row_acc + i * kNumAcc, *scratch);
      }
    });
    if (!cols_dir) return;
    // self: only the columns outside the strip's diagonal block (rows r0..r0+rows)
    const int64_t jfirst = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
    const int64_t nchunks = (cols - jfirst + kColChunk - 1) / kColChunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch;
      std::unique_ptr<ChunkScratch<acc_t>> evaluated(new ChunkScratch<acc_t>);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t j0 = jfirst + t * kColChunk, j1 = std::min(cols, j0 + kColChunk);
        cols_forward(p, pr, sp, cols, rows, r0, c0, j0, j1, cacc, scratch, *evaluated);
      }
    });
  });
}

// The fixed-reference epilogues: one exp per entry, for its row and its column at once.
template <typename Policy, typename acc_t>
void shared_forward(const Policy& p, const Problem<acc_t>& pr, const SharedReference<acc_t>& ref, acc_t* row_acc,
                    acc_t* col_acc, at::Tensor* saved) {
  const bool cols_dir = pr.self || (pr.col_stats && col_acc);
  acc_t* cacc = pr.self ? row_acc : col_acc;
  std::vector<acc_t> parts;
  for_each_forward_tile(pr, saved, [&](acc_t* sp, int64_t rows, int64_t r0, int64_t c0, int64_t cols) {
    // Blocks of kSharedBlockCols columns; a block is either all row-only (the self mode's diagonal block) or all
    // rows-and-columns. The blocks are fixed by the tile, not by the thread count: so is the summation order.
    const int64_t split = !cols_dir ? cols : (pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0);
    const int64_t C = kSharedBlockCols;
    const int64_t row_blocks = (split + C - 1) / C, blocks = row_blocks + (cols - split + C - 1) / C;
    parts.assign(blocks * rows * kNumSharedSums, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const bool columns = b >= row_blocks;
        const int64_t j0 = columns ? split + (b - row_blocks) * C : b * C;
        const int64_t j1 = std::min(columns ? cols : split, j0 + C);
        acc_t* part = parts.data() + b * rows * kNumSharedSums;
        if (columns) {
          shared_block_forward<true>(p, pr, ref, sp, cols, rows, r0, c0, j0, j1, part, cacc);
        } else {
          shared_block_forward<false>(p, pr, ref, sp, cols, rows, r0, c0, j0, j1, part, cacc);
        }
      }
    });
    // serial: ~rows·blocks·10 adds, less than a parallel region's start and join
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* a = row_acc + (r0 + r) * kNumAcc;
      for (int64_t b = 0; b < blocks; ++b) add_shared_sums(a, parts.data() + (b * rows + r) * kNumSharedSums);
    }
  });
}

// Accumulates the statistics of every row (row_acc, (B, kNumAcc), initialised
// by acc_init) and, with pr.col_stats in the non-self mode, of every column
// (col_acc, (M, kNumAcc)). saved (optional, saved_tiles_size entries): the
// tiles are computed there, one after the other, instead of in one reused
// buffer, and kept (as the entries the policy reads: s after the normalize
// scaling, or a distance policy's -d²/2) for the backward, which then skips
// their GEMMs.
template <typename Policy, typename acc_t>
void forward(const Policy& p, const Problem<acc_t>& pr, acc_t* row_acc, acc_t* col_acc, at::Tensor* saved = nullptr) {
  const int64_t B = pr.rows(), M = pr.cols();
  if (B == 0 || M == 0) return;
  if constexpr (Policy::kPositivesOnly) {
    TORCH_INTERNAL_ASSERT(!pr.col_stats, "positives-only policies take row_params: no column statistics");
    const KeyGroups cols(pr.col_keys, M);
    if (!saved && use_sparse_positives(pr, cols)) return sparse_positives_forward(p, pr, cols, row_acc);
  }
  SharedReference<acc_t> ref;
  if constexpr (shared_reference_policy<Policy>()) {
    if (!shared_reference(p, pr, ref)) return general_forward(p, pr, row_acc, col_acc, saved);
    const int64_t ncols = pr.col_stats && col_acc && !pr.self ? M : 0;
    for (int64_t i = 0; i < B; ++i) ref.start(row_acc + i * kNumAcc);
    for (int64_t j = 0; j < ncols; ++j) ref.start(col_acc + j * kNumAcc);
    shared_forward(p, pr, ref, row_acc, col_acc, saved);
    if (ref.sums_exact(row_acc, B, std::max(B, M)) && ref.sums_exact(col_acc, ncols, std::max(B, M))) return;
    // a row's sum too low for the fixed reference (module comment): the general epilogues, from the start
    for (int64_t i = 0; i < B; ++i) acc_init(row_acc + i * kNumAcc);
    for (int64_t j = 0; j < ncols; ++j) acc_init(col_acc + j * kNumAcc);
  }
  general_forward(p, pr, row_acc, col_acc, saved);
}

// Gradients from the per-row (row_g) and, non-self with column statistics,
// per-column (col_g; else empty) coefficients (grad_coefficients, stored as
// GradCoefficients): grad_x (B, D) and, in
// the non-self mode, grad_y (M, D) (both zero-initialised by the caller).
//
// saved (optional): the forward's tiles (forward's `saved`, same tiles): each
// tile's similarities are read from there instead of recomputed by a GEMM
// (they are left unchanged: a retained graph's next backward reads them again).
template <typename Policy, typename acc_t>
void backward(const Policy& p, const Problem<acc_t>& pr, const GradCoefficients<acc_t>& row_g,
              const GradCoefficients<acc_t>& col_g, at::Tensor& grad_x, at::Tensor* grad_y,
              const at::Tensor* saved = nullptr) {
  const int64_t B = pr.rows(), M = pr.cols();
  if (B == 0 || M == 0) return;
  if constexpr (Policy::kPositivesOnly) {
    const KeyGroups cols(pr.col_keys, M);
    if (!saved && use_sparse_positives(pr, cols)) return sparse_positives_backward(p, pr, cols, row_g, grad_x, grad_y);
  }
  int64_t R, W;
  tile_shape(pr, R, W);
  at::Tensor buffer = at::empty({R * W}, pr.x.options());
  const GradCoefficients<acc_t>& cg = pr.self ? row_g : col_g;
  // The fixed reference when every LSE passes the forward's test (then the forward took it too).
  SharedReference<acc_t> ref;
  SharedCoefficients<acc_t> shared_rows, shared_cols;
  bool shared = shared_reference(p, pr, ref);
  if (shared) {
    shared_rows = ref.coefficients(row_g, std::max(B, M));
    if (!pr.self && col_g.data) shared_cols = ref.coefficients(col_g, std::max(B, M));
    shared = shared_rows.exact && shared_cols.exact;
  }
  const SharedCoefficients<acc_t>* shared_cg = !cg.data ? nullptr : (pr.self ? &shared_rows : &shared_cols);
  int64_t offset = 0;  // of the current tile in `saved`
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    const at::Tensor x_rows = pr.x.narrow(0, r0, rows);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      acc_t* sp = S.mutable_data_ptr<acc_t>();
      const acc_t* similarities = sp;  // the tile's s, read by the epilogue; dL/ds goes to sp
      if (saved) {
        similarities = saved->const_data_ptr<acc_t>() + offset;
        offset += rows * cols;
      } else {
        at::mm_out(S, x_rows, pr.y.narrow(0, c0, cols).t());
      }
      const int64_t col_from = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          const int64_t skip = pr.self && i >= c0 && i < c0 + cols ? i - c0 : -1;
          if (!saved) similarity_tile_row(pr, sp + r * cols, cols, i, c0);  // s from the raw product
          if constexpr (!shared_reference_policy<Policy>()) {
            row_backward(p, pr, similarities + r * cols, sp + r * cols, cols, i, c0, skip, row_g, cg, col_from);
          } else if (shared) {
            shared_row_backward(p, pr, ref, similarities + r * cols, sp + r * cols, cols, i, c0, skip, shared_rows,
                                shared_cg, col_from);
          } else {
            row_backward(p, pr, similarities + r * cols, sp + r * cols, cols, i, c0, skip, row_g, cg, col_from);
          }
          scale_tile_row(pr, sp + r * cols, cols, i, c0);  // dL/ds -> coefficients of the raw rows
        }
      });
      const at::Tensor y_cols = pr.y.narrow(0, c0, cols);
      if (pr.self) {
        if (col_from > 0) symmetrize_block(sp, cols, col_from);
        at::Tensor gx_rows = grad_x.narrow(0, r0, rows);
        gx_rows.addmm_(S, y_cols);
        if (col_from < cols) {
          at::Tensor gx_cols = grad_x.narrow(0, c0 + col_from, cols - col_from);
          gx_cols.addmm_(S.narrow(1, col_from, cols - col_from).t(), x_rows);
        }
      } else {
        grad_x.narrow(0, r0, rows).addmm_(S, y_cols);
        if (grad_y) grad_y->narrow(0, c0, cols).addmm_(S.t(), x_rows);
      }
    }
  }
}

// Finished statistics (n, kNumStats) from accumulators (n, kNumAcc).
template <typename acc_t>
void finalize(const acc_t* acc, int64_t n, acc_t* stats) {
  for (int64_t i = 0; i < n; ++i) acc_finalize(acc + i * kNumAcc, stats + i * kNumStats);
}

}  // namespace lse_engine
}  // namespace cpu
}  // namespace metricops

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC pop_options
#endif
