import pytest
import torch
import torch.nn.functional as F

import metricops
from metricops import reference
from common import METRICS, REDUCTIONS, assert_close, cpu_and_cuda


def label_cases(device):
    """(name, B, labels) covering many/few classes, singletons, one class, tiny batches and negative labels."""
    g = torch.Generator().manual_seed(1)
    yield "many", 24, torch.randint(0, 12, (24,), generator=g)
    yield "few", 17, torch.randint(0, 3, (17,), generator=g)
    yield "singletons", 9, torch.arange(9)
    yield "one_class", 7, torch.full((7,), 5)
    yield "negative", 10, torch.randint(-3, 2, (10,), generator=g)
    yield "B0", 0, torch.zeros(0, dtype=torch.int64)
    yield "B1", 1, torch.tensor([3])
    yield "B2_same", 2, torch.tensor([1, 1])
    yield "B2_diff", 2, torch.tensor([1, 2])


def _embeddings(B, D, dtype, device, duplicates=False):
    x = torch.randn(B, D, dtype=dtype, device=device)
    if duplicates and B >= 4:
        x[1] = x[0]
        x[3] = x[2]
    return x


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_matches_reference(device, dtype, metric):
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, B, labels in label_cases(device):
        labels = labels.to(device)
        for normalize in (False, True):
            x = _embeddings(B, 6, dtype, device).requires_grad_()
            for squared, pm, nm in ((False, 0.0, 1.0), (True, 0.2, 2.5)):
                if metric == "cosine":
                    pm, nm = pm / 4, nm / 4  # cosine distances live in [0, 2]
                for reduction in REDUCTIONS:
                    kw = dict(
                        pos_margin=pm,
                        neg_margin=nm,
                        metric=metric,
                        squared=squared,
                        normalize=normalize,
                        reduction=reduction,
                    )
                    out = metricops.contrastive_loss(x, labels, **kw)
                    expected = reference.contrastive_loss(x.double(), labels, **kw)
                    assert out.dtype == dtype and out.shape == expected.shape, (name, reduction)
                    assert_close(out, expected, atol=tol, rtol=tol)
                    w = torch.randn(out.shape, dtype=torch.float64, device=device)
                    (g,) = torch.autograd.grad((out.double() * w).sum(), x)
                    (g_ref,) = torch.autograd.grad((expected * w).sum(), x)
                    assert_close(g, g_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_duplicates(metric):
    # Exact duplicate rows: distance ~0 from the Gram path; finite gradients,
    # values as the explicit-difference reference to Gram rounding. pos_margin
    # > 0 keeps the ~0 distances off the hinge, where "mean_nonzero"'s count
    # would hinge on the sign of rounding noise.
    labels = torch.tensor([0, 0, 1, 2, 1, 0])
    x = _embeddings(6, 5, torch.float64, "cpu", duplicates=True).requires_grad_()
    for reduction in REDUCTIONS:
        out = metricops.contrastive_loss(x, labels, metric=metric, pos_margin=0.05, neg_margin=3.0, reduction=reduction)
        expected = reference.contrastive_loss(
            x, labels, metric=metric, pos_margin=0.05, neg_margin=3.0, reduction=reduction
        )
        assert_close(out, expected, atol=1e-7, rtol=1e-7)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all()


def test_contrastive_memory_modes():
    x = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,))
    auto = metricops.contrastive_loss(x, labels)
    assert_close(metricops.contrastive_loss(x, labels, memory="matrix"), auto)
    assert_close(metricops.contrastive_loss(x, labels, memory="streaming"), auto)
    with pytest.raises(ValueError, match="memory must be one of"):
        metricops.contrastive_loss(x, labels, memory="tiled")


