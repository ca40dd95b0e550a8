"""memory="streaming" gives the matrix path's results, including off block boundaries."""

import pytest
import torch

import metricops
from metricops import _memory
from metricops import triplet as triplet_module
from common import METRICS, assert_close, cpu_and_cuda


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of 7 rows: every batch below crosses several block boundaries.
    monkeypatch.setattr(_memory, "CPU_STREAM_BLOCK_ROWS", 7)
    monkeypatch.setattr(_memory, "CUDA_STREAM_BLOCK_BYTES", 7 * 4 * 64)


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
def test_contrastive_streaming_gradcheck(device, small_blocks):
    x = torch.randn(12, 4, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0], device=device)
    for metric in METRICS:
        fn = lambda t: metricops.contrastive_loss(t, labels, metric=metric, memory="streaming", neg_margin=3.0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_streaming_refuses_none_reduction():
    with pytest.raises(
        ValueError, match="reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming'"
    ):
        metricops.contrastive_loss(
            torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), memory="streaming", reduction="none"
        )


def test_auto_streams_large_batches(monkeypatch):
    monkeypatch.setattr(_memory, "AUTO_STREAM_MIN_B", 16)
    calls = []
    real = torch.ops.metricops.contrastive_loss_streaming

    x = torch.randn(20, 3)
    labels = torch.randint(0, 3, (20,))
    expected = metricops.contrastive_loss(x, labels, memory="matrix")
    monkeypatch.setattr(
        metricops.contrastive,
        "ops",
        type("Ops", (), {"contrastive_loss_streaming": lambda *a: calls.append(1) or real(*a)}),
    )
    assert_close(metricops.contrastive_loss(x, labels), expected)
    assert calls == [1]


# --------------------------------------------------------------------------- semi-hard and batch-all

SORTING_LOSSES = ("semihard_triplet_loss", "batch_all_triplet_loss")


def _sorting_batches(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(99)
    for B, classes in ((0, 1), (1, 1), (2, 2), (9, 1), (23, 4), (40, 40), (64, 8), (71, 3)):
        x = torch.randn(B, 6, generator=gen, dtype=dtype).to(device)
        yield x, torch.randint(0, classes, (B,), generator=gen).to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", SORTING_LOSSES)
@pytest.mark.parametrize("metric", METRICS)
def test_sorting_losses_streaming_match_matrix_and_reference(device, name, metric, small_blocks):
    fn, ref = getattr(metricops, name), getattr(metricops.reference, name)
    for x, labels in _sorting_batches(device):
        x.requires_grad_()
        for reduction in ("mean", "sum", "mean_nonzero"):
            kw = dict(metric=metric, reduction=reduction, margin=0.3)
            a = fn(x, labels, memory="matrix", **kw)
            b = fn(x, labels, memory="streaming", **kw)
            assert_close(b, a)
            assert_close(b, ref(x, labels, **kw))
            if x.shape[0] > 0:
                assert_close(torch.autograd.grad(b, x)[0], torch.autograd.grad(a, x)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_sorting_losses_streaming_gradcheck(device, small_blocks):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0], device=device)
    for name in SORTING_LOSSES:
        for metric in METRICS:
            fn = lambda t: getattr(metricops, name)(t, labels, metric=metric, memory="streaming", margin=0.5)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_sorting_losses_streaming_nan_and_empty(device, small_blocks):
    x = torch.randn(20, 4, device=device)
    x[3, 1] = float("nan")
    labels = torch.randint(0, 3, (20,), device=device)
    for name in SORTING_LOSSES:
        assert torch.isnan(getattr(metricops, name)(x, labels, memory="streaming"))
        for no_triplet in (torch.zeros(5, dtype=torch.int64), torch.arange(5)):
            z = torch.randn(5, 3, device=device, requires_grad=True)
            loss = getattr(metricops, name)(z, no_triplet.to(device), memory="streaming")
            assert loss.item() == 0.0 and loss.requires_grad
            assert torch.all(torch.autograd.grad(loss, z)[0] == 0)


def test_sorting_losses_streaming_refuse_none_and_bad_grad():
    x, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="with memory='streaming'"):
        metricops.semihard_triplet_loss(x, labels, memory="streaming", reduction="none")
    with pytest.raises(ValueError, match="memory must be one of"):
        metricops.batch_all_triplet_loss(x, labels, memory="blocks")
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.metricops.semihard_triplet_streaming_backward(torch.ones(3), x, labels, 0.2, "euclidean", 2)
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.metricops.batch_all_triplet_streaming_backward(torch.ones(4), x, labels, 0.2, "euclidean", 2)


