"""Property-based comparison of every loss op and pairwise_distance
with metricops.reference (float64), values and gradients.

Shapes, label patterns, metrics, reductions, margins and dtypes are drawn by
hypothesis. Label patterns are weighted towards batches with positives and
negatives (a batch without a valid triplet tests only the zero loss). The
coordinates are random normal (from a drawn seed), which keeps them away from
ties, or small integers, which make real ties: d(a,n) == d(a,p) and m == 0 or
m == margin exactly. Gradients are compared only when no hinge argument or
selection comparison of the reference lies within a small distance of its
kink (``_away_from_kinks``); values are always compared, and on integer
coordinates with an exact metric (euclidean, sqeuclidean: both sides compute
the same integer squared distances) the ties themselves are compared too.

Profiles (conftest.py): "dev" by default and "ci" when CI is set, both
derandomized (the same examples every run); HYPOTHESIS_PROFILE=random draws
new examples, many more, for long runs. The tests where most bugs hide (the
triplet losses, mining) run 4x the profile's examples.
"""

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, event, given, settings, strategies as st  # noqa: E402

import metricops  # noqa: E402
from metricops import reference  # noqa: E402
from common import METRICS  # noqa: E402

EXACT_METRICS = ("euclidean", "sqeuclidean")  # integer coordinates give identical distances on both sides
MORE_EXAMPLES = settings(max_examples=4 * settings.default.max_examples)
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-4, rtol=2e-4)}
KINK = {torch.float64: 1e-6, torch.float32: 1e-3}


