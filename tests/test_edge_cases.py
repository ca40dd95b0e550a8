"""Edge cases of every op, each against metricops.reference (float64)
or a stated expectation."""

import pytest
import torch

import metricops
from metricops import reference

from common import METRICS, assert_close

LOSSES = ("batch_hard", "semihard", "batch_all", "contrastive")


_FUNCTIONS = {
    "batch_hard": "batch_hard_triplet_loss",
    "semihard": "semihard_triplet_loss",
    "batch_all": "batch_all_triplet_loss",
    "contrastive": "contrastive_loss",
}


def _loss(name, x, labels, **kw):
    return getattr(metricops, _FUNCTIONS[name])(x, labels, **kw)


def _ref_loss(name, x, labels, **kw):
    return getattr(reference, _FUNCTIONS[name])(x, labels, **kw)


def run_all_ops(x, labels, metric="euclidean"):
    """Every op on one batch (labelled losses, distance, mining, statistics, knn, explicit-pair losses)."""
    out = {"pairwise_distance": metricops.pairwise_distance(x, metric=metric)}
    for name in LOSSES:
        out[name] = _loss(name, x, labels, metric=metric)
    out["statistics"] = torch.stack(list(metricops.triplet_statistics(x, labels, metric=metric).values()))
    for strategy in ("all", "batch_hard", "semihard"):
        out[f"mine_{strategy}"] = metricops.mine_triplets(x, labels, strategy=strategy, metric=metric)
    b = x.shape[0]
    if b >= 2:
        out["knn"] = metricops.knn(x, k=b - 1, metric=metric)
    y = torch.arange(b) % 2
    out["pair_contrastive"] = metricops.pair_contrastive_loss(x, x.roll(1, 0), y, metric=metric)
    out["triplet_margin"] = metricops.triplet_margin_loss(x, x.roll(1, 0), x.roll(2, 0))
    return out


# --------------------------------------------------------------------------- batch shapes


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_empty_batch(name, reduction):
    x = torch.randn(0, 5, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64)
    loss = _loss(name, x, labels, reduction=reduction)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 5)


def test_empty_batch_other_ops():
    x = torch.randn(0, 5)
    labels = torch.zeros(0, dtype=torch.int32)
    assert metricops.pairwise_distance(x).shape == (0, 0)
    assert metricops.pairwise_distance(x, torch.randn(3, 5)).shape == (0, 3)
    assert all(int(v) == 0 for v in metricops.triplet_statistics(x, labels).values())
    for t in metricops.mine_triplets(x, labels, strategy="all"):
        assert t.shape == (0,) and t.dtype == torch.int64
    d, i = metricops.knn(x, torch.randn(3, 5), k=2)
    assert d.shape == (0, 2) and i.shape == (0, 2)
    assert metricops.pair_contrastive_loss(x, x, labels).item() == 0.0
    assert metricops.triplet_margin_loss(x, x, x).item() == 0.0
    assert (
        metricops.retrieval_metrics(x, labels, torch.randn(3, 5), torch.zeros(3, dtype=torch.int32))["num_queries"] == 0
    )
    assert metricops.batch_hard_triplet_loss(x, labels, reduction="none").shape == (0,)
    assert metricops.contrastive_loss(x, labels, reduction="none").shape == (0, 0)


