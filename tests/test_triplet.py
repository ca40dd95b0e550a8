import copy
import re

import pytest
import torch

import metricops
from metricops import reference
from common import METRICS, assert_close, cpu_and_cuda, make_layout

LOSSES = ("batch_hard_triplet_loss", "semihard_triplet_loss", "batch_all_triplet_loss")
REDUCTIONS = {
    "batch_hard_triplet_loss": ("mean", "sum", "mean_nonzero", "none"),
    "semihard_triplet_loss": ("mean", "sum", "mean_nonzero", "none"),
    "batch_all_triplet_loss": ("mean", "sum", "mean_nonzero"),
}


def label_patterns(B, gen):
    """Many and few classes, singletons, one class, all distinct."""
    yield "few", torch.randint(0, 3, (B,), generator=gen)
    yield "many", torch.randint(0, max(1, B // 2), (B,), generator=gen)
    yield "one_class", torch.zeros(B, dtype=torch.int64)
    yield "distinct", torch.arange(B) * 7 - 3
    if B >= 3:
        lab = torch.randint(0, 2, (B,), generator=gen)
        lab[-1] = 99  # a singleton class: anchors with no positive
        yield "singleton", lab


def sample_inputs(device, dtype=torch.float64, requires_grad=False, sizes=(0, 1, 2, 5, 13, 40)):
    """One list drives parity, gradient and opcheck tests: (embeddings, labels, id)."""
    gen = torch.Generator().manual_seed(1234)
    for B in sizes:
        for name, labels in label_patterns(B, gen):
            x = torch.randn(B, 6, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
            yield x, labels.to(device), f"B{B}-{name}"


def _loss(name, impl, x, labels, **kw):
    return getattr(impl, name)(x, labels, **kw)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", LOSSES)
def test_losses_match_reference(device, dtype, name):
    for x, labels, case in sample_inputs(device, dtype):
        for metric in METRICS:
            for normalize in (False, True):
                for reduction in REDUCTIONS[name]:
                    kw = dict(metric=metric, normalize=normalize, reduction=reduction, margin=0.3)
                    out = _loss(name, metricops, x, labels, **kw)
                    expected = _loss(name, reference, x.double(), labels, **kw)
                    tol = 1e-9 if dtype == torch.float64 else 2e-4
                    assert_close(out, expected.to(out.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients_match_reference(device, name):
    # Random float64 data: no ties among distances, no hinge exactly at 0.
    for x, labels, case in sample_inputs(device, requires_grad=True):
        for metric, normalize in [(m, n) for m in METRICS for n in (False, True)]:
            reduction = "sum" if name != "batch_hard_triplet_loss" else "mean"
            kw = dict(metric=metric, reduction=reduction, margin=0.3, normalize=normalize)
            (g,) = torch.autograd.grad(_loss(name, metricops, x, labels, **kw), x, allow_unused=True)
            (g_ref,) = torch.autograd.grad(_loss(name, reference, x, labels, **kw), x, allow_unused=True)
            g = torch.zeros_like(x) if g is None else g
            g_ref = torch.zeros_like(x) if g_ref is None else g_ref
            assert_close(g, g_ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_soft_batch_hard(device):
    for x, labels, case in sample_inputs(device, requires_grad=True, sizes=(5, 13)):
        out = metricops.batch_hard_triplet_loss(x, labels, soft=True, reduction="none")
        expected = reference.batch_hard_triplet_loss(x, labels, soft=True, reduction="none")
        assert_close(out, expected)
        g = torch.autograd.grad(out.sum(), x, allow_unused=True)[0]
        g_ref = torch.autograd.grad(expected.sum(), x, allow_unused=True)[0]
        if g is not None and g_ref is not None:
            assert_close(g, g_ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(device, name):
    gen = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 2, 1], device=device)
    for metric in METRICS:
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        kw = dict(metric=metric, margin=0.5)
        assert torch.autograd.gradcheck(lambda t: _loss(name, metricops, t, labels, **kw), (x,), eps=1e-6, atol=1e-5)
        # normalize=True (fused into the batch-hard op): gradient through F.normalize.
        kw_norm = dict(kw, normalize=True, margin=0.2)
        assert torch.autograd.gradcheck(
            lambda t: _loss(name, metricops, t, labels, **kw_norm), (x,), eps=1e-6, atol=1e-5
        )
        if name != "batch_all_triplet_loss":
            kw["reduction"] = "none"
            assert torch.autograd.gradcheck(
                lambda t: _loss(name, metricops, t, labels, **kw), (x,), eps=1e-6, atol=1e-5
            )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_layouts_and_int32_labels(device):
    x = torch.randn(20, 7, dtype=torch.float64, device=device)
    labels = torch.randint(-5, 5, (20,), device=device)
    for layout in ("transposed", "strided", "offset"):
        xl = make_layout(x, layout)
        for name in LOSSES:
            assert_close(_loss(name, metricops, xl, labels.int()), _loss(name, reference, x, labels))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_huge_and_negative_labels(device):
    x = torch.randn(16, 5, dtype=torch.float64, device=device)
    small = torch.randint(0, 3, (16,), device=device)
    huge = small * (2**62) - 2**62
    for name in LOSSES:
        assert_close(_loss(name, metricops, x, huge), _loss(name, reference, x, small))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_duplicate_embeddings(device):
    base = torch.randn(4, 5, dtype=torch.float64, device=device)
    x = torch.cat([base, base]).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], device=device)
    for name in LOSSES:
        for metric in METRICS:
            loss = _loss(name, metricops, x, labels, metric=metric)
            (g,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert_close(loss, _loss(name, reference, x, labels, metric=metric))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", LOSSES)
def test_no_valid_triplet_gives_attached_zero(device, name):
    for labels in (torch.zeros(5, dtype=torch.int64), torch.arange(5)):
        x = torch.randn(5, 3, device=device, requires_grad=True)
        loss = _loss(name, metricops, x, labels.to(device))
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, x)
        assert torch.all(g == 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_gives_nan_and_valid_indices(device):
    x = torch.randn(10, 4, device=device)
    x[3, 1] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0], device=device)
    for name in LOSSES:
        assert torch.isnan(_loss(name, metricops, x, labels))
    _, positive, negative, _, _ = torch.ops.metricops.batch_hard_triplet(x, labels, 0.2, "euclidean", False, 0)
    assert ((positive >= 0) & (positive < 10)).all() and ((negative >= 0) & (negative < 10)).all()
    _, neg, _ = torch.ops.metricops.semihard_triplet(x, labels, 0.2, "euclidean")
    assert ((neg >= -1) & (neg < 10)).all()
    for strategy in ("all", "violating", "semihard", "hard", "easy", "batch_hard"):
        for idx in metricops.mine_triplets(x, labels, strategy=strategy):
            assert ((idx >= 0) & (idx < 10)).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ties_send_gradient_to_one_index(device):
    # Two positives at exactly the same distance: the gradient reaches one.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], dtype=torch.float64, device=device)
    x.requires_grad_()
    labels = torch.tensor([0, 0, 0, 1], device=device)
    loss = metricops.batch_hard_triplet_loss(x, labels, margin=5.0, reduction="none")
    (g,) = torch.autograd.grad(loss[0], x)
    assert (g[1].abs().sum() > 0) != (g[2].abs().sum() > 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_semihard_selection_rule(device):
    for x, labels, case in sample_inputs(device, sizes=(5, 13)):
        _, neg, _ = torch.ops.metricops.semihard_triplet(x, labels, 0.2, "euclidean")
        assert torch.equal(neg.cpu(), reference.semihard_negatives(x.cpu(), labels.cpu()))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_streaming_matches_matrix(device):
    x = torch.randn(300, 16, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 30, (300,), device=device)
    for metric in METRICS:
        a = metricops.batch_hard_triplet_loss(x, labels, metric=metric, memory="matrix", reduction="none")
        b = metricops.batch_hard_triplet_loss(x, labels, metric=metric, memory="streaming", reduction="none")
        assert_close(a, b)
        assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_statistics_and_miner_match_reference(device, dtype):
    for x, labels, case in sample_inputs(device, dtype):
        for metric in METRICS:
            stats = metricops.triplet_statistics(x, labels, margin=0.3, metric=metric)
            expected = reference.triplet_statistics(x, labels, margin=0.3, metric=metric)
            for key in ("total", "easy", "semihard", "hard"):
                assert stats[key].dtype == torch.int64
                if dtype == torch.float64:
                    assert int(stats[key]) == int(expected[key]), (case, metric, key)
            assert int(stats["total"]) == int(stats["easy"] + stats["semihard"] + stats["hard"])
            if dtype != torch.float64:
                continue
            for strategy in ("all", "violating", "semihard", "hard", "easy", "batch_hard"):
                got = metricops.mine_triplets(x, labels, strategy=strategy, margin=0.3, metric=metric)
                want = reference.mine_triplets(x, labels, strategy=strategy, margin=0.3, metric=metric)
                for g, w in zip(got, want):
                    assert g.dtype == torch.int64
                    assert torch.equal(g.cpu(), w.cpu()), (case, metric, strategy)


def test_statistics_exact_counts_small_example():
    # 1-D points: anchors/positives/negatives laid out by hand.
    x = torch.tensor([[0.0], [1.0], [0.5], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    s = metricops.triplet_statistics(x, labels, margin=1.0)
    # valid triplets: (0,1,{2,3}), (1,0,{2,3}), (2,3,{0,1}), (3,2,{0,1}) = 8
    assert int(s["total"]) == 8
    assert int(s["easy"] + s["semihard"] + s["hard"]) == 8
    assert {k: int(v) for k, v in s.items()} == {
        k: int(v) for k, v in reference.triplet_statistics(x, labels, margin=1.0).items()
    }


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def fn(x, labels):
        return (
            metricops.batch_hard_triplet_loss(x, labels)
            + metricops.semihard_triplet_loss(x, labels, metric="cosine")
            + metricops.batch_all_triplet_loss(x, labels, normalize=True)
        )

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(24, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 4, (24,), device=device)
    out_c = compiled(x, labels)
    (g_c,) = torch.autograd.grad(out_c, x)
    out_e = fn(x, labels)
    (g_e,) = torch.autograd.grad(out_e, x)
    assert_close(out_c, out_e)
    assert_close(g_c, g_e)


def test_modules():
    x = torch.randn(12, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,))
    pairs = [
        (
            metricops.nn.BatchHardTripletLoss(margin=0.3, metric="cosine"),
            reference.batch_hard_triplet_loss,
            dict(margin=0.3, metric="cosine"),
        ),
        (metricops.nn.SemiHardTripletLoss(margin=0.1), reference.semihard_triplet_loss, dict(margin=0.1)),
        (metricops.nn.BatchAllTripletLoss(reduction="mean"), reference.batch_all_triplet_loss, dict(reduction="mean")),
    ]
    for module, ref, kw in pairs:
        assert_close(module(x, labels), ref(x, labels, **kw))
        assert "margin" in repr(module)


def _module_cases():
    """(module class, its functional, inputs, {argument: a new value that changes the result})."""
    x = torch.randn(10, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    a, p, n = (torch.randn(10, 4, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1, 0])
    mnn = metricops.nn
    labelled = dict(margin=5.0, metric="cosine", normalize=True, reduction="sum", memory="streaming")
    return [
        (mnn.BatchHardTripletLoss, metricops.batch_hard_triplet_loss, (x, labels), dict(labelled, soft=True)),
        (mnn.SemiHardTripletLoss, metricops.semihard_triplet_loss, (x, labels), labelled),
        (mnn.BatchAllTripletLoss, metricops.batch_all_triplet_loss, (x, labels), dict(labelled, reduction="mean")),
        (
            mnn.ContrastiveLoss,
            metricops.contrastive_loss,
            (x, labels),
            dict(
                pos_margin=0.5,
                neg_margin=5.0,
                metric="sqeuclidean",
                squared=True,
                normalize=True,
                reduction="sum",
                memory="streaming",
            ),
        ),
        (
            mnn.TripletMarginLoss,
            metricops.triplet_margin_loss,
            (a, p, n),
            dict(margin=5.0, p=1.0, eps=0.5, swap=True, reduction="sum"),
        ),
        (
            mnn.PairContrastiveLoss,
            metricops.pair_contrastive_loss,
            (a, p, y),
            dict(margin=5.0, metric="cosine", squared=True, reduction="sum"),
        ),
        (mnn.PairwiseDistance, metricops.pairwise_distance, (x,), dict(metric="cosine", normalize=True)),
    ]


@pytest.mark.parametrize("cls, fn, inputs, changes", [pytest.param(*c, id=c[0].__name__) for c in _module_cases()])
def test_module_arguments_are_live_attributes(cls, fn, inputs, changes):
    # Every constructor argument is an attribute, read at each forward (margin schedules).
    for name, value in changes.items():
        module = cls()
        before = module(*inputs)
        assert hasattr(module, name), name
        setattr(module, name, value)
        out = module(*inputs)
        assert_close(out, fn(*inputs, **{name: value}))
        if name != "memory":  # the same result either way
            assert not torch.equal(out, before), name
        assert f"{name}={value!r}" in repr(module) if isinstance(value, str) else f"{name}={value}" in repr(module)
    # Plain attributes, as torch.nn's losses: an empty state_dict; copies keep the current values.
    module = cls(**changes)
    assert module.state_dict() == {}
    module.load_state_dict({})
    clone = copy.deepcopy(module)
    for name, value in changes.items():
        assert getattr(clone, name) == value
    assert_close(clone(*inputs), fn(*inputs, **changes))


@pytest.mark.parametrize(
    "cls", [metricops.nn.BatchHardTripletLoss, metricops.nn.SemiHardTripletLoss, metricops.nn.BatchAllTripletLoss]
)
def test_module_forward_validates_reassigned_attributes(cls):
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for name, bad, exc, text in (
        ("margin", -1.0, ValueError, "margin must be >= 0.0, got -1.0"),
        ("margin", "0.3", TypeError, "margin must be a number, got str"),
        ("metric", "l1", ValueError, "metric must be one of"),
        ("normalize", 1, TypeError, "normalize must be a bool, got int"),
        ("memory", "disk", ValueError, "memory must be one of"),
        ("reduction", "avg", ValueError, "reduction must be one of"),
    ):
        module = cls()
        setattr(module, name, bad)
        with pytest.raises(exc, match=re.escape(text)):
            module(x, labels)
    # A streaming module reassigned to reduction="none": refused by name (batch-hard streams (B,) terms).
    module = cls(memory="streaming")
    module.reduction = "none"
    if cls is metricops.nn.BatchHardTripletLoss:
        assert module(x, labels).shape == (6,)
    else:
        with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'mean_nonzero'"):
            module(x, labels)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda: metricops.batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.int64)),
            ValueError,
            "labels must be a 1-D tensor of length B=4",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(4)),
            TypeError,
            "labels must be int32 or int64",
        ),
        (
            lambda: metricops.semihard_triplet_loss(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64)),
            ValueError,
            "labels must be a 1-D tensor",
        ),
        (
            lambda: metricops.batch_all_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), margin=-1.0),
            ValueError,
            "margin must be >= 0",
        ),
        (
            lambda: metricops.batch_all_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), reduction="none"
            ),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), reduction="avg"
            ),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), memory="disk"
            ),
            ValueError,
            "memory must be one of",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), metric="l1"
            ),
            ValueError,
            "metric must be one of",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(torch.randn(4), torch.zeros(4, dtype=torch.int64)),
            ValueError,
            "embeddings must be a 2-D tensor",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64, device="meta")
            ),
            ValueError,
            "labels must be on the embeddings' device",
        ),
        (
            lambda: metricops.batch_hard_triplet_loss(
                torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), margin=float("nan")
            ),
            ValueError,
            "margin must not be NaN",
        ),
        (
            lambda: metricops.mine_triplets(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), strategy="hardest"),
            ValueError,
            "strategy must be one of",
        ),
        (
            lambda: metricops.triplet_statistics(torch.randn(4, 3), torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "labels must be a 1-D tensor of length B=4",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "args, match",
    [
        (
            (torch.randn(4, 3), torch.zeros(5, dtype=torch.int64), 0.2, "euclidean"),
            "labels must be a 1-D tensor of length B=4",
        ),
        ((torch.randn(4, 3), torch.zeros(4), 0.2, "euclidean"), "labels must be int32 or int64"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), 0.2, "chebyshev"), "metric must be one of"),
        (
            (torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), float("inf"), "euclidean"),
            "margin must be a finite number",
        ),
    ],
)
def test_bad_input_reaches_native_checks(args, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.metricops.semihard_triplet(*args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.metricops.batch_hard_triplet(*args, False, 0)


def test_semihard_backward_refuses_foreign_indices():
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    losses, negative, dist = torch.ops.metricops.semihard_triplet(x, labels, 0.2, "euclidean")
    for bad in (6, 100, -2):
        neg = negative.clone()
        neg[0, 1] = bad
        with pytest.raises(ValueError, match=r"negative must hold indices in \[-1, 6\)"):
            torch.ops.metricops.semihard_triplet_backward(
                torch.ones_like(losses), None, x, losses + 1, neg, dist, "euclidean"
            )


def test_semihard_backward_refuses_grad_dist_of_another_shape():
    # grad_dist seeds the B×B coefficient matrix that the kernel indexes: a
    # smaller one from a direct call must be refused, not written past.
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    losses, negative, dist = torch.ops.metricops.semihard_triplet(x, labels, 0.2, "euclidean")
    for bad in (torch.zeros(2, 2, dtype=torch.float64), torch.zeros(36, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"every matrix input must have shape \(6, 6\)"):
            torch.ops.metricops.semihard_triplet_backward(
                torch.ones_like(losses), bad, x, losses + 1, negative, dist, "euclidean"
            )
    good = torch.ops.metricops.semihard_triplet_backward(
        torch.ones_like(losses), torch.zeros_like(dist), x, losses + 1, negative, dist, "euclidean"
    )
    assert good.shape == x.shape


def test_float16_reductions_keep_sums_and_counts_in_float32():
    # 70000 terms: their count (and here their sum) is past float16's 65504,
    # which would turn a float16 mean into sum/inf = 0.
    from metricops import contrastive, triplet

    terms = torch.ones(70000, dtype=torch.float16)
    valid = torch.ones(70000, dtype=torch.bool)
    for reduction in ("mean", "mean_nonzero"):
        out = triplet._reduce(terms, valid, reduction)
        assert out.dtype == torch.float16 and out.item() == 1.0, reduction
    assert contrastive._reduce(terms, "mean_nonzero").item() == 1.0
    # A sum is returned in the terms' dtype, as torch's own: 70000 is past float16's range.
    assert triplet._reduce(terms, valid, "sum").item() == float("inf")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory", ["matrix", "streaming"])
def test_low_precision_losses_with_more_terms_than_float16_counts(dtype, memory):
    # B=512, 16 classes: about 8k semi-hard pairs and 7.8M batch-all triplets,
    # whose count overflows float16; the means must still match float64.
    gen = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(512, 32, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 16, (512,), generator=gen)
    for name in LOSSES:
        exact = getattr(metricops, name)(x, labels, margin=0.5, memory="matrix")
        got = getattr(metricops, name)(x.to(dtype).cuda(), labels.cuda(), margin=0.5, memory=memory)
        assert got.dtype == dtype and torch.isfinite(got), (name, got)
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        assert abs(got.double().item() - exact.item()) <= tol * max(1.0, abs(exact.item())), (name, got, exact)


@pytest.mark.needs_cuda
def test_statistics_in_row_blocks_match_cpu():
    # B=2000 takes two row blocks on CUDA (about 256 MiB of scratch each).
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 40, (2000,), generator=gen)
    cpu = metricops.triplet_statistics(x, labels, margin=0.3)
    gpu = metricops.triplet_statistics(x.cuda(), labels.cuda(), margin=0.3)
    for key in ("total", "easy", "semihard", "hard"):
        assert int(cpu[key]) == int(gpu[key]), key


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fused_normalize_matches_normalizing_first(device):
    # The op's normalize=True (CPU: scaled Gram rows, one backward pass) must
    # agree with F.normalize followed by the op, values and gradients, across
    # streaming blocks; and give F.normalize's values for a zero row (whose
    # distances to all others tie at 1, so only values are compared there).
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(300, 9, generator=gen, dtype=torch.float64) * 4).to(device)
    labels = torch.randint(0, 20, (300,), generator=gen).to(device)
    for metric in METRICS:
        for block_rows in (0, 64):
            a = x.clone().requires_grad_()
            b = x.clone().requires_grad_()
            fused = torch.ops.metricops.batch_hard_triplet(a, labels, 0.2, metric, False, block_rows, True)
            y = torch.nn.functional.normalize(b, dim=1)
            plain = torch.ops.metricops.batch_hard_triplet(y, labels, 0.2, metric, False, block_rows)
            for k in (1, 2):
                assert torch.equal(fused[k], plain[k]), (metric, block_rows)
            for k in (0, 3, 4):
                assert_close(fused[k], plain[k])
            w = torch.rand(300, dtype=torch.float64, device=device)
            (ga,) = torch.autograd.grad((fused[0] * w).sum() + fused[3].sum(), a)
            (gb,) = torch.autograd.grad((plain[0] * w).sum() + plain[3].sum(), b)
            assert_close(ga, gb)
        x0 = x.clone()
        x0[7] = 0.0
        fused = torch.ops.metricops.batch_hard_triplet(x0, labels, 0.2, metric, False, 0, True)
        plain = torch.ops.metricops.batch_hard_triplet(
            torch.nn.functional.normalize(x0, dim=1), labels, 0.2, metric, False, 0
        )
        for k in (0, 3, 4):
            assert_close(fused[k], plain[k])


def test_batch_hard_backward_skips_half_set_triplets():
    # A direct call may set one index and leave the other at -1: that anchor
    # contributes nothing (its rows are never dereferenced at -1). Margin 5:
    # every hinge is active, so anchor 0 does contribute when complete.
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    losses, pos, neg, dap, dan = torch.ops.metricops.batch_hard_triplet(x, labels, 5.0, "euclidean", False, 0)
    g = torch.ones_like(losses)
    full = torch.ops.metricops.batch_hard_triplet_backward(
        g, g * 0, g * 0, x, pos, neg, dap, dan, 5.0, "euclidean", False
    )
    neg_half = neg.clone()
    neg_half[0] = -1
    g0 = g.clone()
    g0[0] = 0  # the same as anchor 0 contributing nothing
    expected = torch.ops.metricops.batch_hard_triplet_backward(
        g0, g * 0, g * 0, x, pos, neg, dap, dan, 5.0, "euclidean", False
    )
    for normalize in (False, True):
        half = torch.ops.metricops.batch_hard_triplet_backward(
            g, g * 0, g * 0, x, pos, neg_half, dap, dan, 5.0, "euclidean", False, normalize
        )
        assert torch.isfinite(half).all()
    half = torch.ops.metricops.batch_hard_triplet_backward(
        g, g * 0, g * 0, x, pos, neg_half, dap, dan, 5.0, "euclidean", False
    )
    assert_close(half, expected)
    assert not torch.allclose(half, full)
