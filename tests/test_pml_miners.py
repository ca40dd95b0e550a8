"""metricops.pml miners and the fused triplet losses against pytorch-metric-learning 2.9."""

import pytest
import torch

import metricops
from common import assert_close, labelled_batch_with_reference
from metricops.pml import distances, losses, miners

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

DISTANCES = [
    ("lp", lambda: distances.LpDistance(), lambda: pml_distances.LpDistance()),
    (
        "lp_raw",
        lambda: distances.LpDistance(normalize_embeddings=False),
        lambda: pml_distances.LpDistance(normalize_embeddings=False),
    ),
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
        ours = losses.TripletMarginLoss(margin=0.1)(
            x1, labels, miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")(x1, labels)
        )
        theirs = pml_losses.TripletMarginLoss(margin=0.1)(
            x2, labels, pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")(x2, labels)
        )
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(theirs, x2)[0], atol=1e-5, rtol=1e-4)


_EVERY_MINER = [
    ("MultiSimilarityMiner", {"epsilon": 0.3}),
    ("BatchHardMiner", {}),
    ("TripletMarginMiner", {"margin": 0.2, "type_of_triplets": "semihard"}),
]
_EVERY_PAIR_OR_TRIPLET_LOSS = [
    "TripletMarginLoss",
    "ContrastiveLoss",
    "MultiSimilarityLoss",
    "SupConLoss",
    "NTXentLoss",
    "CircleLoss",
    "LiftedStructureLoss",
    "GeneralizedLiftedStructureLoss",
]


@pytest.mark.parametrize("miner_name, miner_kw", _EVERY_MINER, ids=[m[0] for m in _EVERY_MINER])
@pytest.mark.parametrize("loss_name", _EVERY_PAIR_OR_TRIPLET_LOSS)
def test_every_miner_into_every_loss_matches_pml(miner_name, miner_kw, loss_name):
    """Each metricops.pml miner's lazy output fed to each loss, as PML users chain them: the pair miner's
    output into a triplet loss once raised AttributeError (the fused path read a triplet rule from it)."""
    gen = torch.Generator().manual_seed(3)
    for cosine in (False, True):
        x = torch.randn(24, 8, dtype=torch.float64, generator=gen)
        labels = torch.randint(0, 4, (24,), generator=gen)
        kw = dict(miner_kw, distance=distances.CosineSimilarity()) if cosine else miner_kw
        pml_kw = dict(miner_kw, distance=pml_distances.CosineSimilarity()) if cosine else miner_kw
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = getattr(losses, loss_name)()(x1, labels, getattr(miners, miner_name)(**kw)(x1, labels))
        theirs = getattr(pml_losses, loss_name)()(x2, labels, getattr(pml_miners, miner_name)(**pml_kw)(x2, labels))
        assert_close(ours, theirs, atol=1e-9, rtol=1e-7)
        assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(theirs, x2)[0], atol=1e-9, rtol=1e-6)


MARGINS = (-0.5, -0.2, -0.05, 0.0, 0.05, 0.2, 0.5)


@pytest.mark.parametrize("dist_name, ours, theirs", DISTANCES, ids=[d[0] for d in DISTANCES])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_triplet_margin_miner_over_margins(dist_name, ours, theirs, kind):
    """Negative, zero and positive margins (PML's hard set is m <= margin and m <= 0)."""
    for seed in (1, 2):
        for x, labels in batches(n=3, B=16, seed=seed):
            for margin in MARGINS:
                got = miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=ours())(x, labels)
                want = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=theirs())(x, labels)
                for g, w in zip(got, _sorted(want)):
                    assert torch.equal(g, w), (margin, seed)


def _reference_cases(seed=0):
    """(embeddings, labels, ref_emb, ref_labels) of the call forms PML distinguishes."""
    x, labels, ref, ref_labels = labelled_batch_with_reference(seed, 10, 7, 6, dtype=torch.float64, ref_classes=4)
    yield "other_set", x, labels, ref, ref_labels
    yield "own_labels_copy", x, labels, x, labels.clone()  # PML keeps (i, i) pairs: not the same labels object
    yield "own_labels_object", x, labels, x.clone(), labels  # the same object: (i, i) is left out
    yield "no_negative", x, labels, ref, torch.full((7,), int(labels[0]))
    yield "empty_reference", x, labels, ref[:0], ref_labels[:0]


