"""Exact values where the Gram form loses them: duplicated rows, parallel rows,
non-finite and overflowing inputs, kinks and boundaries of the hinge and of
the triplet classes. The expected values are literal or come from explicit
differences in float64, never from the Gram form."""

import pytest
import torch

import metricops
from metricops import reference
from metricops.pml import losses as pml_losses
from common import METRICS


def _duplicated_batch(dtype=torch.float32, n=20, dim=64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, dim, generator=g, dtype=dtype) * scale
    return torch.cat([b, b]), torch.arange(n).repeat(2)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_rows_have_distance_exactly_zero(metric, normalize, dtype):
    x, _ = _duplicated_batch(dtype)
    n = x.shape[0] // 2
    i = torch.arange(n)
    d = metricops.pairwise_distance(x, metric=metric, normalize=normalize)
    assert torch.all(d[i, i + n] == 0) and torch.all(d[i + n, i] == 0)
    assert torch.all(d.diagonal() == 0)
    d_xy = metricops.pairwise_distance(x[:n], x[n:], metric=metric, normalize=normalize)
    assert torch.all(d_xy.diagonal() == 0)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_rows_zero_gradient_and_knn(metric):
    x, _ = _duplicated_batch(torch.float64, n=6, dim=5)
    x.requires_grad_()
    d = metricops.pairwise_distance(x, metric=metric)
    n = 6
    (g,) = torch.autograd.grad(d[0, n], x)  # d(x_0, x_6) with x_0 == x_6: a minimum, gradient 0
    assert torch.all(g == 0) or g.abs().max() < 1e-12
    # knn: the duplicate is at distance exactly 0 and comes first.
    dist, idx = metricops.knn(x.detach(), k=1, metric=metric)
    assert torch.all(dist[:, 0] == 0)
    assert torch.equal(idx[:, 0], torch.cat([torch.arange(n) + n, torch.arange(n)]))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("memory", ["matrix", "streaming"])
def test_losses_with_duplicated_rows_match_float64(metric, memory):
    """float32 losses on a batch with duplicates equal the float64 reference.

    With the Gram form's rounding, duplicated positives had a distance of ~4e-3
    instead of 0, which counted as non-zero terms and moved mean_nonzero
    losses by 20-30%."""
    x, labels = _duplicated_batch(torch.float32, n=16, dim=32, scale=0.3)
    labels = labels % 4
    x64 = x.double()
    cases = {
        "contrastive": lambda e, **k: metricops.contrastive_loss(e, labels, reduction="mean_nonzero", **k),
        "batch_all": lambda e, **k: metricops.batch_all_triplet_loss(e, labels, **k),
        "batch_hard": lambda e, **k: metricops.batch_hard_triplet_loss(e, labels, **k),
        "semihard": lambda e, **k: metricops.semihard_triplet_loss(e, labels, **k),
    }
    refs = {
        "contrastive": lambda e: reference.contrastive_loss(e, labels, metric=metric, reduction="mean_nonzero"),
        "batch_all": lambda e: reference.batch_all_triplet_loss(e, labels, metric=metric),
        "batch_hard": lambda e: reference.batch_hard_triplet_loss(e, labels, metric=metric),
        "semihard": lambda e: reference.semihard_triplet_loss(e, labels, metric=metric),
    }
    for name, fn in cases.items():
        got = fn(x, metric=metric, memory=memory)
        exp = refs[name](x64)
        assert got.item() == pytest.approx(exp.item(), rel=1e-4, abs=1e-6), name
    stats = metricops.triplet_statistics(x, labels, metric=metric)
    exp_stats = reference.triplet_statistics(x64, labels, metric=metric)
    assert {k: int(v) for k, v in stats.items()} == {k: int(v) for k, v in exp_stats.items()}