@st.composite
def batches(draw, min_b=0, max_b=12):
    # Most batches have 4+ rows and a pattern with positives and negatives, so they hold valid triplets.
    small = draw(st.sampled_from([False, False, False, True]))  # 1 in 4: any size, from min_b
    b = draw(st.integers(min_b, max_b) if small else st.integers(max(min_b, 4), max(max_b, 4)))
    d = draw(st.integers(1, 8))
    pattern = draw(
        st.sampled_from(
            ["balanced", "random", "balanced", "pairs", "random", "balanced", "negative_huge", "one_class", "distinct"]
        )
    )
    integer = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact distances, ties
        x = torch.randint(-2, 3, (b, d), generator=g).to(torch.float64)
    else:
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if pattern == "balanced":  # classes of 2+ members: every anchor has positives and negatives from b = 4
        labels = torch.arange(b) % max(2, b // 3)
    elif pattern == "random":
        labels = torch.randint(0, max(1, b // 2), (b,), generator=g)
    elif pattern == "one_class":
        labels = torch.zeros(b, dtype=torch.int64)
    elif pattern == "distinct":
        labels = torch.randperm(b, generator=g)
    elif pattern == "pairs":
        labels = torch.arange(b) // 2
    else:
        labels = (torch.randint(0, 3, (b,), generator=g) - 1) * (2**40) - 7
    if draw(st.booleans()):
        labels = labels.to(torch.int32) if pattern != "negative_huge" else labels
    event("has a valid triplet" if _has_valid_triplet(labels) else "no valid triplet")
    return x.to(dtype), labels


def _has_valid_triplet(labels):
    same = labels[:, None] == labels[None, :]
    return bool(((same.sum(1) > 1) & (~same).any(1)).any()) if labels.numel() else False


def _integer_coordinates(x):
    """Small integer coordinates: distances of an exact metric are identical in metricops and the reference."""
    return x.numel() > 0 and bool((x == x.round()).all())


# Below this, a hinge argument or a comparison of two distances may be a tie in one implementation and
# not in the other (distances differ by rounding): values that jump there are not compared.
TIE = {torch.float64: 1e-9, torch.float32: 1e-5}


def _tie_safe(x, metric, normalize, data, quantities):
    """(metric, normalize) under which a value that jumps at a tie is compared.

    Semi-hard's "farther" is strict and mean_nonzero does not count a term at
    exactly 0. On integer coordinates an exact metric without normalization
    gives both sides identical distances, so exact ties are compared as ties.
    Otherwise the example is used only if no quantity (hinge argument or
    difference of distances, of the reference) lies within TIE of 0: D = 1
    with the cosine metric or normalize=True makes every distance 0 or 2,
    exactly in the reference and not in a GEMM.
    """
    if _integer_coordinates(x):
        return data.draw(st.sampled_from(EXACT_METRICS)), False
    d = reference.pairwise_distance(x.double(), metric=metric, normalize=normalize)
    assume(all(q.numel() == 0 or q.abs().min() > TIE[x.dtype] for q in quantities(d)))
    return metric, normalize


def _away_from_kinks(d, labels, quantities, thresh):
    """No hinge argument near 0, and no tie between two distances of a row (selection kinks)."""
    if d.numel() == 0:
        return True
    for q in quantities:
        if q.numel() and q.abs().min() < thresh:
            return False
    b = d.shape[0]
    off = ~torch.eye(b, dtype=torch.bool)
    for a in range(b):
        row = d[a][off[a]].sort().values
        if row.numel() > 1 and (row[1:] - row[:-1]).min() < thresh:
            return False
    if off.any() and d[off].min() < thresh:  # euclidean/cosine kink at d = 0
        return False
    return True


def _triplet_quantities(d, labels, margin):
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    neg = labels[:, None] != labels[None, :]
    valid = pos[:, :, None] & neg[:, None, :]
    m = d[:, None, :] - d[:, :, None]  # d[a,n] - d[a,p]
    return [(margin - m)[valid], m[valid]]


def _compare(fn, ref, x, **kw):
    """Values always; gradients (float64 reference) when returned grad check is wanted."""
    xa = x.clone().requires_grad_()
    xr = x.double().clone().requires_grad_()
    out = fn(xa, **kw)
    exp = ref(xr, **kw)
    torch.testing.assert_close(out.double(), exp, **TOL[x.dtype], equal_nan=True)
    return xa, xr, out, exp


def _grads_match(xa, xr, out, exp, dtype):
    if not out.requires_grad:
        return
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (ga,) = torch.autograd.grad((out.double() * w).sum(), xa)
    (gr,) = torch.autograd.grad((exp * w).sum(), xr)
    torch.testing.assert_close(ga.double(), gr, **TOL[dtype])


@given(batch=batches(), metric=st.sampled_from(METRICS), normalize=st.booleans(), with_y=st.booleans())
def test_pairwise_distance_matches_reference(batch, metric, normalize, with_y):
    x, _ = batch
    y = x.flip(0)[: max(0, x.shape[0] - 1)] + 0.5 if with_y else None
    xa = x.clone().requires_grad_()
    xr = x.double().clone().requires_grad_()
    out = metricops.pairwise_distance(xa, None if y is None else y, metric=metric, normalize=normalize)
    exp = reference.pairwise_distance(xr, None if y is None else y.double(), metric=metric, normalize=normalize)
    torch.testing.assert_close(out.double(), exp, **TOL[x.dtype])
    if not exp.numel():
        return
    d = exp.detach()
    ok = d > KINK[x.dtype]
    if metric == "euclidean":
        # The Gram form's d has relative error ~eps·(‖x‖² + ‖y‖²)/d², and the gradient (x - y)/d inherits it:
        # in float32 that passes the tolerance for close rows well above KINK (d = 0.004 at ‖x‖ = 1).
        rows = F.normalize(xr.detach(), dim=1) if normalize else xr.detach()
        cols = rows if y is None else (F.normalize(y.double(), dim=1) if normalize else y.double())
        scale = (rows**2).sum(1)[:, None] + (cols**2).sum(1)[None, :]
        ok &= d**2 > 1e4 * torch.finfo(x.dtype).eps * scale
    if (ok | torch.eye(*d.shape, dtype=torch.bool)).all():
        _grads_match(xa, xr, out, exp, x.dtype)


LOSS_SPECS = {
    "batch_hard": (
        metricops.batch_hard_triplet_loss,
        reference.batch_hard_triplet_loss,
        ("mean", "sum", "mean_nonzero", "none"),
    ),
    "semihard": (
        metricops.semihard_triplet_loss,
        reference.semihard_triplet_loss,
        ("mean", "sum", "mean_nonzero", "none"),
    ),
    "batch_all": (metricops.batch_all_triplet_loss, reference.batch_all_triplet_loss, ("mean", "sum", "mean_nonzero")),
}


@pytest.mark.parametrize("name", list(LOSS_SPECS))
@MORE_EXAMPLES
@given(batch=batches(), metric=st.sampled_from(METRICS), normalize=st.booleans(), data=st.data())
def test_triplet_losses_match_reference(name, batch, metric, normalize, data):
    x, labels = batch
    fn, ref, reductions = LOSS_SPECS[name]
    reduction = data.draw(st.sampled_from(reductions))
    margin = data.draw(st.sampled_from([0.0, 0.2, 1.0]))
    if name == "semihard" or reduction == "mean_nonzero":  # values that jump at d(a,n) == d(a,p) or a 0 term
        metric, normalize = _tie_safe(x, metric, normalize, data, lambda d: _triplet_quantities(d, labels, margin))
    kw = dict(labels=labels, margin=margin, metric=metric, normalize=normalize, reduction=reduction)
    if name == "batch_hard" and data.draw(st.booleans()):
        kw["soft"] = True
    wrap = lambda f: (lambda e, labels, **k: f(e, labels, **k))  # noqa: E731
    xa, xr, out, exp = _compare(wrap(fn), wrap(ref), x, **kw)
    d = reference.pairwise_distance(x.double(), metric=metric, normalize=normalize)
    if _away_from_kinks(d, labels, _triplet_quantities(d, labels, margin), KINK[x.dtype]):
        _grads_match(xa, xr, out, exp, x.dtype)


@given(
    batch=batches(),
    metric=st.sampled_from(METRICS),
    normalize=st.booleans(),
    squared=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "mean_nonzero", "none"]),
    margins=st.sampled_from([(0.0, 1.0), (0.1, 0.8), (0.5, 2.0)]),
    data=st.data(),
)
def test_contrastive_loss_matches_reference(batch, metric, normalize, squared, reduction, margins, data):
    x, labels = batch
    pm, nm = margins
    if reduction == "mean_nonzero":  # a term exactly at 0 is not counted
        off = ~torch.eye(x.shape[0], dtype=torch.bool)
        metric, normalize = _tie_safe(x, metric, normalize, data, lambda d: [(d - pm)[off], (nm - d)[off]])
    kw = dict(
        labels=labels,
        pos_margin=pm,
        neg_margin=nm,
        metric=metric,
        squared=squared,
        normalize=normalize,
        reduction=reduction,
    )
    f = lambda e, labels, **k: metricops.contrastive_loss(e, labels, **k)  # noqa: E731
    r = lambda e, labels, **k: reference.contrastive_loss(e, labels, **k)  # noqa: E731
    xa, xr, out, exp = _compare(f, r, x, **kw)
    d = reference.pairwise_distance(x.double(), metric=metric, normalize=normalize)
    off = ~torch.eye(d.shape[0], dtype=torch.bool)
    qs = [(d - pm)[off], (nm - d)[off]]
    if all(q.numel() == 0 or q.abs().min() > KINK[x.dtype] for q in qs) and (
        d.numel() == 0 or d[off].numel() == 0 or d[off].min() > KINK[x.dtype]
    ):
        _grads_match(xa, xr, out, exp, x.dtype)


@given(
    batch=batches(min_b=0, max_b=10),
    metric=st.sampled_from(METRICS),
    squared=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "mean_nonzero", "none"]),
    margin=st.sampled_from([0.5, 1.0, 2.0]),
    y_kind=st.sampled_from(["bool", "int", "float"]),
)
def test_pair_contrastive_matches_reference(batch, metric, squared, reduction, margin, y_kind):
    x, _ = batch
    x1 = x.roll(1, 0) * 0.7 + 0.1
    y = torch.arange(x.shape[0]) % 3 == 0
    y = {"bool": y, "int": y.long(), "float": y.double()}[y_kind]
    x0a, x1a = x.clone().requires_grad_(), x1.clone().requires_grad_()
    x0r, x1r = x.double().clone().requires_grad_(), x1.double().clone().requires_grad_()
    kw = dict(margin=margin, metric=metric, squared=squared, reduction=reduction)
    d = reference._row_distance(x.double(), x1.double(), metric)
    if reduction == "mean_nonzero":  # a term exactly at 0 is not counted: no d or margin - d within TIE of 0
        assume(d.numel() == 0 or torch.minimum(d.abs(), (margin - d).abs()).min() > TIE[x.dtype])
    out = metricops.pair_contrastive_loss(x0a, x1a, y, **kw)
    exp = reference.pair_contrastive_loss(x0r, x1r, y, **kw)
    torch.testing.assert_close(out.double(), exp, **TOL[x.dtype])
    if d.numel() == 0 or ((d - margin).abs().min() > KINK[x.dtype] and d.min() > KINK[x.dtype]):
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        ga = torch.autograd.grad((out.double() * w).sum(), (x0a, x1a))
        gr = torch.autograd.grad((exp * w).sum(), (x0r, x1r))
        for a, b in zip(ga, gr):
            torch.testing.assert_close(a.double(), b, **TOL[x.dtype])


