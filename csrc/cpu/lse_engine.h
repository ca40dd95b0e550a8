// The CPU tile driver of the streaming log-sum-exp engine (common/lse_stats.h
// has the statistics and the policies). Usable from any .cpp: templates on a
// policy.
//
// Tiles: the rows go in strips of block_rows; each strip's similarities with
// the columns are one BLAS GEMM per chunk of block_cols columns (at::mm_out
// into one reused buffer), followed by vectorised epilogues that update
// per-row (and per-column) statistics. Nothing rows × columns is ever held
// beyond one strip chunk: extra memory O(block_rows·block_cols + (B + M)·D).
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
#include <cstdint>
#include <vector>

#include "common/lse_stats.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {
namespace lse_engine {

using namespace ::metricops::lse;

// The default tile: strips of 256 rows, chunks of up to 4M entries (16 MiB
// of float32 similarities): large enough for BLAS, small enough for cache-
// friendly epilogues and a bounded footprint.
constexpr int64_t kDefaultBlockRows = 256;
constexpr int64_t kDefaultTileEntries = int64_t{1} << 22;
// Columns per task of the column-direction epilogue.
constexpr int64_t kColChunk = 64;

template <typename acc_t>
struct Problem {
  at::Tensor x;  // (B, D) contiguous, acc_t
  at::Tensor y;  // (M, D) contiguous, acc_t; x itself in the self mode
  bool self = false;
  const int64_t* row_keys = nullptr;  // (B,)
  const int64_t* col_keys = nullptr;  // (M,); row_keys in the self mode
  const acc_t* params = nullptr;      // (B, num_params) row parameters, or nullptr
  int64_t num_params = 0;
  bool col_stats = false;  // non-self mode: also accumulate per-column statistics
  int64_t block_rows = 0;  // <= 0: the defaults
  int64_t block_cols = 0;

