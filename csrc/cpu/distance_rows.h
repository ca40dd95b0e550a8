// CPU building blocks shared by the kernels that consume distance rows:
// row auxiliaries, and distance rows of x against itself computed block by
// block (one BLAS GEMM per block, then a vectorised epilogue per row).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <type_traits>

#include "common/distance.h"
#include "common/row_blocks.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {

// Rows per parallel task: enough work to amortise scheduling.
inline int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// The rows whose distances a Gram row holds, for the exactness guard of
// common/distance.h: row x against rows y[j * dim ...], with row scales
// (1 unless normalize=True is fused; then the Gram entries are already
// scaled) and the guard's tolerance.
template <typename scalar_t>
struct ExactRows {
  const scalar_t* x;
  scalar_t x_scale;
  const scalar_t* y;         // row j at y + j * dim
  const scalar_t* y_scales;  // nullptr: all 1
  int64_t dim;
  scalar_t tol;
};

// Gram row -> distance keys (distance_key), or distances (key_to_distance)
// when kDistances, over columns [0, n), in place allowed (out may be dot),
// with the exactness guard: returns whether any entry needs the explicit
// form; the caller then runs exact_keys_fixup.
// Column `skip` (the row's own diagonal entry, or -1) never asks for the
// explicit form: its key is ~0 by construction, and a fix-up pass over every
// row for it would double the epilogue's cost; callers set or ignore it.
template <typename scalar_t, Metric kMetric, bool kDistances>
METRICOPS_SIMD_CLONES bool guarded_row(const scalar_t* dot, const scalar_t* y_aux, scalar_t x_aux, int64_t n,
                                       scalar_t tol, scalar_t* out, int64_t skip = -1) {
  int32_t any = 0;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t k = distance_key<scalar_t>(kMetric, x_aux, y_aux[j], dot[j]);
    any |= static_cast<int32_t>(gram_key_needs_exact<scalar_t>(kMetric, k, x_aux, y_aux[j], tol)) &
           static_cast<int32_t>(j != skip);
    out[j] = kDistances ? key_to_distance<scalar_t>(kMetric, k) : k;
  }
  return any != 0;
}

// Replaces the values that need it by their explicit value (rare: near-
// duplicate rows, NaN, over/underflow). `values` hold keys, or distances when
// kDistances (then the key is taken back as d² for euclidean: an entry at the
// threshold may go either way, and both values are valid).
template <typename scalar_t, Metric kMetric, bool kDistances = false>
void exact_keys_fixup(const ExactRows<scalar_t>& rows, const scalar_t* y_aux, scalar_t x_aux, int64_t j0, int64_t n,
                      scalar_t* values, int64_t skip = -1) {
  const scalar_t fx = exact_row_factor<scalar_t>(kMetric, rows.x_scale, x_aux);
  for (int64_t j = 0; j < n; ++j) {
    if (j == skip) continue;
    const scalar_t key = kDistances && kMetric == Metric::Euclidean ? values[j] * values[j] : values[j];
    if (!gram_key_needs_exact<scalar_t>(kMetric, key, x_aux, y_aux[j], rows.tol)) continue;
    const int64_t col = j0 + j;
    const scalar_t fy = exact_row_factor<scalar_t>(kMetric, rows.y_scales ? rows.y_scales[col] : scalar_t(1), y_aux[j]);
    const scalar_t exact =
        exact_distance_key<scalar_t>(kMetric, rows.x, fx, rows.y + col * rows.dim, fy, rows.dim, rows.tol);
    values[j] = kDistances ? key_to_distance<scalar_t>(kMetric, exact) : exact;
  }
}

// Gram row (columns [j0, j0 + n) of row x) -> guarded distances, in place
// allowed. `y_aux` points at column j0's aux. `skip`: as for guarded_row (relative to the segment).
template <typename scalar_t, Metric kMetric>
void distance_row(const scalar_t* dot, const scalar_t* y_aux, scalar_t x_aux, int64_t n, scalar_t* out,
                  const ExactRows<scalar_t>& rows, int64_t j0 = 0, int64_t skip = -1) {
  if (guarded_row<scalar_t, kMetric, true>(dot, y_aux, x_aux, n, rows.tol, out, skip)) {
    exact_keys_fixup<scalar_t, kMetric, true>(rows, y_aux, x_aux, j0, n, out, skip);
  }
}