@given(
    batch=batches(min_b=0, max_b=10),
    p=st.sampled_from([1.0, 2.0, 3.0]),
    swap=st.booleans(),
    squared=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    margin=st.sampled_from([0.5, 1.0]),
)
def test_triplet_margin_loss_matches_torch(batch, p, swap, squared, reduction, margin):
    x, _ = batch
    if squared:
        p = 2.0
    a, pos, neg = x, x.roll(1, 0) * 0.9, x.roll(2, 0) * 1.1 + 0.2
    ins = [t.clone().requires_grad_() for t in (a, pos, neg)]
    ref_ins = [t.double().clone().requires_grad_() for t in (a, pos, neg)]
    out = metricops.triplet_margin_loss(*ins, margin=margin, p=p, swap=swap, reduction=reduction, squared=squared)
    if squared:
        exp = reference.triplet_margin_loss(*ref_ins, margin=margin, p=p, swap=swap, reduction=reduction, squared=True)
    else:
        exp = F.triplet_margin_loss(*ref_ins, margin=margin, p=p, swap=swap, reduction=reduction)
        if x.shape[0] == 0 and reduction == "mean":
            exp = exp.nan_to_num(0.0)  # documented deviation: 0, not NaN, for an empty mean
    torch.testing.assert_close(out.double(), exp, **TOL[x.dtype])
    with torch.no_grad():
        # Kinks: the hinge's argument near 0 (before the relu: a clamped value cannot tell -1e-12 from -5),
        # and swap's min of two near-equal distances.
        def dist(u, v):
            u, v = u.double(), v.double()
            return ((u - v) ** 2).sum(-1) if squared else torch.linalg.vector_norm(u - v + 1e-6, ord=p, dim=-1)

        d_an, d_pn = dist(a, neg), dist(pos, neg)
        kinks = [margin + dist(a, pos) - (torch.minimum(d_an, d_pn) if swap else d_an)]
        if swap:
            kinks.append(d_an - d_pn)
        raw_ok = all(k.numel() == 0 or k.abs().min() > KINK[x.dtype] for k in kinks)
    if raw_ok and out.requires_grad:
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        ga = torch.autograd.grad((out.double() * w).sum(), ins)
        gr = torch.autograd.grad((exp * w).sum(), ref_ins)
        for g1, g2 in zip(ga, gr):
            torch.testing.assert_close(g1.double(), g2, **TOL[x.dtype])