def test_pml_contrastive_with_duplicates_matches_float64():
    x, labels = _duplicated_batch(torch.float32, n=20, dim=16, scale=0.2)
    labels = labels % 5
    got = pml_losses.ContrastiveLoss()(x, labels)
    exp = pml_losses.ContrastiveLoss()(x.double(), labels)
    assert got.item() == pytest.approx(exp.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_is_symmetric_nonnegative_and_zero_for_parallel_rows(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 8, generator=g, dtype=dtype)
    # Parallel rows (power-of-two multiples, exact in floating point) and random ones.
    x = torch.cat([base, 2 * base, 0.25 * base, torch.randn(4, 8, generator=g, dtype=dtype)])
    d = metricops.pairwise_distance(x, metric="cosine")
    assert torch.equal(d, d.T)
    assert torch.all(d >= 0)
    for k in range(4):
        for a, b in ((k, k + 4), (k, k + 8), (k + 4, k + 8)):
            assert d[a, b] == 0
    # knn breaks the exact ties by the lower index, as the reference does.
    got_d, got_i = metricops.knn(x, k=3, metric="cosine")
    exp_d, exp_i = reference.knn(x, k=3, metric="cosine")
    assert torch.equal(got_i[:12, :2], exp_i[:12, :2])
    assert torch.all(got_d[:12, :2] == 0)


def test_symmetric_self_distance_for_every_metric():
    x = torch.randn(300, 33)
    for metric in METRICS:
        d = metricops.pairwise_distance(x, metric=metric)
        assert torch.equal(d, d.T), metric
        assert torch.all(d >= 0), metric


def test_collinear_statistics_match_reference():
    # 1-D embeddings are collinear: every cosine distance is exactly 0 or 2.
    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0], [-2.0], [0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    d = metricops.pairwise_distance(x, metric="cosine")
    assert set(d.flatten().tolist()) <= {0.0, 2.0}
    got = metricops.triplet_statistics(x, labels, metric="cosine")
    exp = reference.triplet_statistics(x, labels, metric="cosine")
    assert {k: int(v) for k, v in got.items()} == {k: int(v) for k, v in exp.items()}


# --------------------------------------------------------------------------- triplet_statistics, negative margins


@pytest.mark.parametrize("margin", [-0.5, -0.1, 0.0, 0.3])
def test_triplet_statistics_counts_each_class_directly(margin):
    # 1-D integer points: every m = d_an - d_ap is an integer, so the class
    # boundaries m == 0 and m == margin are hit exactly.
    x = torch.tensor([[0.0], [2.0], [-2.0], [3.0], [-1.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    got = {k: int(v) for k, v in metricops.triplet_statistics(x, labels, margin=margin).items()}
    exp = {k: int(v) for k, v in reference.triplet_statistics(x, labels, margin=margin).items()}
    assert got == exp
    assert min(got.values()) >= 0
    if margin < 0:
        assert got["semihard"] == 0  # 0 < m <= margin is empty


def test_triplet_statistics_negative_margin_literal():
    # Anchor 0 at 0, positive 1 at 1; negatives at 0.5 (m = -0.5), 1 (m = 0), 3 (m = 2).
    x = torch.tensor([[0.0], [1.0], [0.5], [1.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    stats = metricops.triplet_statistics(x, labels, margin=-0.5)
    # easy: m > -0.5 -> {0, 2}; hard: m <= 0 -> {-0.5, 0}; semihard: 0 < m <= -0.5 -> none.
    # (anchor 1, positive 0: negatives at 0.5 (m=-0.5), 1.0 (m=-1), 3 (m=1): easy {1}, hard {-0.5, -1})
    assert int(stats["total"]) == 6
    assert int(stats["easy"]) == 3
    assert int(stats["hard"]) == 4
    assert int(stats["semihard"]) == 0


# --------------------------------------------------------------------------- triplet_margin_loss at the kink


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triplet_margin_loss_zero_gradient_at_kink_like_torch(dtype):
    a = torch.tensor([[0.0]], dtype=dtype, requires_grad=True)
    p = torch.tensor([[1.0]], dtype=dtype, requires_grad=True)
    n = torch.tensor([[2.0]], dtype=dtype, requires_grad=True)
    # margin + d_ap - d_an = 1 + 1 - 2 = 0 exactly.
    got = torch.autograd.grad(metricops.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0), (a, p, n))
    exp = torch.autograd.grad(torch.nn.functional.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0), (a, p, n))
    for g, e in zip(got, exp):
        assert torch.equal(g.abs(), e.abs()) and torch.all(g == 0)
    # squared: 3 + 1 - 4 = 0.
    got = torch.autograd.grad(metricops.triplet_margin_loss(a, p, n, margin=3.0, squared=True), (a, p, n))
    assert all(torch.all(g == 0) for g in got)
    # Just above the kink the gradient flows.
    got = torch.autograd.grad(metricops.triplet_margin_loss(a, p, n, margin=1.5, eps=0.0), (a, p, n))
    assert [g.item() for g in got] == [0.0, 1.0, -1.0]


# --------------------------------------------------------------------------- non-finite and overflowing inputs


def test_non_finite_rows_follow_the_explicit_form():
    x = torch.tensor([[-1.0], [2.0], [-float("inf")]])
    d = metricops.pairwise_distance(x)
    # |-1 - (-inf)| = inf, |2 - (-inf)| = inf, and (-inf) - (-inf) is NaN.
    assert d[0, 1] == 3 and d[1, 0] == 3
    assert torch.isinf(d[0, 2]) and torch.isinf(d[1, 2]) and torch.isinf(d[2, 0])
    assert torch.isnan(d[2, 2])
    torch.testing.assert_close(d, reference.pairwise_distance(x), equal_nan=True)


def test_cosine_of_overflowing_rows_is_correct():
    x = torch.tensor([[1e20, 0.0], [1.0, 0.0], [0.0, 3e25], [1e20, 1e20]])
    d = metricops.pairwise_distance(x, metric="cosine")
    exp = reference.pairwise_distance(x.double(), metric="cosine").float()
    torch.testing.assert_close(d, exp, atol=1e-6, rtol=0)
    assert d[0, 1] == 0 and d[0, 2] == pytest.approx(1.0)
    _, idx = metricops.knn(x, k=1, metric="cosine")
    assert idx[0, 0] == 1 and idx[1, 0] == 0


@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_nan_out_valid_indices(metric):
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    d = metricops.pairwise_distance(x, metric=metric)
    assert torch.isnan(d[3]).all() and torch.isnan(d[:, 3]).all()
    assert not torch.isnan(d[torch.arange(8) != 3][:, torch.arange(8) != 3]).any()
    _, idx = metricops.knn(x, k=3, metric=metric)
    assert idx.min() >= 0 and idx.max() < 8