def test_sorting_losses_auto_stream_large_batches(monkeypatch):
    monkeypatch.setattr(_memory, "AUTO_STREAM_MIN_B", 16)
    x, labels = torch.randn(20, 3), torch.randint(0, 3, (20,))
    calls = []
    real = torch.ops.metricops

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    expected = [
        metricops.semihard_triplet_loss(x, labels, memory="matrix"),
        metricops.batch_all_triplet_loss(x, labels, memory="matrix"),
    ]
    monkeypatch.setattr(triplet_module, "ops", Spy())
    assert_close(metricops.semihard_triplet_loss(x, labels), expected[0])
    assert_close(metricops.batch_all_triplet_loss(x, labels), expected[1])
    metricops.semihard_triplet_loss(x, labels, reduction="none")  # "auto" keeps the matrix for "none"
    assert calls == ["semihard_triplet_streaming", "batch_all_triplet_streaming", "semihard_triplet"]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_sorting_losses_streaming_compile_fullgraph(device, small_blocks):
    torch._dynamo.reset()

    def fn(x, labels):
        return metricops.semihard_triplet_loss(
            x, labels, memory="streaming", metric="cosine"
        ) + metricops.batch_all_triplet_loss(x, labels, memory="streaming")

    x = torch.randn(24, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 4, (24,), device=device)
    out_c = torch.compile(fn, fullgraph=True)(x, labels)
    out_e = fn(x, labels)
    assert_close(out_c, out_e)
    assert_close(torch.autograd.grad(out_c, x)[0], torch.autograd.grad(out_e, x)[0])


def test_distributed_contrastive_streams_in_row_blocks(monkeypatch, small_blocks):
    # DistributedLoss scores contrastive anchors row block by row block when memory="streaming":
    # no call, forward or backward (recomputation), sees more than a block of rows.
    from metricops import contrastive as contrastive_module
    from metricops.distributed import DistributedLoss

    shapes = []
    real = torch.ops.metricops

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)
            if name != "pairwise_distance":
                return op

            def record(x, y, metric):
                shapes.append((tuple(x.shape), tuple(y.shape)))
                return op(x, y, metric)

            return record

    monkeypatch.setattr(contrastive_module, "ops", Spy())
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (30,))
    for reduction in ("mean", "sum", "mean_nonzero"):
        shapes.clear()
        module = metricops.nn.ContrastiveLoss(neg_margin=2.0, reduction=reduction, memory="streaming")
        out = DistributedLoss(module)(x, labels)
        (g,) = torch.autograd.grad(out, x)
        expected = metricops.contrastive_loss(x, labels, neg_margin=2.0, reduction=reduction, memory="matrix")
        assert_close(out, expected)
        assert_close(g, torch.autograd.grad(expected, x)[0])
        assert len(shapes) == 2 * 5 and all(q[0] <= 7 and db == (30, 5) for q, db in shapes), shapes  # 5 blocks, twice


def test_contrastive_streaming_backward_checks_grad_and_denom():
    """grad and denom are 0-dim: a (B, D) grad was broadcast into the gradient (a garbage result), a (B,) one
    failed in a broadcast naming nothing. The kernel and the fake kernel say the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.metricops
    x, labels = torch.randn(6, 4), torch.arange(6) // 2
    _, denom = ops.contrastive_loss_streaming(x, labels, 0.0, 1.0, "euclidean", False, "mean", 2)
    cases = [
        ((torch.ones(6, 4), denom), r"grad must be a 0-dim tensor \(the loss's gradient\), got shape \[6, 4\]"),
        ((torch.ones(6), denom), r"grad must be a 0-dim tensor"),
        ((torch.ones(()), torch.ones(6, 4, dtype=denom.dtype)), r"denom must be a 0-dim tensor"),
    ]
    for (grad, den), message in cases:
        call = lambda: ops.contrastive_loss_streaming_backward(grad, x, labels, den, 0.0, 1.0, "euclidean", False, 2)  # noqa: E731
        with pytest.raises(ValueError, match=message):
            call()
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=message):
            call()