@MORE_EXAMPLES
@given(
    batch=batches(max_b=10),
    metric=st.sampled_from(METRICS),
    strategy=st.sampled_from(["all", "violating", "semihard", "hard", "easy", "batch_hard"]),
    margin=st.sampled_from([-0.2, 0.0, 0.3, 1.0]),
)
def test_mining_and_statistics_match_reference(batch, metric, strategy, margin):
    x, labels = batch
    x = x.double()
    d = reference.pairwise_distance(x, metric=metric)
    exact_ties = _integer_coordinates(x) and metric in EXACT_METRICS and strategy != "batch_hard"
    if exact_ties:
        # m == 0 and m == margin (1.0 on integer points) happen exactly and are classified alike on both
        # sides. (batch_hard's choice among tied candidates is not part of the contract.)
        event("mining on exact ties")
    else:
        assume(_away_from_kinks(d, labels, _triplet_quantities(d, labels, margin), 1e-6))
    got = metricops.mine_triplets(x, labels, strategy=strategy, margin=margin, metric=metric)
    exp = reference.mine_triplets(x, labels, strategy=strategy, margin=margin, metric=metric)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    stats = metricops.triplet_statistics(x, labels, margin=margin, metric=metric)
    ref_stats = reference.triplet_statistics(x, labels, margin=margin, metric=metric)
    assert {k: int(v) for k, v in stats.items()} == {k: int(v) for k, v in ref_stats.items()}