def test_contrastive_int32_labels_and_layout():
    x = torch.randn(10, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,))
    expected = reference.contrastive_loss(x, labels, reduction="none")
    assert_close(metricops.contrastive_loss(x, labels.int(), reduction="none"), expected)
    assert_close(metricops.contrastive_loss(x.t().contiguous().t(), labels, reduction="none"), expected)
    wide = torch.zeros(10, 12, dtype=torch.float64)
    wide[:, ::2] = x
    assert_close(metricops.contrastive_loss(wide[:, ::2], labels, reduction="none"), expected)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "none"])
def test_no_valid_term_is_zero_and_attached(reduction):
    for x, labels in (
        (torch.randn(1, 3, dtype=torch.float64), torch.tensor([0])),
        (torch.randn(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)),
    ):
        x.requires_grad_()
        out = metricops.contrastive_loss(x, labels, reduction=reduction)
        assert out.requires_grad and torch.all(out == 0)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.all(g == 0)
    # Far-apart classes and pos_margin above every distance: all terms are 0.
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]], dtype=torch.float64, requires_grad=True)
    out = metricops.contrastive_loss(x, torch.tensor([0, 0, 1, 1]), pos_margin=1.0, reduction=reduction)
    assert torch.all(out == 0)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.all(g == 0)


def test_contrastive_nan_in_nan_out():
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2])
    for metric in METRICS:
        out = metricops.contrastive_loss(x, labels, metric=metric, reduction="none")
        assert torch.isnan(out[2, 0]) and torch.isnan(out[0, 2]) and not torch.isnan(out[0, 1])
        assert torch.isnan(metricops.contrastive_loss(x, labels, metric=metric))