@pytest.mark.parametrize("dist_name, ours, theirs", DISTANCES, ids=[d[0] for d in DISTANCES])
def test_miners_with_reference_set_match_pml(dist_name, ours, theirs):
    for case, x, labels, ref, ref_labels in _reference_cases():
        got = miners.BatchHardMiner(distance=ours())(x, labels, ref_emb=ref, ref_labels=ref_labels)
        if len(ref) == 0:  # PML's BatchHardMiner raises IndexError (max over an empty row) here
            assert all(t.dtype == torch.int64 and t.numel() == 0 for t in got)
            continue
        want = pml_miners.BatchHardMiner(distance=theirs())(x, labels, ref_emb=ref, ref_labels=ref_labels)
        for g, w in zip(got, want):
            assert g.dtype == torch.int64 and torch.equal(g, w), case
        for kind in ("all", "hard", "semihard", "easy"):
            for margin in (-0.1, 0.0, 0.3):
                got = miners.TripletMarginMiner(margin, kind, distance=ours())(x, labels, ref, ref_labels)
                want = pml_miners.TripletMarginMiner(margin, kind, distance=theirs())(x, labels, ref, ref_labels)
                for g, w in zip(got, want):  # both in lexicographic order
                    assert g.dtype == torch.int64 and torch.equal(g, w), (case, kind, margin)


@pytest.mark.parametrize("dist_name, ours, theirs", DISTANCES, ids=[d[0] for d in DISTANCES])
def test_losses_on_reference_set_miner_output_match_pml(dist_name, ours, theirs):
    """Miner output with ref_emb fed to the losses with the same ref_emb: values and both gradients."""
    for case, x, labels, ref, ref_labels in _reference_cases(seed=1):
        if len(ref) == 0:
            continue
        for make_miner in (
            lambda lib, d: lib.BatchHardMiner(distance=d),
            lambda lib, d: lib.TripletMarginMiner(0.3, "all", distance=d),
        ):
            results = []
            for lib_miners, lib_losses, dist in ((miners, losses, ours), (pml_miners, pml_losses, theirs)):
                e, r = x.clone().requires_grad_(), ref.clone().requires_grad_()
                indices = make_miner(lib_miners, dist())(e, labels, r, ref_labels)
                out = []
                for loss in (
                    lib_losses.TripletMarginLoss(margin=0.2, distance=dist()),
                    lib_losses.ContrastiveLoss(distance=dist()),
                ):
                    value = loss(e, labels, indices, ref_emb=r, ref_labels=ref_labels)
                    grads = torch.autograd.grad(value, (e, r), allow_unused=True)
                    out.append((value, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (e, r))]))
                results.append(out)
            for (v1, g1), (v2, g2) in zip(*results):
                assert_close(v1, v2, atol=1e-10, rtol=1e-9)
                for a, b in zip(g1, g2):
                    assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_miner_reference_set_needs_labels():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="ref_labels must be given with ref_emb"):
        miners.BatchHardMiner()(x, labels, torch.randn(4, 3))
    with pytest.raises(ValueError, match="ref_labels must be a 1-D tensor of length 4"):
        miners.TripletMarginMiner()(x, labels, torch.randn(4, 3), torch.tensor([0, 1]))


def test_cosine_miner_selects_on_rounded_similarities():
    """PML compares float similarities; near s = 1 distinct cosine distances round to one similarity and tie.

    PML's own test (float32, 2-D points 1° apart) expects those ties, i.e. the
    triplets selected from ``CosineSimilarity()(x)`` with PML's formula.
    """
    angles = torch.arange(16, dtype=torch.float64).deg2rad()
    x = torch.stack([2 * angles.cos(), 0.5 * angles.sin()], dim=1).float()
    distance = distances.CosineSimilarity()
    sim = distance(x)
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        labels = torch.randint(0, 2, (16,), generator=gen)
        a, p, n = torch.where(
            (labels[:, None, None] == labels[None, :, None])
            & (labels[:, None] != labels)[:, None, :]
            & ~torch.eye(16, dtype=torch.bool)[:, :, None]
        )
        m = sim[a, p] - sim[a, n]
        for margin in (-0.05, 0.0, 0.05):
            for kind, keep in (
                ("all", m <= margin),
                ("hard", (m <= margin) & (m <= 0)),
                ("semihard", (m <= margin) & (m > 0)),
                ("easy", m > margin),
            ):
                got = miners.TripletMarginMiner(margin, kind, distance=distance)(x, labels)
                for g, w in zip(got, (a[keep], p[keep], n[keep])):
                    assert torch.equal(g, w), (kind, margin)