  int64_t rows() const { return x.size(0); }
  int64_t cols() const { return y.size(0); }
  const acc_t* row_params(int64_t i) const { return params ? params + i * num_params : nullptr; }
  const acc_t* col_params(int64_t j) const { return self && params ? params + j * num_params : nullptr; }
};

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

// ------------------------------------------------------------ forward epilogues

// Row i's entries s[0..n) (columns c0..c0+n): merges their statistics into
// acc. `skip`: the local index of the self pair, or -1.
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void row_forward(const Policy& p, const Problem<acc_t>& pr, const acc_t* s, int64_t n, int64_t i,
                                       int64_t c0, int64_t skip, acc_t* acc) {
  constexpr int64_t L = kSimdLanes;
  const int64_t rk = pr.row_keys[i];
  const int64_t* ck = pr.col_keys + c0;
  const acc_t* own = pr.row_params(i);
  const int64_t P = pr.num_params;
  const acc_t* other0 = pr.self && pr.params ? pr.params + c0 * P : nullptr;
  const acc_t ninf = neg_inf<acc_t>(), pinf = pos_inf<acc_t>();
  acc_t mp[L], mn[L], lp[L], ln[L], ap[L], an[L], cp[L], cn[L], minp[L], maxn[L];
  for (int64_t l = 0; l < L; ++l) {
    mp[l] = mn[l] = maxn[l] = ninf;
    minp[l] = pinf;
    lp[l] = ln[l] = ap[l] = an[l] = cp[l] = cn[l] = acc_t(0);
  }
  auto pass1 = [&](int64_t j, int64_t l) {
    const bool pos = ck[j] == rk;
    const acc_t* other = other0 ? other0 + j * P : nullptr;
    const bool valid = j != skip && p.keep(s[j], pos, own, other);
    acc_t phi, lin, aux, dsc;
    p.eval(s[j], pos, own, other, phi, lin, aux, dsc);
    const bool vp = valid && pos, vn = valid && !pos;
    const acc_t php = vp ? phi : ninf, phn = vn ? phi : ninf;
    mp[l] = php > mp[l] ? php : mp[l];
    mn[l] = phn > mn[l] ? phn : mn[l];
    lp[l] += vp ? lin : acc_t(0);
    ln[l] += vn ? lin : acc_t(0);
    ap[l] += vp ? aux : acc_t(0);
    an[l] += vn ? aux : acc_t(0);
    cp[l] += vp ? acc_t(1) : acc_t(0);
    cn[l] += vn ? acc_t(1) : acc_t(0);
    const acc_t sp = vp ? s[j] : pinf, sn = vn ? s[j] : ninf;
    minp[l] = sp < minp[l] ? sp : minp[l];
    maxn[l] = sn > maxn[l] ? sn : maxn[l];
  };
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) pass1(j + l, l);
  for (int64_t l = 0; j < n; ++j, ++l) pass1(j, l);
  acc_t tmp = ninf, tmn = ninf;
  for (int64_t l = 0; l < L; ++l) {
    tmp = mp[l] > tmp ? mp[l] : tmp;
    tmn = mn[l] > tmn ? mn[l] : tmn;
    acc[kAccLinPos] += lp[l];
    acc[kAccLinNeg] += ln[l];
    acc[kAccAuxPos] += ap[l];
    acc[kAccAuxNeg] += an[l];
    acc[kAccCountPos] += cp[l];
    acc[kAccCountNeg] += cn[l];
    acc[kAccMinPos] = minp[l] < acc[kAccMinPos] ? minp[l] : acc[kAccMinPos];
    acc[kAccMaxNegS] = maxn[l] > acc[kAccMaxNegS] ? maxn[l] : acc[kAccMaxNegS];
  }
  if (!Policy::kLse) return;
  const acc_t refp = raise_max(acc, kAccMaxPos, kAccSumPos, kAccWPos, tmp);
  const acc_t refn = raise_max(acc, kAccMaxNeg, kAccSumNeg, kAccWNeg, tmn);
  // cp/cn/lp/ln reused as the lanes of the exp sums and the scale-weighted sums
  for (int64_t l = 0; l < L; ++l) cp[l] = cn[l] = lp[l] = ln[l] = acc_t(0);
  auto pass2 = [&](int64_t j, int64_t l) {
    const bool pos = ck[j] == rk;
    const acc_t* other = other0 ? other0 + j * P : nullptr;
    const bool valid = j != skip && p.keep(s[j], pos, own, other);
    acc_t phi, lin, aux, dsc;
    p.eval(s[j], pos, own, other, phi, lin, aux, dsc);
    const acc_t e = lse_exp(phi - (pos ? refp : refn));
    const bool vp = valid && pos, vn = valid && !pos;
    cp[l] += vp ? e : acc_t(0);
    cn[l] += vn ? e : acc_t(0);
    lp[l] += vp ? e * dsc : acc_t(0);
    ln[l] += vn ? e * dsc : acc_t(0);
  };
  j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) pass2(j + l, l);
  for (int64_t l = 0; j < n; ++j, ++l) pass2(j, l);
  for (int64_t l = 0; l < L; ++l) {
    acc[kAccSumPos] += cp[l];
    acc[kAccSumNeg] += cn[l];
    acc[kAccWPos] += lp[l];
    acc[kAccWNeg] += ln[l];
  }
}

