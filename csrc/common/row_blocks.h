// The C++ side of the memory= rule: how an op's `block_rows` argument turns
// into the number of rows of the B×B distance matrix held at once.
//
// The default block sizes are chosen in Python, in one place (metricops/_memory.py,
// from the memory= argument and the device); the C++ ops take whatever
// block_rows they are given. Only a direct torch.ops call with block_rows <= 0
// reaches the `rows_when_unset` fallbacks below.
#pragma once

#include <algorithm>
#include <cstdint>

namespace metricops {

// Rows per block: block_rows when > 0, else rows_when_unset; clamped to
// [1, B]. The ops' schemas (csrc/metricops.cpp) say what each passes as
// rows_when_unset: all B rows (one block) for the triplet ops, a bounded
// device default for contrastive_loss_streaming (it promises never to hold
// the whole matrix).
inline int64_t rows_per_block(int64_t block_rows, int64_t B, int64_t rows_when_unset) {
  const int64_t rows = block_rows > 0 ? block_rows : rows_when_unset;
  return std::max<int64_t>(1, std::min(rows, B));
}

// block_rows <= 0: one block of all B rows.
inline int64_t rows_per_block(int64_t block_rows, int64_t B) { return rows_per_block(block_rows, B, B); }

}  // namespace metricops