@pytest.mark.parametrize("name", LOSSES)
def test_one_sample(name):
    x = torch.randn(1, 4, requires_grad=True)
    labels = torch.tensor([3])
    loss = _loss(name, x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert metricops.pairwise_distance(x).item() == 0.0
    assert metricops.mine_triplets(x, labels, strategy="all")[0].numel() == 0
    with pytest.raises(ValueError, match=r"k must be between 1 and the number of database rows a query can return \(0"):
        metricops.knn(x, k=1)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("pattern", ["one_class", "all_distinct"])
def test_one_class_and_all_distinct(name, pattern):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(6, dtype=torch.int64) if pattern == "one_class" else torch.arange(6)
    loss = _loss(name, x, labels, reduction="sum")
    expected = _ref_loss(name, x, labels, reduction="sum")
    assert_close(loss, expected)
    if name != "contrastive":  # no valid triplet: exactly 0, attached, zero gradient
        assert loss.item() == 0.0
        assert int(metricops.triplet_statistics(x, labels)["total"]) == 0
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(expected, x)
    assert_close(g, g_ref)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicated_embeddings_zero_distances(metric):
    # Every row repeated: many zero distances, ties everywhere. No NaN anywhere,
    # euclidean gradient at d = 0 is 0.
    base = torch.randn(3, 5, dtype=torch.float64)
    x = base.repeat(3, 1).requires_grad_()
    labels = torch.arange(9) % 3
    d = metricops.pairwise_distance(x, metric=metric)
    assert_close(d, reference.pairwise_distance(x.detach(), metric=metric), atol=1e-7, rtol=1e-7)
    for name in LOSSES:
        loss = _loss(name, x, labels, metric=metric)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name
    dists, idx = metricops.knn(x.detach(), k=2, metric=metric)
    # Each row's two copies are at distance 0 and come first, lower index first.
    assert torch.all(dists.abs() < 1e-6)
    expected = torch.stack([torch.tensor([j for j in range(i % 3, 9, 3) if j != i]) for i in range(9)])
    assert torch.equal(idx, expected)
    all_same = torch.ones(4, 3, requires_grad=True)
    loss = metricops.batch_hard_triplet_loss(all_same, torch.tensor([0, 0, 1, 1]))
    (g,) = torch.autograd.grad(loss, all_same)
    assert loss.item() == pytest.approx(0.2) and torch.isfinite(g).all()


# --------------------------------------------------------------------------- magnitudes


def test_huge_magnitude_float32_documented():
    """1e30-scale float32 rows: squared norms (~1e60) overflow float32 (max ~3.4e38).

    Documented behaviour: the Gram form's overflow is detected and those
    entries are recomputed from explicit differences. Cosine is then correct
    (its normalised differences stay in range); euclidean/sqeuclidean distances
    whose square overflows come out inf (never a wrong finite number), and the
    self-distance diagonal stays exactly 0. Every index knn/mine_triplets
    return is a valid row.
    """
    x = torch.randn(6, 4) * 1e30
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    off = ~torch.eye(6, dtype=torch.bool)
    for metric in ("euclidean", "sqeuclidean"):
        d = metricops.pairwise_distance(x, metric=metric)
        assert torch.isinf(d[off]).all(), metric  # the square overflows: inf, never a wrong finite number
        assert torch.all(d.diagonal() == 0), metric
    cos = metricops.pairwise_distance(x, metric="cosine")
    torch.testing.assert_close(cos, reference.pairwise_distance(x.double(), metric="cosine").float(), atol=1e-6, rtol=0)
    for metric in METRICS:
        out = run_all_ops(x, labels, metric)
        d, i = out["knn"]
        assert i.min() >= 0 and i.max() < 6
        for strategy in ("all", "batch_hard", "semihard"):
            for t in out[f"mine_{strategy}"]:
                assert t.numel() == 0 or (t.min() >= 0 and t.max() < 6)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_magnitude_float64_correct(scale):
    x = torch.randn(6, 4, dtype=torch.float64) * scale
    for metric in METRICS:
        got = metricops.pairwise_distance(x, metric=metric)
        exp = reference.pairwise_distance(x, metric=metric)
        tol = 1e-8 * exp.abs().max()
        if metric == "euclidean" and scale < 1:
            tol = 1e-6 * exp.abs().max()  # sqrt of a Gram-form difference: ~sqrt(eps) relative
        assert ((got - exp).abs() <= tol).all(), metric


@pytest.mark.parametrize("metric", METRICS)
def test_tiny_magnitude_never_nan(metric):
    """1e-30-scale float32 rows: squared norms (~1e-60) underflow to 0.

    Documented behaviour: no NaN anywhere, values and gradients finite.
    euclidean/sqeuclidean distances underflow to 0 (the true ~1e-30 is
    representable, its square is not); cosine rows count as zero vectors, so
    cosine distances are 1 (the "cos with a zero vector is 0" rule). float64
    is correct at this scale (test above)."""
    x = (torch.randn(6, 4) * 1e-30).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    d = metricops.pairwise_distance(x, metric=metric)
    assert not torch.isnan(d).any()
    off = ~torch.eye(6, dtype=torch.bool)
    if metric == "cosine":
        assert torch.all(d[off] == 1.0)
    else:
        assert torch.all(d == 0)
    for name in LOSSES:
        loss = _loss(name, x, labels, metric=metric)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name
    out = run_all_ops(x.detach(), labels, metric)
    for key, value in out.items():
        for t in value if isinstance(value, tuple) else (value,):
            if t.is_floating_point():
                assert not torch.isnan(t).any(), key


# --------------------------------------------------------------------------- dimensions


@pytest.mark.parametrize("dim", [1, 65536])
@pytest.mark.parametrize("metric", METRICS)
def test_extreme_dims(dim, metric):
    b = 6
    x = torch.randn(b, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert_close(
        metricops.pairwise_distance(x, metric=metric),
        reference.pairwise_distance(x, metric=metric),
        atol=1e-8,
        rtol=1e-8,
    )
    # D = 1 cosine distances are exactly 0 or 2: every comparison is a tie
    # (the kernel's value may sit 1 ulp either side), so the miners' choices
    # are not comparable there; distances and knn distances still are.
    for name in LOSSES if not (dim == 1 and metric == "cosine") else ():
        loss = _loss(name, x, labels, metric=metric, reduction="sum")
        exp = _ref_loss(name, x, labels, metric=metric, reduction="sum")
        assert_close(loss, exp, atol=1e-8, rtol=1e-8)
        (g,) = torch.autograd.grad(loss, x)
        (g_ref,) = torch.autograd.grad(exp, x)
        assert_close(g, g_ref, atol=1e-7, rtol=1e-7)
    d, i = metricops.knn(x.detach(), k=3, metric=metric)
    dr, ir = reference.knn(x.detach(), k=3, metric=metric)
    assert_close(d, dr, atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------- layouts


def _layouts(x):
    b, dim = x.shape
    yield "expanded", x[:1].expand(b, dim)  # stride 0 rows: all equal
    yield "transposed", x.t().contiguous().t()
    wide = torch.zeros(b, 3 * dim, dtype=x.dtype)
    wide[:, 1::3] = x
    yield "strided_cols", wide[:, 1::3]
    tall = torch.zeros(2 * b, dim, dtype=x.dtype)
    tall[::2] = x
    yield "strided_rows", tall[::2]
    buf = torch.zeros(x.numel() + 7, dtype=x.dtype)
    view = buf[7:].view(b, dim)
    view.copy_(x)
    yield "offset", view
    yield "row_slice", torch.cat([torch.zeros(1, dim, dtype=x.dtype), x])[1:]


def test_layouts_give_same_results_for_every_op():
    x = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for name, xl in _layouts(x):
        base = x[:1].expand_as(x).contiguous() if name == "expanded" else x
        assert torch.equal(xl, base)
        got, want = run_all_ops(xl, labels), run_all_ops(base.contiguous(), labels)
        for key in want:
            gv = got[key] if isinstance(got[key], tuple) else (got[key],)
            wv = want[key] if isinstance(want[key], tuple) else (want[key],)
            for a, b in zip(gv, wv):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{name} {key}")


def test_layouts_gradients_match():
    x = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for name, xl in _layouts(x):
        if name == "expanded":
            continue
        for loss_name in LOSSES:
            a = xl.detach().requires_grad_()  # keeps xl's strides
            b = x.clone().requires_grad_()
            (ga,) = torch.autograd.grad(_loss(loss_name, a, labels, reduction="sum"), a)
            (gb,) = torch.autograd.grad(_loss(loss_name, b, labels, reduction="sum"), b)
            torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-10, msg=f"{name} {loss_name}")


def test_expanded_leaf_gradient():
    # A gradient through an expanded (stride-0) view accumulates onto its one row.
    row = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, 4, dtype=torch.float64)
    x = torch.cat([row.expand(3, 4), other])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = metricops.contrastive_loss(x, labels, reduction="sum")
    (g,) = torch.autograd.grad(loss, row)
    row2 = row.detach().clone().requires_grad_()
    exp = reference.contrastive_loss(torch.cat([row2.expand(3, 4), other]), labels, reduction="sum")
    (g2,) = torch.autograd.grad(exp, row2)
    assert_close(g, g2)


def test_non_contiguous_labels():
    x = torch.randn(6, 3, dtype=torch.float64)
    lab_buf = torch.tensor([[0, 9], [0, 9], [1, 9], [1, 9], [2, 9], [2, 9]])
    labels = lab_buf[:, 0]
    assert not labels.is_contiguous()
    for name in LOSSES:
        assert_close(_loss(name, x, labels), _loss(name, x, labels.contiguous()))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            metricops.mine_triplets(x, labels, strategy="all"),
            metricops.mine_triplets(x, labels.contiguous(), strategy="all"),
        )
    )


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([2**62, 2**62, -(2**62), -(2**62), -1, -1, 2**63 - 1, -(2**63)], dtype=torch.int64),
        torch.tensor([2**31 - 1, 2**31 - 1, -(2**31), -(2**31), -1, -1, 0, 1], dtype=torch.int32),
        # int64 values that collide modulo 2**32: must NOT be merged into one class.
        torch.tensor([1, 1, 1 + 2**32, 1 + 2**32, -1, -1, -1 + 2**32, 2**33], dtype=torch.int64),
    ],
    ids=["int64_extreme", "int32_extreme", "int64_mod32_collisions"],
)
def test_huge_and_negative_labels(labels):
    x = torch.randn(8, 4, dtype=torch.float64)
    # The same partition with small labels.
    _, compact = torch.unique(labels.to(torch.int64), return_inverse=True)
    got, want = run_all_ops(x, labels), run_all_ops(x, compact)
    for key in want:
        gv = got[key] if isinstance(got[key], tuple) else (got[key],)
        wv = want[key] if isinstance(want[key], tuple) else (want[key],)
        for a, b in zip(gv, wv):
            torch.testing.assert_close(a, b, msg=key)
    assert metricops.retrieval_metrics(x, labels, ks=(1, 3)) == metricops.retrieval_metrics(x, compact, ks=(1, 3))


