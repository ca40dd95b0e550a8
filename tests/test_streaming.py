"""memory="streaming" gives the matrix path's results, including off block boundaries."""

import pytest
import torch

import metricops
from metricops import triplet as triplet_module
from common import assert_close, cpu_and_cuda

METRICS = ("euclidean", "sqeuclidean", "cosine")


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of 7 rows: every batch below crosses several block boundaries.
    monkeypatch.setattr(triplet_module, "_CPU_STREAM_BLOCK_ROWS", 7)
    monkeypatch.setattr(triplet_module, "_CUDA_STREAM_BLOCK_BYTES", 7 * 4 * 64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_contrastive_streaming_matches_matrix(device, metric, reduction, small_blocks):
    for B, classes in ((0, 1), (1, 1), (2, 2), (23, 4), (64, 64), (50, 1)):
        x = torch.randn(B, 6, dtype=torch.float64, device=device, requires_grad=True)
        labels = torch.randint(0, classes, (B,), device=device)
        for squared in (False, True):
            kw = dict(metric=metric, reduction=reduction, squared=squared, pos_margin=0.1, neg_margin=1.5)
            a = metricops.contrastive_loss(x, labels, memory="matrix", **kw)
            b = metricops.contrastive_loss(x, labels, memory="streaming", **kw)
            assert_close(b, a)
            if B > 0:
                assert_close(torch.autograd.grad(b, x)[0], torch.autograd.grad(a, x)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_batch_hard_streaming_matches_matrix(device, metric, small_blocks):
    for B in (1, 2, 23, 64):
        x = torch.randn(B, 5, dtype=torch.float64, device=device, requires_grad=True)
        labels = torch.randint(0, 5, (B,), device=device)
        a = metricops.batch_hard_triplet_loss(x, labels, metric=metric, memory="matrix", reduction="none")
        b = metricops.batch_hard_triplet_loss(x, labels, metric=metric, memory="streaming", reduction="none")
        assert_close(b, a)
        w = torch.randn_like(a)
        assert_close(torch.autograd.grad((b * w).sum(), x)[0], torch.autograd.grad((a * w).sum(), x)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_contrastive_streaming_gradcheck_and_opcheck(device, small_blocks):
    x = torch.randn(12, 4, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0], device=device)
    for metric in METRICS:
        fn = lambda t: metricops.contrastive_loss(t, labels, metric=metric, memory="streaming", neg_margin=3.0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)
    args = (x, labels, 0.0, 3.0, "euclidean", False, "mean", 5)
    torch.library.opcheck(torch.ops.metricops.contrastive_loss_streaming.default, args)
    loss, denom = torch.ops.metricops.contrastive_loss_streaming(x.detach(), *args[1:])
    torch.library.opcheck(
        torch.ops.metricops.contrastive_loss_streaming_backward.default,
        (torch.ones_like(loss), x.detach(), labels, denom, 0.0, 3.0, "euclidean", False, 5),
    )


def test_streaming_refuses_none_reduction():
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming'"):
        metricops.contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), memory="streaming", reduction="none")


def test_auto_streams_large_batches(monkeypatch):
    monkeypatch.setattr(triplet_module, "_AUTO_STREAM_MIN_B", 16)
    calls = []
    real = torch.ops.metricops.contrastive_loss_streaming

    x = torch.randn(20, 3)
    labels = torch.randint(0, 3, (20,))
    expected = metricops.contrastive_loss(x, labels, memory="matrix")
    monkeypatch.setattr(
        metricops.contrastive, "ops", type("Ops", (), {"contrastive_loss_streaming": lambda *a: calls.append(1) or real(*a)})
    )
    assert_close(metricops.contrastive_loss(x, labels), expected)
    assert calls == [1]
