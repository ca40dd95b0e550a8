"""The ``memory=`` rule of the losses on a labelled batch: whether the B×B distance matrix is held, and in what blocks.

The rule, stated once:

- ``memory="matrix"`` holds the whole B×B matrix; ``"streaming"`` computes it in
  blocks of rows, each block's distances recomputed in the backward, so the
  extra memory is O(block·B + B·D); ``"auto"`` streams from B =
  ``AUTO_STREAM_MIN_B`` (a 4096² float32 matrix is 64 MiB) and holds the
  matrix below. A loss whose ``reduction="none"`` returns B×B terms cannot
  stream (``check_streaming_reduction``).
- ``block_rows(memory, embeddings)`` is what the streaming ops get as their
  ``block_rows`` argument: 0 means the matrix path (no streaming); otherwise
  the rows of one block: ``CPU_STREAM_BLOCK_ROWS`` on CPU (a cache-sized
  block), and on CUDA as many rows as keep the block's scratch under
  ``CUDA_STREAM_BLOCK_BYTES`` (at least one row: at very large B the budget,
  not a minimum row count, decides). The scratch per entry is
  ``bytes_per_entry``: 4 (a float32 distance) for the kernels that only keep
  distances, ``SORTING_BYTES_PER_ENTRY`` for the sorting kernels (semi-hard,
  batch-all).
- The ops' own ``block_rows`` argument (schemas in csrc/metricops.cpp) reads
  ``<= 0`` differently per op, and the wrappers rely on it only where it means
  "one block": semihard/batch-all streaming and batch-hard (on CUDA: one block
  of all rows, the matrix path; on CPU batch-hard streams 128-row Gram blocks
  in both modes) get 0 for the matrix path. ``contrastive_loss_streaming``
  never holds all rows: ``<= 0`` picks the per-device block of the rule above
  (the C++ repeats CPU_STREAM_BLOCK_ROWS and CUDA_STREAM_BLOCK_BYTES), and the
  wrapper calls it only with a positive block. Python loops over row blocks
  take their step from ``rows_per_block`` (``<= 0``: one block).

``_FORCED_STREAM_BLOCK_ROWS`` is a test hook (tests/test_streaming_blocks.py,
scripts/gpu_smoke.py): when set, every streamed call gets blocks of that many
rows on CPU and CUDA alike, so that block boundaries fall where a test wants
them; None in normal use.
"""

from __future__ import annotations

import torch

MEMORY_MODES = ("auto", "matrix", "streaming")

AUTO_STREAM_MIN_B = 4096
CPU_STREAM_BLOCK_ROWS = 256
CUDA_STREAM_BLOCK_BYTES = 256 * 2**20
# Live scratch bytes per distance-block entry of the CUDA sorting kernels at
# their peak (batch-all's block: float32 distances, bool masks, two stable
# segmented sorts with their int64 indices and temporaries, the gathered
# sorted copies, float64 prefix sums and per-entry sums and counts: about
# 80-100 bytes). tests/test_cuda_review.py measures it on a GPU.
SORTING_BYTES_PER_ENTRY = 112

_FORCED_STREAM_BLOCK_ROWS = None


def check_memory(memory) -> str:
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of 'auto', 'matrix', 'streaming', got {memory!r}")
    return memory


def check_streaming_reduction(memory: str, reduction: str) -> None:
    if memory == "streaming" and reduction == "none":
        raise ValueError(
            "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming' "
            "('none' returns a B×B tensor), got 'none'"
        )


def block_rows(memory: str, embeddings: torch.Tensor, bytes_per_entry: int = 4) -> int:
    """Rows of the distance matrix a streaming kernel holds at once; 0: hold the whole matrix (no streaming)."""
    check_memory(memory)
    batch = embeddings.shape[0]
    if memory == "matrix" or (memory == "auto" and batch < AUTO_STREAM_MIN_B):
        return 0
    if _FORCED_STREAM_BLOCK_ROWS is not None:
        return _FORCED_STREAM_BLOCK_ROWS
    if embeddings.device.type == "cuda":
        return max(1, CUDA_STREAM_BLOCK_BYTES // (bytes_per_entry * max(batch, 1)))
    return CPU_STREAM_BLOCK_ROWS


def rows_per_block(block_rows: int, num_rows: int) -> int:
    """The step of a Python loop over row blocks: ``block_rows``, or all ``num_rows`` (at least 1) when it is <= 0."""
    return block_rows if block_rows > 0 else max(num_rows, 1)