# The similarity losses (the log-sum-exp engine): name -> (f(module, x, labels, reduction, **memory), smooth), where
# memory is {} for the reference. A smooth loss has no kink a random normal batch can sit on, so its gradients are
# compared too; the mined Multi-Similarity loss selects pairs by comparing similarities (a jump at ties), so on
# integer coordinates (exact ties, computed with different rounding on each side) it is not compared.
SIMILARITY = {
    "supcon": (lambda m, x, y, r, **kw: m.supcon_loss(x, y, temperature=0.3, reduction=r, **kw), True),
    "ntxent": (lambda m, x, y, r, **kw: m.ntxent_loss(x, y, temperature=0.3, reduction=r, **kw), True),
    "multi_similarity": (
        lambda m, x, y, r, **kw: m.multi_similarity_loss(x, y, alpha=2.0, beta=8.0, reduction=r, **kw),
        True,
    ),
    "multi_similarity_mined": (
        lambda m, x, y, r, **kw: m.multi_similarity_loss(x, y, mining_epsilon=0.1, reduction=r, **kw),
        False,
    ),
    "circle": (lambda m, x, y, r, **kw: m.circle_loss(x, y, gamma=8.0, reduction=r, **kw), True),
    "generalized_lifted": (lambda m, x, y, r, **kw: m.generalized_lifted_structure_loss(x, y, reduction=r, **kw), True),
    "lifted_structure": (lambda m, x, y, r, **kw: m.lifted_structure_loss(x, y, reduction=r, **kw), True),
    # paired views: always streaming (no memory argument)
    "info_nce_symmetric": (
        lambda m, x, y, r, **kw: m.info_nce_loss(
            x, 0.5 * x.flip(0) + 0.25, symmetric=True, temperature=0.2, reduction=r
        ),
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(SIMILARITY))
@given(
    batch=batches(), reduction=st.sampled_from(["mean", "sum", "none"]), memory=st.sampled_from(["auto", "streaming"])
)
def test_similarity_losses_match_reference(name, batch, reduction, memory):
    """Values (and, for smooth losses on random normal coordinates, gradients) against the float64 reference, on
    batches of 0-12 rows with D = 1..8 (D = 1: every cosine is ±1), small-integer coordinates (zero rows,
    duplicated rows, exact ties), one class, all-distinct labels, int32 and huge labels. A sweep like this one (1500
    cases) found the lifted losses' distance for zero rows (test_similarity.py's test_lifted_losses_with_zero_and_tiny_rows
    pins it); HYPOTHESIS_PROFILE=random runs 400 new examples per loss."""
    x, labels = batch
    fn, smooth = SIMILARITY[name]
    integer = _integer_coordinates(x)
    assume(not (name == "multi_similarity_mined" and integer))
    if "lifted" in name and x.shape[0] > 1:
        # d = sqrt(2 - 2s) from the Gram form cannot resolve nearly parallel rows (d² below its rounding, ~1e-6
        # in float32: d is then 0, as for duplicates); and d = 0 is the norm's kink, where gradients differ.
        d = reference.pairwise_distance(x.double(), metric="euclidean", normalize=True)
        d = d[~torch.eye(x.shape[0], dtype=torch.bool)]
        assume(not ((d > 0) & (d < KINK[x.dtype])).any())
        smooth = smooth and bool((d > KINK[x.dtype]).all())
    ours, ref64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = fn(metricops, ours, labels, reduction, memory=memory)
    want = fn(reference, ref64, labels, reduction)
    torch.testing.assert_close(got.double(), want, **TOL[x.dtype])
    # F.normalize's Jacobian divides by ||x||: float32 rounding in a short row's gradient grows as 1/||x|| (with
    # D = 1 the exact gradient is 0 and all of it is rounding), so float32 gradients are compared for rows of
    # norm >= 0.1; float64 covers short rows.
    if x.dtype == torch.float32 and x.numel():
        smooth = smooth and bool((x.norm(dim=1) >= 0.1).all())
    if smooth and not integer and x.numel() and got.requires_grad:
        weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).reshape(got.shape)
        (g,) = torch.autograd.grad((got * weights).sum(), ours, allow_unused=True)
        (g_ref,) = torch.autograd.grad((want * weights.double()).sum(), ref64, allow_unused=True)
        g = torch.zeros_like(ours) if g is None else g
        g_ref = torch.zeros_like(ref64) if g_ref is None else g_ref
        atol = TOL[x.dtype]["atol"] * (1 + g_ref.abs().max().item())
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=TOL[x.dtype]["rtol"])


