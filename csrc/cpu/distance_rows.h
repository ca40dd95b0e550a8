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

#include "common/distance.h"
#include "cpu/simd.h"

namespace metricops {
namespace cpu {

// Rows per parallel task: enough work to amortise scheduling.
inline int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename scalar_t, Metric kMetric>
METRICOPS_SIMD_CLONES void distance_row(const scalar_t* dot, const scalar_t* y_aux, scalar_t x_aux, int64_t n,
                                        scalar_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = distance_from_dot<scalar_t>(kMetric, x_aux, y_aux[j], dot[j]);
}

// (rows,) row_aux of a (rows, dim) matrix, in its dtype.
inline at::Tensor row_aux_cpu(const at::Tensor& x_in, Metric metric) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor aux = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "metricops_row_aux_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* ap = aux.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) ap[i] = metricops::row_aux<scalar_t>(metric, squared_norm(xp + i * dim, dim));
    });
  });
  return aux;
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
  if (block_rows <= 0 || block_rows > B || dist != nullptr) block_rows = B;
  at::Tensor buffer = dist != nullptr ? *dist : at::empty({block_rows, B}, x.options());
  const at::Tensor xt = x.t();
  const scalar_t* ap = aux.const_data_ptr<scalar_t>();
  for (int64_t r0 = 0; r0 < B; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, B - r0);
    at::Tensor block = dist != nullptr ? buffer.narrow(0, r0, rows) : buffer.narrow(0, 0, rows);
    at::mm_out(block, x.narrow(0, r0, rows), xt);
    scalar_t* bp = block.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = bp + r * B;
        distance_row<scalar_t, kMetric>(row, ap, ap[r0 + r], B, row);
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