// Row i of the self-distance matrix of x (rows of `dim` at xp) from its Gram
// row (dot_row, B entries; out may alias it), with the exactness guard; the
// diagonal entry is left to the caller (see guarded_row's `skip`).
template <typename scalar_t, Metric kMetric>
void self_distance_row(const scalar_t* dot_row, const scalar_t* xp, const scalar_t* aux, int64_t i, int64_t B,
                       int64_t dim, scalar_t tol, scalar_t* out) {
  const ExactRows<scalar_t> rows{xp + i * dim, scalar_t(1), xp, nullptr, dim, tol};
  distance_row<scalar_t, kMetric>(dot_row, aux, aux[i], B, out, rows, 0, i);
}

// (rows,) tensor of f(row, dim) over the rows of a (rows, dim) matrix, in
// its dtype, in parallel; f takes `const scalar_t*` (a generic lambda).
template <typename F>
at::Tensor map_rows_cpu(const at::Tensor& x_in, const F& f) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_map_rows_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = f(xp + i * dim, dim);
    });
  });
  return out;
}

// (rows,) row_aux of a (rows, dim) matrix, in its dtype.
inline at::Tensor row_aux_cpu(const at::Tensor& x, Metric metric) {
  return map_rows_cpu(x, [metric](const auto* row, int64_t dim) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(row)>>;
    return checked_row_aux<scalar_t>(metric, squared_norm(row, dim), row, dim);
  });
}

// Calls block_fn(row_begin, block) for consecutive row blocks of the
// self-distance matrix of x, where block is a (rows, B) tensor of distances
// (entry (r, row_begin + r) exactly 0 for the euclidean metrics) that
// block_fn may overwrite. Blocks hold `block_rows` rows (<= 0: all at once)
// and are computed into `dist` when given (which then holds the whole
// matrix), else into one reused buffer, so memory stays O(block_rows * B).
template <typename scalar_t, Metric kMetric, typename BlockFn>
void for_each_distance_block(const at::Tensor& x, const at::Tensor& aux, int64_t block_rows, at::Tensor* dist,
                             const BlockFn& block_fn) {
  const int64_t B = x.size(0);
  if (B == 0) return;
  block_rows = dist != nullptr ? B : rows_per_block(block_rows, B);
  at::Tensor buffer = dist != nullptr ? *dist : at::empty({block_rows, B}, x.options());
  TORCH_INTERNAL_ASSERT(x.is_contiguous());
  const at::Tensor xt = x.t();
  const scalar_t* ap = aux.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t dim = x.size(1);
  const scalar_t tol = gram_tolerance<scalar_t>(dim);
  for (int64_t r0 = 0; r0 < B; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, B - r0);
    at::Tensor block = dist != nullptr ? buffer.narrow(0, r0, rows) : buffer.narrow(0, 0, rows);
    at::mm_out(block, x.narrow(0, r0, rows), xt);
    scalar_t* bp = block.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = bp + r * B;
        self_distance_row<scalar_t, kMetric>(row, xp, ap, r0 + r, B, dim, tol, row);
        if (kMetric != Metric::Cosine) row[r0 + r] = scalar_t(0);
      }
    });
    block_fn(r0, block);
  }
}

// Calls row_fn(i, row) for every row i of the self-distance matrix of x, in
// parallel, where row points at its B distances; see for_each_distance_block.
template <typename scalar_t, Metric kMetric, typename RowFn>
void for_each_distance_row(const at::Tensor& x, const at::Tensor& aux, int64_t block_rows, at::Tensor* dist,
                           const RowFn& row_fn) {
  const int64_t B = x.size(0);
  for_each_distance_block<scalar_t, kMetric>(x, aux, block_rows, dist, [&](int64_t r0, const at::Tensor& block) {
    const scalar_t* bp = block.const_data_ptr<scalar_t>();
    at::parallel_for(0, block.size(0), rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_fn(r0 + r, bp + r * B);
    });
  });
}

}  // namespace cpu
}  // namespace metricops