// Columns [j0, j1) of a strip (rows r0..r0+rows of S, row stride `ld`):
// merges each column's statistics (its entries s_ij seen from column j) into
// col_acc + j * kNumAcc (global column index c0 + j).
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void cols_forward(const Policy& p, const Problem<acc_t>& pr, const acc_t* S, int64_t ld,
                                        int64_t rows, int64_t r0, int64_t c0, int64_t j0, int64_t j1, acc_t* col_acc) {
  constexpr int64_t C = kColChunk;
  const int64_t w = j1 - j0;
  const int64_t P = pr.num_params;
  const int64_t* ck = pr.col_keys + c0 + j0;
  const acc_t ninf = neg_inf<acc_t>(), pinf = pos_inf<acc_t>();
  acc_t mp[C], mn[C], lp[C], ln[C], ap[C], an[C], cp[C], cn[C], minp[C], maxn[C];
  for (int64_t l = 0; l < w; ++l) {
    mp[l] = mn[l] = maxn[l] = ninf;
    minp[l] = pinf;
    lp[l] = ln[l] = ap[l] = an[l] = cp[l] = cn[l] = acc_t(0);
  }
  const acc_t* own0 = pr.self && pr.params ? pr.params + (c0 + j0) * P : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = S + r * ld + j0;
    const int64_t rk = pr.row_keys[r0 + r];
    const acc_t* other = pr.self ? pr.row_params(r0 + r) : nullptr;
    for (int64_t l = 0; l < w; ++l) {
      const bool pos = ck[l] == rk;
      const acc_t* own = own0 ? own0 + l * P : nullptr;
      const bool valid = p.keep(s[l], pos, own, other);
      acc_t phi, lin, aux, dsc;
      p.eval(s[l], pos, own, other, phi, lin, aux, dsc);
      const bool vp = valid && pos, vn = valid && !pos;
      const acc_t php = vp ? phi : ninf, phn = vn ? phi : ninf;
      mp[l] = php > mp[l] ? php : mp[l];
      mn[l] = phn > mn[l] ? phn : mn[l];
      lp[l] += vp ? lin : acc_t(0);
      ln[l] += vn ? lin : acc_t(0);
      ap[l] += vp ? aux : acc_t(0);
      an[l] += vn ? aux : acc_t(0);
      cp[l] += vp ? acc_t(1) : acc_t(0);
      cn[l] += vn ? acc_t(1) : acc_t(0);
      const acc_t sp = vp ? s[l] : pinf, sn = vn ? s[l] : ninf;
      minp[l] = sp < minp[l] ? sp : minp[l];
      maxn[l] = sn > maxn[l] ? sn : maxn[l];
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
    // references for the exp pass
    mp[l] = raise_max(a, kAccMaxPos, kAccSumPos, kAccWPos, mp[l]);
    mn[l] = raise_max(a, kAccMaxNeg, kAccSumNeg, kAccWNeg, mn[l]);
    cp[l] = cn[l] = lp[l] = ln[l] = acc_t(0);
  }
  if (!Policy::kLse) return;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = S + r * ld + j0;
    const int64_t rk = pr.row_keys[r0 + r];
    const acc_t* other = pr.self ? pr.row_params(r0 + r) : nullptr;
    for (int64_t l = 0; l < w; ++l) {
      const bool pos = ck[l] == rk;
      const acc_t* own = own0 ? own0 + l * P : nullptr;
      const bool valid = p.keep(s[l], pos, own, other);
      acc_t phi, lin, aux, dsc;
      p.eval(s[l], pos, own, other, phi, lin, aux, dsc);
      const acc_t e = lse_exp(phi - (pos ? mp[l] : mn[l]));
      const bool vp = valid && pos, vn = valid && !pos;
      cp[l] += vp ? e : acc_t(0);
      cn[l] += vn ? e : acc_t(0);
      lp[l] += vp ? e * dsc : acc_t(0);
      ln[l] += vn ? e * dsc : acc_t(0);
    }
  }
  for (int64_t l = 0; l < w; ++l) {
    acc_t* a = col_acc + (c0 + j0 + l) * kNumAcc;
    a[kAccSumPos] += cp[l];
    a[kAccSumNeg] += cn[l];
    a[kAccWPos] += lp[l];
    a[kAccWNeg] += ln[l];
  }
}

// ------------------------------------------------------------ backward epilogue

// Row i's entries s[0..n) (columns c0..) -> G in place: dL/ds_ij from the row's
// coefficients, plus (for columns j >= col_from) dL/ds seen from column j
// with the column's coefficients (col_g + j * kNumGrad).
template <typename Policy, typename acc_t>
METRICOPS_SIMD_CLONES void row_backward(const Policy& p, const Problem<acc_t>& pr, acc_t* s, int64_t n, int64_t i,
                                        int64_t c0, int64_t skip, const acc_t* row_g, const acc_t* col_g,
                                        int64_t col_from) {
  const int64_t rk = pr.row_keys[i];
  const int64_t* ck = pr.col_keys + c0;
  const acc_t* own = pr.row_params(i);
  const int64_t P = pr.num_params;
  const acc_t* other0 = pr.self && pr.params ? pr.params + c0 * P : nullptr;
  const acc_t* g = row_g + i * kNumGrad;
  if (!col_g) col_from = n;
  for (int64_t j = 0; j < col_from; ++j) {
    const bool pos = ck[j] == rk;
    const acc_t* other = other0 ? other0 + j * P : nullptr;
    const bool valid = j != skip && p.keep(s[j], pos, own, other);
    const acc_t d = entry_grad(p, s[j], pos, own, other, g);
    s[j] = valid ? d : acc_t(0);
  }
  for (int64_t j = col_from; j < n; ++j) {
    const bool pos = ck[j] == rk;
    const acc_t* other = other0 ? other0 + j * P : nullptr;
    const bool valid = p.keep(s[j], pos, own, other);
    const bool valid_t = p.keep(s[j], pos, other, own);
    const acc_t d = entry_grad(p, s[j], pos, own, other, g);
    const acc_t dt = entry_grad(p, s[j], pos, other, own, col_g + (c0 + j) * kNumGrad);
    s[j] = (valid ? d : acc_t(0)) + (valid_t ? dt : acc_t(0));
  }
}