# --------------------------------------------------------------------------- no autograd graph


def test_requires_grad_false_builds_no_graph():
    x = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    outs = run_all_ops(x, labels)
    outs["bh_none"] = metricops.batch_hard_triplet_loss(x, labels, reduction="none")
    outs["cl_none"] = metricops.contrastive_loss(x, labels, reduction="none")
    outs["normalized"] = metricops.pairwise_distance(x, normalize=True)
    outs["soft"] = metricops.batch_hard_triplet_loss(x, labels, soft=True)
    outs["tml_squared"] = metricops.triplet_margin_loss(x, x.flip(0), x, squared=True)
    for mod in (
        metricops.nn.BatchHardTripletLoss(),
        metricops.nn.ContrastiveLoss(),
        metricops.nn.SemiHardTripletLoss(),
    ):
        outs[type(mod).__name__] = mod(x, labels)
    for key, value in outs.items():
        for t in value if isinstance(value, tuple) else (value,):
            assert not t.requires_grad and t.grad_fn is None, key


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("metric", METRICS)
def test_nan_inf_embeddings(bad, metric):
    """A NaN/Inf entry gives NaN (or inf) in the affected outputs, never a crash
    or an out-of-range index; rows without it are unaffected where the op is row-local."""
    x = torch.randn(8, 4, dtype=torch.float64)
    x[3, 1] = bad
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = run_all_ops(x, labels, metric)
    d = out["pairwise_distance"]
    assert not torch.isfinite(d[3, torch.arange(8) != 3]).any()
    clean = [0, 1, 2, 4, 5, 6, 7]
    assert torch.isfinite(d[clean][:, clean]).all()
    # as docs/API.md states: an infinite coordinate gives inf against finite rows for the euclidean metrics, and
    # NaN for cosine (an undefined direction, as F.cosine_similarity has it)
    if bad == bad:
        off = d[3, torch.arange(8) != 3]
        assert (torch.isnan(off) if metric == "cosine" else torch.isposinf(off)).all(), metric
    if bad != bad:  # NaN: the losses that see row 3 are NaN
        for name in ("batch_hard", "batch_all", "contrastive"):
            assert torch.isnan(out[name]), name
    dist, idx = out["knn"]
    assert idx.min() >= 0 and idx.max() < 8
    for row in range(8):  # every row lists distinct indices, never itself
        assert len(set(idx[row].tolist())) == 7 and row not in idx[row].tolist()
    for strategy in ("all", "batch_hard", "semihard"):
        for t in out[f"mine_{strategy}"]:
            assert t.numel() == 0 or (t.min() >= 0 and t.max() < 8)
    assert (out["statistics"] >= 0).all() and out["statistics"][0] == 48
    assert int(out["statistics"][1:].sum()) <= 48
    # gradients: no crash, NaN allowed
    xg = x.clone().requires_grad_()
    for name in LOSSES:
        torch.autograd.grad(_loss(name, xg, labels, metric=metric), xg)