@pytest.mark.parametrize("memory", ["matrix", "streaming"])
def test_contrastive_mean_nonzero_of_a_nan_and_zeros_is_nan(memory):
    """mean_nonzero counts the terms > 0, which a NaN term is not: with every finite term 0 the count is 0, and
    the loss is the total, NaN (the matrix path once returned 0 there, its no-term value)."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    x[0, 0] = float("nan")
    labels = torch.tensor([0, 0, 1, 1])  # duplicated pairs, far-apart classes: every finite term is 0
    assert torch.isnan(reference.contrastive_loss(x, labels, reduction="mean_nonzero"))
    assert torch.isnan(metricops.contrastive_loss(x, labels, reduction="mean_nonzero", memory=memory))
    finite = x.nan_to_num()  # the same batch without the NaN: no term, 0
    assert metricops.contrastive_loss(finite, labels, reduction="mean_nonzero", memory=memory) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_contrastive_gradcheck(reduction):
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    for metric in METRICS:
        x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
        nm = 0.9 if metric == "cosine" else 2.5
        for squared in (False, True):
            fn = lambda t: metricops.contrastive_loss(  # noqa: E731
                t, labels, pos_margin=0.1, neg_margin=nm, metric=metric, squared=squared, reduction=reduction
            )
            assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- pair_contrastive_loss


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_contrastive_matches_reference(device, dtype):
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for N in (0, 1, 13):
        x0 = torch.randn(N, 5, dtype=dtype, device=device, requires_grad=True)
        x1 = torch.randn(N, 5, dtype=dtype, device=device, requires_grad=True)
        y = torch.randint(0, 2, (N,), device=device)
        for metric in METRICS:
            for squared in (False, True):
                for reduction in REDUCTIONS:
                    for yy in (y, y.bool(), y.float()):
                        kw = dict(
                            margin=2.0 if metric != "cosine" else 0.8,
                            metric=metric,
                            squared=squared,
                            reduction=reduction,
                        )
                        out = metricops.pair_contrastive_loss(x0, x1, yy, **kw)
                        expected = reference.pair_contrastive_loss(x0.double(), x1.double(), y, **kw)
                        assert out.shape == expected.shape and out.dtype == dtype
                        assert_close(out, expected, atol=tol, rtol=tol)
                    w = torch.randn(out.shape, dtype=torch.float64, device=device)
                    g = torch.autograd.grad((out.double() * w).sum(), (x0, x1))
                    g_ref = torch.autograd.grad((expected * w).sum(), (x0, x1))
                    for a, b in zip(g, g_ref):
                        assert_close(a, b, atol=tol, rtol=tol)


def test_pair_contrastive_gradcheck_and_equal_rows():
    x0 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 1, 0, 0, 1])
    for metric in METRICS:
        for squared in (False, True):
            fn = lambda a, b: metricops.pair_contrastive_loss(  # noqa: E731
                a, b, y, margin=3.0, metric=metric, squared=squared, reduction="none"
            )
            assert torch.autograd.gradcheck(fn, (x0, x1), eps=1e-6, atol=1e-5)
    # Identical rows: exact 0 distance, gradient 0 (never NaN).
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = metricops.pair_contrastive_loss(z, z.detach().clone(), torch.ones(3), reduction="sum")
    assert out.item() == 0
    (g,) = torch.autograd.grad(out, z)
    assert torch.all(g == 0)


# --------------------------------------------------------------------------- triplet_margin_loss


def _triplet_inputs(N, D, dtype, device, layout="contiguous"):
    ts = [torch.randn(N, D, dtype=dtype, device=device) for _ in range(3)]
    if layout == "transposed":
        ts = [t.t().contiguous().t() for t in ts]
    elif layout == "strided":
        ts = [torch.cat([t, t], dim=1)[:, ::2] for t in ts]
    return [t.requires_grad_() for t in ts]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_triplet_matches_torch(device, dtype, p):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for layout in ("contiguous", "transposed", "strided"):
        a, pos, neg = _triplet_inputs(33, 7, dtype, device, layout)
        for swap in (False, True):
            for eps in (1e-6, 0.1):
                for margin in (1.0, 0.3):
                    for reduction in ("mean", "sum", "none"):
                        kw = dict(margin=margin, p=p, eps=eps, swap=swap, reduction=reduction)
                        out = metricops.triplet_margin_loss(a, pos, neg, **kw)
                        expected = F.triplet_margin_loss(a, pos, neg, **kw)
                        assert out.shape == expected.shape and out.dtype == expected.dtype
                        assert_close(out, expected, atol=tol, rtol=tol)
                        w = torch.randn(out.shape, dtype=dtype, device=device)
                        g = torch.autograd.grad((out * w).sum(), (a, pos, neg))
                        g_ref = torch.autograd.grad((expected * w).sum(), (a, pos, neg))
                        for x, y in zip(g, g_ref):
                            assert_close(x, y, atol=tol, rtol=tol)


def test_triplet_module_drop_in():
    a, pos, neg = _triplet_inputs(20, 6, torch.float32, "cpu")
    for kw in ({}, dict(margin=0.5, p=1.0, swap=True), dict(p=3.0, eps=1e-3, reduction="sum"), dict(reduction="none")):
        ours, theirs = metricops.nn.TripletMarginLoss(**kw), torch.nn.TripletMarginLoss(**kw)
        out, expected = ours(a, pos, neg), theirs(a, pos, neg)
        assert_close(out, expected)
        g = torch.autograd.grad(out.sum(), (a, pos, neg))
        g_ref = torch.autograd.grad(expected.sum(), (a, pos, neg))
        for x, y in zip(g, g_ref):
            assert_close(x, y)
    # torch's full signature: the deprecated size_average/reduce pair, and all seven arguments positionally
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kw in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
            ours, theirs = metricops.nn.TripletMarginLoss(**kw), torch.nn.TripletMarginLoss(**kw)
            assert ours.reduction == theirs.reduction
            assert_close(ours(a, pos, neg), theirs(a, pos, neg))
        args = (0.5, 1.0, 1e-4, True, None, None, "sum")
        assert_close(metricops.nn.TripletMarginLoss(*args)(a, pos, neg), torch.nn.TripletMarginLoss(*args)(a, pos, neg))
    # Unbatched (D,) inputs, as torch accepts them.
    v = [torch.randn(5) for _ in range(3)]
    for reduction in ("mean", "none"):
        assert_close(
            metricops.triplet_margin_loss(*v, reduction=reduction), F.triplet_margin_loss(*v, reduction=reduction)
        )


# Shapes torch.nn.functional.triplet_margin_loss accepts: equal ranks, broadcasting.
TRIPLET_SHAPES = [
    ((6, 4), (1, 4), (6, 4)),  # one positive for every anchor
    ((1, 4), (6, 4), (1, 4)),
    ((6, 4), (6, 4), (1, 4)),
    ((6, 4), (6, 1), (6, 4)),  # broadcast along D
    ((1, 4), (1, 4), (1, 4)),
    ((4,), (4,), (4,)),  # unbatched
    ((4,), (1,), (4,)),
    ((), (), ()),
    ((2, 3, 4), (2, 3, 4), (1, 1, 4)),  # leading batch dimensions
    ((2, 1, 4), (1, 3, 4), (2, 3, 4)),
    ((0, 4), (1, 4), (0, 4)),
    ((5, 0), (5, 0), (5, 0)),
]


@pytest.mark.parametrize("shapes", TRIPLET_SHAPES, ids=str)
def test_triplet_broadcast_shapes_match_torch(shapes):
    for swap in (False, True):
        for reduction in ("none", "mean", "sum"):
            a, pos, neg = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)
            kw = dict(margin=1.5, swap=swap, reduction=reduction)
            expected = F.triplet_margin_loss(a, pos, neg, **kw)
            w = torch.rand(expected.shape, dtype=torch.float64)
            g_ref = torch.autograd.grad((expected * w).sum(), (a, pos, neg), allow_unused=True)
            if reduction == "mean" and expected.isnan():  # no triplet: 0 by the project convention
                expected, g_ref = torch.zeros_like(expected), (None,) * 3
            module = metricops.nn.TripletMarginLoss(**kw)
            for out in (metricops.triplet_margin_loss(a, pos, neg, **kw), module(a, pos, neg)):
                assert out.shape == expected.shape and out.dtype == expected.dtype
                assert_close(out, expected.detach())
                g = torch.autograd.grad((out * w).sum(), (a, pos, neg), allow_unused=True)
                for x, ref, t in zip(g, g_ref, (a, pos, neg)):
                    x = torch.zeros_like(t) if x is None else x
                    assert x.shape == t.shape
                    assert_close(x, torch.zeros_like(t) if ref is None else ref)


def test_triplet_broadcast_passes_stride0_views(monkeypatch):
    # A broadcast input reaches the native op as an expanded view: the Python layer copies nothing.
    from metricops import contrastive as contrastive_module

    seen = []
    real = contrastive_module.ops.triplet_margin_loss

    class Spy:
        def triplet_margin_loss(self, *args):
            seen.append(args[:3])
            return real(*args)

    monkeypatch.setattr(contrastive_module, "ops", Spy())
    a, pos = torch.randn(1000, 8), torch.randn(1, 8)
    metricops.triplet_margin_loss(a, pos, a)
    assert seen[0][1].shape == (1000, 8) and seen[0][1].stride() == (0, 1)
    assert seen[0][1].data_ptr() == pos.data_ptr()


def test_triplet_mismatched_shapes_refused_like_torch():
    x = torch.randn(5, 4)
    for args, text in (
        ((x, x[0], x), "must have the same number of dimensions"),
        ((x, x[:3], x), "must broadcast to one shape"),
        ((x, x, torch.randn(5, 3)), "must broadcast to one shape"),
    ):
        with pytest.raises(RuntimeError):
            F.triplet_margin_loss(*args)
        with pytest.raises(ValueError, match=text):
            metricops.triplet_margin_loss(*args)


def test_triplet_squared_and_edge_cases():
    a, pos, neg = _triplet_inputs(15, 4, torch.float64, "cpu")
    for swap in (False, True):
        for reduction in ("mean", "sum", "mean_nonzero", "none"):
            kw = dict(margin=0.7, swap=swap, reduction=reduction, squared=True)
            out = metricops.triplet_margin_loss(a, pos, neg, **kw)
            expected = reference.triplet_margin_loss(a, pos, neg, **kw)
            assert_close(out, expected)
            g = torch.autograd.grad(out.sum(), (a, pos, neg))
            g_ref = torch.autograd.grad(expected.sum(), (a, pos, neg))
            for x, y in zip(g, g_ref):
                assert_close(x, y)
    # N = 0: 0 (attached), not torch's NaN, by the project convention.
    z = [torch.zeros(0, 4, requires_grad=True) for _ in range(3)]
    out = metricops.triplet_margin_loss(*z)
    assert out.item() == 0 and out.requires_grad
    # Identical anchor and positive with eps=0: zero distance, gradient 0 like torch.
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = metricops.triplet_margin_loss(x, x.detach().clone(), x.detach() + 0.01, eps=0.0, margin=1.0)
    expected = F.triplet_margin_loss(x, x.detach().clone(), x.detach() + 0.01, eps=0.0, margin=1.0)
    assert_close(out, expected)
    g, g_ref = torch.autograd.grad(out, x)[0], torch.autograd.grad(expected, x)[0]
    assert torch.isfinite(g).all()
    assert_close(g, g_ref)
    # NaN in, NaN out.
    b = torch.randn(3, 4)
    b[1, 0] = float("nan")
    out = metricops.triplet_margin_loss(b, torch.randn(3, 4), torch.randn(3, 4), reduction="none")
    assert torch.isnan(out[1]) and not torch.isnan(out[0])


def test_triplet_gradcheck():
    a, pos, neg = _triplet_inputs(6, 5, torch.float64, "cpu")
    for p in (1.0, 2.0, 3.0):
        for swap in (False, True):
            fn = lambda x, y, z: metricops.triplet_margin_loss(  # noqa: E731
                x, y, z, p=p, swap=swap, margin=5.0, reduction="none"
            )
            assert torch.autograd.gradcheck(fn, (a, pos, neg), eps=1e-6, atol=1e-5)
    fn = lambda x, y, z: metricops.triplet_margin_loss(x, y, z, squared=True, margin=20.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, pos, neg), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- ops: opcheck, compile, double backward


def test_double_backward_refused():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(metricops.contrastive_loss(x, torch.tensor([0, 0, 1, 1])), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def fn(x, labels, a, p, n, y):
        return (
            metricops.contrastive_loss(x, labels, metric="cosine", reduction="mean_nonzero", neg_margin=0.5)
            + metricops.contrastive_loss(x, labels, reduction="none").square().sum()
            + metricops.triplet_margin_loss(a, p, n, swap=True)
            + metricops.pair_contrastive_loss(a, p, y, squared=True)
        )

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(12, 6, device=device, requires_grad=True)
    labels = torch.randint(0, 3, (12,), device=device)
    a, p, n = _triplet_inputs(9, 6, torch.float32, device)
    y = torch.randint(0, 2, (9,), device=device)
    out_c = compiled(x, labels, a, p, n, y)
    g_c = torch.autograd.grad(out_c, (x, a, p, n))
    out_e = fn(x, labels, a, p, n, y)
    g_e = torch.autograd.grad(out_e, (x, a, p, n))
    assert_close(out_c, out_e)
    for u, w in zip(g_c, g_e):
        assert_close(u, w)


def test_modules():
    x = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,))
    m = metricops.nn.ContrastiveLoss(pos_margin=0.1, neg_margin=2.0, metric="sqeuclidean", squared=True)
    assert_close(
        m(x, labels),
        reference.contrastive_loss(x, labels, pos_margin=0.1, neg_margin=2.0, metric="sqeuclidean", squared=True),
    )
    assert "sqeuclidean" in repr(m)
    pm = metricops.nn.PairContrastiveLoss(margin=1.5, metric="cosine", reduction="sum")
    y = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    x1 = torch.randn(8, 4, dtype=torch.float64)
    assert_close(pm(x, x1, y), reference.pair_contrastive_loss(x, x1, y, margin=1.5, metric="cosine", reduction="sum"))


# --------------------------------------------------------------------------- bad input

X = torch.randn(4, 3)
L = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: metricops.contrastive_loss(X, L[:3]), ValueError, "labels must be a 1-D tensor of length B=4"),
        (lambda: metricops.contrastive_loss(X, L.float()), TypeError, "labels must be int32 or int64"),
        (lambda: metricops.contrastive_loss(X, L.view(2, 2)), ValueError, "labels must be a 1-D tensor"),
        (lambda: metricops.contrastive_loss(X, L.to("meta")), ValueError, "labels must be on the embeddings' device"),
        (lambda: metricops.contrastive_loss(X[0], L), ValueError, "embeddings must be a 2-D tensor"),
        (lambda: metricops.contrastive_loss(X, L, metric="l1"), ValueError, "metric must be one of"),
        (lambda: metricops.contrastive_loss(X, L, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: metricops.contrastive_loss(X, L, pos_margin="1"), TypeError, "pos_margin must be a number"),
        (lambda: metricops.contrastive_loss(X, L, neg_margin=float("nan")), ValueError, "neg_margin must not be NaN"),
        (lambda: metricops.contrastive_loss(X, L, squared=1), TypeError, "squared must be a bool"),
        (lambda: metricops.pair_contrastive_loss(X, X[:3], L), ValueError, "x1 must have the same shape as x0"),
        (lambda: metricops.pair_contrastive_loss(X, X, L[:3]), ValueError, "y must be a 1-D tensor of length N=4"),
        (lambda: metricops.pair_contrastive_loss(X, X, torch.tensor([0, 1, 2, 0])), ValueError, "y must hold only 0"),
        (lambda: metricops.pair_contrastive_loss(X, X, torch.tensor([0, 0.5, 1, 0])), ValueError, "y must hold only 0"),
        (lambda: metricops.pair_contrastive_loss(X, X.to("meta"), L), ValueError, "x1 must be on the same device"),
        (lambda: metricops.pair_contrastive_loss(X, X, L.to("meta")), ValueError, "y must be on x0's device"),
        (lambda: metricops.pair_contrastive_loss(X, X.double(), L), TypeError, "x1 must have the same dtype"),
        (
            lambda: metricops.triplet_margin_loss(X, X, X[:2]),
            ValueError,
            "anchor, positive and negative must broadcast to one shape",
        ),
        (lambda: metricops.triplet_margin_loss(X, X.to("meta"), X), ValueError, "positive must be on the same device"),
        (lambda: metricops.triplet_margin_loss(X, X, X, p=0), ValueError, "p must be a finite number > 0"),
        (lambda: metricops.triplet_margin_loss(X, X, X, squared=True, p=1.0), ValueError, "squared=True requires p=2"),
        (lambda: metricops.triplet_margin_loss(X, X, X, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: metricops.triplet_margin_loss(X, X, "n"), TypeError, "negative must be a torch.Tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: torch.ops.metricops.contrastive_loss(X, L[:3], 0.0, 1.0, "euclidean", False, "mean"),
            "labels must be",
        ),
        (lambda: torch.ops.metricops.contrastive_loss(X, L, 0.0, 1.0, "euclidean", False, "avg"), "reduction must be"),
        (lambda: torch.ops.metricops.pair_contrastive_loss(X, X, L, 1.0, "euclidean", False), "y must be a bool"),
        (lambda: torch.ops.metricops.triplet_margin_loss(X, X, X[:2], 1.0, 2.0, 1e-6, False, False), "negative must"),
        (
            lambda: torch.ops.metricops.triplet_margin_loss(X, X, X, 1.0, 1.0, 1e-6, False, True),
            "squared=True requires",
        ),
    ],
)
def test_bad_input_reaches_native_checks(call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call()