// ------------------------------------------------------------ drivers

// Accumulates the statistics of every row (row_acc, (B, kNumAcc), initialised
// by acc_init) and, with pr.col_stats in the non-self mode, of every column
// (col_acc, (M, kNumAcc)).
template <typename Policy, typename acc_t>
void forward(const Policy& p, const Problem<acc_t>& pr, acc_t* row_acc, acc_t* col_acc) {
  const int64_t B = pr.rows(), M = pr.cols();
  if (B == 0 || M == 0) return;
  int64_t R, W;
  tile_shape(pr, R, W);
  at::Tensor buffer = at::empty({R * W}, pr.x.options());
  const bool cols_dir = pr.self || (pr.col_stats && col_acc);
  acc_t* cacc = pr.self ? row_acc : col_acc;
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(S, pr.x.narrow(0, r0, rows), pr.y.narrow(0, c0, cols).t());
      const acc_t* sp = S.const_data_ptr<acc_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          const int64_t skip = pr.self && i >= c0 && i < c0 + cols ? i - c0 : -1;
          row_forward(p, pr, sp + r * cols, cols, i, c0, skip, row_acc + i * kNumAcc);
        }
      });
      if (!cols_dir) continue;
      // self: only the columns outside the strip's diagonal block (rows r0..r0+rows)
      const int64_t jfirst = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
      const int64_t nchunks = (cols - jfirst + kColChunk - 1) / kColChunk;
      at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t j0 = jfirst + t * kColChunk, j1 = std::min(cols, j0 + kColChunk);
          cols_forward(p, pr, sp, cols, rows, r0, c0, j0, j1, cacc);
        }
      });
    }
  }
}

// Gradients from the per-row (row_g, (B, kNumGrad)) and, non-self with
// column statistics, per-column (col_g) coefficients: grad_x (B, D) and, in
// the non-self mode, grad_y (M, D) (both zero-initialised by the caller).
template <typename Policy, typename acc_t>
void backward(const Policy& p, const Problem<acc_t>& pr, const acc_t* row_g, const acc_t* col_g, at::Tensor& grad_x,
              at::Tensor* grad_y) {
  const int64_t B = pr.rows(), M = pr.cols();
  if (B == 0 || M == 0) return;
  int64_t R, W;
  tile_shape(pr, R, W);
  at::Tensor buffer = at::empty({R * W}, pr.x.options());
  const acc_t* cg = pr.self ? row_g : col_g;
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t rows = std::min(R, B - r0);
    const at::Tensor x_rows = pr.x.narrow(0, r0, rows);
    for (int64_t c0 = pr.self ? r0 : 0; c0 < M; c0 += W) {
      const int64_t cols = std::min(W, M - c0);
      at::Tensor S = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(S, x_rows, pr.y.narrow(0, c0, cols).t());
      acc_t* sp = S.mutable_data_ptr<acc_t>();
      const int64_t col_from = pr.self ? std::max<int64_t>(0, r0 + rows - c0) : 0;
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r0 + r;
          const int64_t skip = pr.self && i >= c0 && i < c0 + cols ? i - c0 : -1;
          row_backward(p, pr, sp + r * cols, cols, i, c0, skip, row_g, cg, col_from);
        }
      });
      const at::Tensor y_cols = pr.y.narrow(0, c0, cols);
      if (pr.self) {
        if (col_from > 0) {  // diagonal block: both orders of each pair are row-direction entries
          at::Tensor diag = S.narrow(1, 0, col_from);
          diag.add_(diag.t().clone());
        }
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