def test_nan_knn_orders_nan_last():
    q = torch.randn(3, 4)
    db = torch.randn(5, 4)
    db[2, 0] = float("nan")
    d, i = metricops.knn(q, db, k=5)
    assert torch.equal(i[:, -1], torch.full((3,), 2))
    assert torch.isnan(d[:, -1]).all() and torch.isfinite(d[:, :-1]).all()


@pytest.mark.parametrize("memory", ["matrix", "streaming"])
@pytest.mark.parametrize("batch", [8, 48, 200])  # few positives per anchor (scan) and many (sorted counts)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_infinite_rows_match_reference(metric, batch, memory):
    """Two rows of different classes with an infinite coordinate: a triplet whose d(a, p) and d(a, n) are both
    inf has the term margin + inf - inf = NaN, as F.triplet_margin_loss gives. The batch-all kernels count only
    active terms, and once summed such rows to inf; every loss must give the reference's value (NaN where it
    is NaN), which F.triplet_margin_loss confirms from outside."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, dtype=torch.float64, generator=g)
    labels = torch.arange(batch) % 4
    x[1, 0] = float("inf")
    x[2, 3] = -float("inf")
    for name in LOSSES:
        for reduction in ("mean", "sum", "mean_nonzero") if name != "contrastive" else ("mean", "sum"):
            kw = dict(metric=metric, reduction=reduction, memory=memory)
            got = _loss(name, x, labels, **kw)
            kw.pop("memory")
            want = _ref_loss(name, x, labels, **kw)
            assert torch.equal(got.isnan(), want.isnan()), (name, reduction, got, want)
            assert_close(got.nan_to_num(), want.nan_to_num())
    # outside oracle: anchor 5 (label 1, as row 1) with positive 1 and negative 2, both at distance inf
    a, p, n = x[5:6], x[1:2], x[2:3]
    assert torch.nn.functional.triplet_margin_loss(a, p, n, margin=0.2).isnan()
    assert metricops.batch_all_triplet_loss(x, labels, metric=metric, reduction="sum", memory=memory).isnan()
