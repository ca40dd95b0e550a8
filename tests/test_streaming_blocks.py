"""Streaming kernels give the matrix path's results wherever the block boundaries fall.

metricops._memory._FORCED_STREAM_BLOCK_ROWS forces the rows per block on CPU and CUDA alike (the CUDA
default is sized by a byte budget, which tests cannot shrink to a few rows reliably), so every streaming
loss crosses several block boundaries, ends on a ragged last block, and runs with a block larger than B.
"""

import pytest
import torch

import metricops
from metricops import _memory
from common import METRICS, assert_close, cpu_and_cuda


LOSSES = {
    "contrastive": lambda x, labels, memory, metric: metricops.contrastive_loss(
        x, labels, metric=metric, memory=memory, pos_margin=0.1, neg_margin=1.5, reduction="sum"
    ),
    "batch_hard": lambda x, labels, memory, metric: metricops.batch_hard_triplet_loss(
        x, labels, metric=metric, memory=memory, margin=0.3, reduction="sum"
    ),
    "semihard": lambda x, labels, memory, metric: metricops.semihard_triplet_loss(
        x, labels, metric=metric, memory=memory, margin=0.3, reduction="sum"
    ),
    "batch_all": lambda x, labels, memory, metric: metricops.batch_all_triplet_loss(
        x, labels, metric=metric, memory=memory, margin=0.3, reduction="sum"
    ),
}


@pytest.fixture
def force_block_rows(monkeypatch):
    def force(rows):
        monkeypatch.setattr(_memory, "_FORCED_STREAM_BLOCK_ROWS", rows)

    return force


def _loss_and_grad(fn, x, labels, memory, metric):
    x = x.detach().requires_grad_()
    loss = fn(x, labels, memory, metric)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("metric", METRICS)
def test_forced_block_sizes_match_matrix(device, name, metric, force_block_rows):
    fn = LOSSES[name]
    gen = torch.Generator().manual_seed(3)
    for B, classes in ((5, 2), (17, 3), (40, 6)):
        x = torch.randn(B, 4, generator=gen, dtype=torch.float64).to(device)
        labels = torch.randint(0, classes, (B,), generator=gen).to(device)
        expected, expected_grad = _loss_and_grad(fn, x, labels, "matrix", metric)
        # 1 row; a few rows with a ragged last block; B - 1 (one row left over); exactly B; more than B.
        for rows in (1, 3, 7, B - 1, B, B + 5):
            force_block_rows(rows)
            assert _memory.block_rows("streaming", x) == rows
            loss, grad = _loss_and_grad(fn, x, labels, "streaming", metric)
            assert_close(loss, expected)
            assert_close(grad, expected_grad)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_direct_streaming_ops_cross_block_boundaries(device):
    """The ops' own block_rows argument: blocks of 1..B+1 rows give one result."""
    ops = torch.ops.metricops
    gen = torch.Generator().manual_seed(4)
    B = 19
    x = torch.randn(B, 5, generator=gen, dtype=torch.float64).to(device)
    labels = torch.randint(0, 4, (B,), generator=gen).to(device)
    ref = {
        "contrastive": ops.contrastive_loss_streaming(x, labels, 0.1, 1.5, "euclidean", False, "sum", B)[0],
        "semihard": ops.semihard_triplet_streaming(x, labels, 0.3, "euclidean", B)[0],
        "batch_all": ops.batch_all_triplet_streaming(x, labels, 0.3, "euclidean", B)[0],
        "batch_hard": ops.batch_hard_triplet(x, labels, 0.3, "euclidean", False, B)[0],
    }
    for rows in (1, 2, 5, 18, 20, 0):
        assert_close(
            ops.contrastive_loss_streaming(x, labels, 0.1, 1.5, "euclidean", False, "sum", rows)[0], ref["contrastive"]
        )
        assert_close(ops.semihard_triplet_streaming(x, labels, 0.3, "euclidean", rows)[0], ref["semihard"])
        assert_close(ops.batch_all_triplet_streaming(x, labels, 0.3, "euclidean", rows)[0], ref["batch_all"])
        assert_close(ops.batch_hard_triplet(x, labels, 0.3, "euclidean", False, rows)[0], ref["batch_hard"])