# The class-parameter losses: name -> f(module, x, labels, weight, reduction) (ProxyAnchor has no reduction).
CLASS_LOSSES = {
    "arcface": lambda m, x, y, w, r: m.arcface_loss(x, y, w, margin=0.3, scale=6.0, reduction=r),
    "cosface": lambda m, x, y, w, r: m.cosface_loss(x, y, w, margin=0.2, scale=6.0, reduction=r),
    "proxy_anchor": lambda m, x, y, w, r: m.proxy_anchor_loss(x, y, w, margin=0.1, alpha=6.0),
}


@pytest.mark.parametrize("name", sorted(CLASS_LOSSES))
@given(batch=batches(), classes=st.integers(1, 6), reduction=st.sampled_from(["mean", "sum", "none"]), data=st.data())
def test_class_losses_match_reference(name, batch, classes, reduction, data):
    """ArcFace, CosFace and ProxyAnchor against the float64 reference on hypothesis batches: labels folded into
    [0, C) (classes without a row included), weights random or with a zero row; values always, gradients of both
    inputs on random normal coordinates, away from ArcFace's infinite slopes at sin θ = 0."""
    x, labels = batch
    labels = labels.remainder(classes).to(torch.int64)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(classes, x.shape[1], generator=g, dtype=torch.float64)
    zero_class = data.draw(st.booleans())
    if zero_class:
        w[0] = 0  # a zero class weight: F.normalize leaves it at 0
    fn = CLASS_LOSSES[name]
    ours = [x.clone().requires_grad_(), w.to(x.dtype).requires_grad_()]
    ref64 = [x.double().requires_grad_(), w.to(x.dtype).double().requires_grad_()]
    got = fn(metricops, ours[0], labels, ours[1], reduction)
    want = fn(reference, ref64[0], labels, ref64[1], reduction)
    torch.testing.assert_close(got.double(), want, **TOL[x.dtype])
    smooth = not _integer_coordinates(x) and x.numel() > 0
    if x.dtype == torch.float32:  # as for the similarity losses: F.normalize's 1/||x|| on short rows
        smooth = smooth and bool((x.norm(dim=1) >= 0.1).all())
    if name == "arcface" and smooth:  # cos(θ + m) has an infinite slope in cos θ at θ = 0 and θ = π (sin θ = 0)
        cos = F.normalize(x.double(), dim=1) @ F.normalize(w, dim=1).T
        smooth = bool((cos.abs() < 1 - KINK[x.dtype]).all())
    if smooth and got.requires_grad:
        weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).reshape(got.shape)
        grads = torch.autograd.grad((got * weights).sum(), ours, allow_unused=True)
        grads_ref = torch.autograd.grad((want * weights.double()).sum(), ref64, allow_unused=True)
        for k, (a, b, leaf) in enumerate(zip(grads, grads_ref, ours)):
            a = torch.zeros_like(leaf) if a is None else a
            b = torch.zeros_like(leaf, dtype=torch.float64) if b is None else b
            if k == 1 and zero_class:  # its Jacobian is I/eps (1e12): rounding there is not compared
                a, b = a[1:], b[1:]
            if b.numel() == 0:
                continue
            atol = TOL[x.dtype]["atol"] * (1 + b.abs().max().item())
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=TOL[x.dtype]["rtol"])
