// Row blocks of the CUDA triplet ops (cuda/triplet_rows.cu), shared by the
// matrix ops (cuda/triplet_miners.cu: one block of all B rows) and the
// streaming ops (cuda/triplet_streaming.cu: bounded blocks, so nothing of
// size B×B is ever allocated). x: (B, D) contiguous embeddings; aux: their
// row_aux_acc_cuda; labels: int64.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/distance.h"
#include "common/row_blocks.h"

namespace metricops {
namespace cuda {

// Live scratch bytes per entry of a sorting row block at its peak (batch-all:
// distances, masks, two stable segmented sorts with their indices and
// temporaries, float64 prefix and term sums, counts). Python's block sizes
// use the same number (_SORTING_BYTES_PER_ENTRY); tests/test_cuda_review.py
// measures it on a GPU. Only triplet_statistics, which has no block_rows
// argument, sizes its blocks from it here.
constexpr int64_t kSortingScratchBytesPerEntry = 112;

// Calls fn(row_begin, rows) over consecutive blocks of rows_per_block(block_rows, B) rows.
template <typename Fn>
void for_each_row_block(int64_t B, int64_t block_rows, const Fn& fn) {
  const int64_t step = rows_per_block(block_rows, B);
  for (int64_t r0 = 0; r0 < B; r0 += step) fn(r0, std::min(step, B - r0));
}

struct SemihardRows {
  at::Tensor losses;    // (rows, B) acc dtype, 0 off valid pairs
  at::Tensor negative;  // (rows, B) int64, -1 off valid pairs
  at::Tensor dist;      // (rows, B) acc dtype
};

SemihardRows semihard_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                           int64_t rows, Metric metric, double margin);

struct BatchAllRows {
  at::Tensor term_sum;      // () float64: the rows' summed terms
  at::Tensor num_valid;     // () int64
  at::Tensor num_active;    // () int64
  at::Tensor multiplicity;  // (rows, B) acc dtype: d(term sum)/d(dist)
  at::Tensor dist;          // (rows, B) acc dtype
};

BatchAllRows batch_all_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                            int64_t rows, Metric metric, double margin);

// triplet_statistics' (total, easy, semihard, hard) counts, int64 (4,), of
// the anchors [row_begin, row_begin + rows).
at::Tensor statistics_rows(const at::Tensor& x, const at::Tensor& aux, const at::Tensor& labels, int64_t row_begin,
                           int64_t rows, Metric metric, double margin);

// batch_hard_triplet's CUDA kernel (cuda/batch_hard.cu), which mine_triplets
// calls for strategy "batch_hard".
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_hard_triplet_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, c10::string_view metric_name, bool soft,
    int64_t block_rows, bool normalize);

}  // namespace cuda
}  // namespace metricops
