"""metricops.pml miners and the fused triplet losses against pytorch-metric-learning 2.9."""

import pytest
import torch

import metricops
from common import assert_close
from metricops.pml import distances, losses, miners

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

DISTANCES = [
    ("lp", lambda: distances.LpDistance(), lambda: pml_distances.LpDistance()),
    ("lp_raw", lambda: distances.LpDistance(normalize_embeddings=False), lambda: pml_distances.LpDistance(normalize_embeddings=False)),
    ("lp_sq", lambda: distances.LpDistance(power=2), lambda: pml_distances.LpDistance(power=2)),
    ("cos", lambda: distances.CosineSimilarity(), lambda: pml_distances.CosineSimilarity()),
]


def batches(n=6, B=24, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        classes = (2, 4, 8, 24, 1, 3)[i % 6]
        x = torch.randn(B, D, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, classes, (B,), generator=gen)
        yield x, labels


def _sorted(triplets):
    a, p, n = (t.to(torch.int64) for t in triplets)
    key = (a * 10**6 + p * 10**3 + n) if len(a) else a
    order = torch.argsort(key)
    return a[order], p[order], n[order]


@pytest.mark.parametrize("dist_name, ours, theirs", DISTANCES, ids=[d[0] for d in DISTANCES])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_triplet_margin_miner(dist_name, ours, theirs, kind):
    for x, labels in batches():
        got = miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind, distance=ours())(x, labels)
        want = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind, distance=theirs())(x, labels)
        for g, w in zip(got, _sorted(want)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("dist_name, ours, theirs", DISTANCES, ids=[d[0] for d in DISTANCES])
def test_batch_hard_miner(dist_name, ours, theirs):
    for x, labels in batches():
        got = miners.BatchHardMiner(distance=ours())(x, labels)
        want = pml_miners.BatchHardMiner(distance=theirs())(x, labels)
        for g, w in zip(got, _sorted(want)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_mine_triplets_matches_triplet_margin_miner(kind):
    strategy = {"all": "violating"}.get(kind, kind)
    for x, labels in batches(seed=3):
        got = metricops.mine_triplets(x, labels, strategy=strategy, margin=0.1, normalize=True)
        want = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets=kind)(x, labels)
        for g, w in zip(got, _sorted(want)):
            assert torch.equal(g, w)


def test_batch_hard_loss_equals_pml_miner_plus_loss():
    """metricops.batch_hard_triplet_loss(normalize=True, reduction="mean_nonzero") ==
    PML BatchHardMiner + TripletMarginLoss (AvgNonZeroReducer), values and gradients."""
    for x, labels in batches(seed=5):
        x1 = x.float().requires_grad_()
        x2 = x.float().requires_grad_()
        ours = metricops.batch_hard_triplet_loss(x1, labels, margin=0.2, normalize=True, reduction="mean_nonzero")
        miner, loss = pml_miners.BatchHardMiner(), pml_losses.TripletMarginLoss(margin=0.2)
        theirs = loss(x2, labels, miner(x2, labels))
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        g1, g2 = torch.autograd.grad(ours, x1), torch.autograd.grad(theirs, x2)
        assert_close(g1[0], g2[0], atol=1e-5, rtol=1e-4)


def test_batch_all_loss_equals_pml_triplet_margin_loss():
    for x, labels in batches(seed=6):
        x1 = x.float().requires_grad_()
        x2 = x.float().requires_grad_()
        ours = metricops.batch_all_triplet_loss(x1, labels, margin=0.2, normalize=True)
        theirs = pml_losses.TripletMarginLoss(margin=0.2)(x2, labels)
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(theirs, x2)[0], atol=1e-5, rtol=1e-4)


def test_pml_losses_with_our_miners():
    for x, labels in batches(seed=7):
        x1 = x.float().requires_grad_()
        x2 = x.float().requires_grad_()
        ours = losses.TripletMarginLoss(margin=0.1)(x1, labels, miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")(x1, labels))
        theirs = pml_losses.TripletMarginLoss(margin=0.1)(
            x2, labels, pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")(x2, labels)
        )
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(theirs, x2)[0], atol=1e-5, rtol=1e-4)


def test_miner_refuses_reference_set():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(NotImplementedError, match="ref_emb"):
        miners.BatchHardMiner()(x, labels, torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
