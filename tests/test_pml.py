"""metricops.pml against the real pytorch-metric-learning 2.9 on the same inputs."""

import pytest
import torch

from metricops.pml import distances, losses, miners
from common import labelled_batch_with_reference

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402

DISTANCES = {
    "lp": ({}, "LpDistance"),
    "lp_raw": ({"normalize_embeddings": False}, "LpDistance"),
    "lp_power2": ({"power": 2}, "LpDistance"),
    "cosine": ({}, "CosineSimilarity"),
}


def _pair(dist_name):
    kw, cls = DISTANCES[dist_name]
    return getattr(distances, cls)(**kw), getattr(pml_distances, cls)(**kw)


def _run(ours, theirs, emb, labels, **call):
    """Loss values and gradients (embeddings, and ref_emb when given) of both implementations."""
    results = []
    for loss in (ours, theirs):
        e = emb.clone().requires_grad_()
        kw = dict(call)
        leaves = [e]
        if call.get("ref_emb") is not None:
            kw["ref_emb"] = call["ref_emb"].clone().requires_grad_()
            leaves.append(kw["ref_emb"])
        out = loss(e, labels, **kw)
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
        results.append((out, [torch.zeros_like(lf) if g is None else g for g, lf in zip(grads, leaves)]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1.detach().float(), o2.detach().float(), atol=2e-6, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    return o1


def _batches():
    g = torch.Generator().manual_seed(3)
    yield "mixed", torch.randn(20, 8, generator=g), torch.randint(0, 5, (20,), generator=g)
    yield "no_negative", torch.randn(6, 8, generator=g), torch.zeros(6, dtype=torch.int64)
    yield "no_positive", torch.randn(6, 8, generator=g), torch.arange(6)
    yield "single", torch.randn(1, 8, generator=g), torch.tensor([2])
    yield "pair", torch.randn(2, 8, generator=g), torch.tensor([1, 1])


@pytest.mark.parametrize("dist_name", list(DISTANCES))
def test_contrastive_loss(dist_name):
    for pm, nm in ((0, 1), (0.2, 0.7), (1, 0) if dist_name == "cosine" else (0.3, 1.2)):
        for _, emb, labels in _batches():
            ours_d, theirs_d = _pair(dist_name)
            ours = losses.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=ours_d)
            theirs = pml_losses.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=theirs_d)
            _run(ours, theirs, emb, labels)


def test_contrastive_default_distance_and_float64():
    emb = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,))
    _run(losses.ContrastiveLoss(), pml_losses.ContrastiveLoss(), emb, labels)
    _run(losses.ContrastiveLoss(), pml_losses.ContrastiveLoss(), emb.float(), labels.int())


@pytest.mark.parametrize("dist_name", ["lp", "cosine"])
def test_contrastive_indices_tuple_and_ref(dist_name):
    emb, labels, ref, ref_labels = labelled_batch_with_reference(4, 14, 9, 6)
    pairs = (torch.tensor([0, 1, 2, 2]), torch.tensor([3, 4, 5, 5]), torch.tensor([0, 6, 7]), torch.tensor([8, 9, 1]))
    triplets = (torch.tensor([0, 1, 5, 5]), torch.tensor([2, 3, 4, 4]), torch.tensor([7, 8, 9, 10]))
    one_pair = (torch.tensor([0]), torch.tensor([3]), torch.tensor([1]), torch.tensor([2]))  # PML gives 0 here
    for call in (
        dict(indices_tuple=pairs),
        dict(indices_tuple=triplets),
        dict(indices_tuple=one_pair),
        dict(ref_emb=ref, ref_labels=ref_labels),
        dict(
            ref_emb=ref,
            ref_labels=ref_labels,
            indices_tuple=(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4]), torch.tensor([5])),
        ),
    ):
        ours_d, theirs_d = _pair(dist_name)
        _run(
            losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance=ours_d),
            pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance=theirs_d),
            emb,
            labels,
            **call,
        )
    ours_d, theirs_d = _pair(dist_name)
    _run(
        losses.ContrastiveLoss(distance=ours_d),
        pml_losses.ContrastiveLoss(distance=theirs_d),
        emb,
        None,
        indices_tuple=pairs,
    )


@pytest.mark.parametrize("dist_name", list(DISTANCES))
def test_triplet_margin_loss(dist_name):
    for margin, swap, smooth in ((0.05, False, False), (0.3, True, False), (0.1, False, True), (0.2, True, True)):
        for _, emb, labels in _batches():
            ours_d, theirs_d = _pair(dist_name)
            ours = losses.TripletMarginLoss(margin=margin, swap=swap, smooth_loss=smooth, distance=ours_d)
            theirs = pml_losses.TripletMarginLoss(margin=margin, swap=swap, smooth_loss=smooth, distance=theirs_d)
            _run(ours, theirs, emb, labels)


@pytest.mark.parametrize("dist_name", ["lp", "cosine"])
def test_triplet_indices_tuple_and_ref(dist_name):
    emb, labels, ref, ref_labels = labelled_batch_with_reference(5, 12, 8, 6)
    triplets = (torch.tensor([0, 1, 5, 5]), torch.tensor([2, 3, 4, 4]), torch.tensor([7, 6, 1, 0]))
    pairs = (torch.tensor([0, 1, 1]), torch.tensor([3, 4, 5]), torch.tensor([1, 0, 2]), torch.tensor([6, 7, 0]))
    for call in (
        dict(indices_tuple=triplets),
        dict(indices_tuple=pairs),
        dict(indices_tuple=(torch.tensor([], dtype=torch.long),) * 3),
        dict(ref_emb=ref, ref_labels=ref_labels),
        dict(
            ref_emb=ref,
            ref_labels=ref_labels,
            indices_tuple=(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])),
        ),
    ):
        for swap in (False, True):
            ours_d, theirs_d = _pair(dist_name)
            _run(
                losses.TripletMarginLoss(margin=0.2, swap=swap, distance=ours_d),
                pml_losses.TripletMarginLoss(margin=0.2, swap=swap, distance=theirs_d),
                emb,
                labels,
                **call,
            )


def test_distances_match():
    x, y = torch.randn(7, 5), torch.randn(4, 5)
    for name in DISTANCES:
        ours, theirs = _pair(name)
        torch.testing.assert_close(ours(x, y), theirs(x, y), atol=1e-5, rtol=1e-5)
        off = ~torch.eye(7, dtype=torch.bool)
        torch.testing.assert_close(ours(x)[off], theirs(x)[off], atol=1e-5, rtol=1e-5)


def test_distance_helper_methods_match_pml():
    """BaseDistance's public helpers, for code written against PML's distances: each equal to PML's."""
    gen = torch.Generator().manual_seed(4)
    q, r = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    for name in DISTANCES:
        ours, theirs = _pair(name)
        for method, args in [
            ("pairwise_distance", (q, r)),
            ("maybe_normalize", (q,)),
            ("normalize", (q,)),
            ("get_norm", (q,)),
            ("smallest_dist", (q, r)),
            ("largest_dist", (q, r)),
            ("margin", (q, r)),
        ]:
            assert torch.equal(getattr(ours, method)(*args), getattr(theirs, method)(*args)), (name, method)
        for method in ("smallest_dist", "largest_dist"):
            a, b = getattr(ours, method)(q, dim=1), getattr(theirs, method)(q, dim=1)
            assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices), (name, method)


def test_cosine_zero_row_gradient_is_zero_where_pml_is_huge():
    """docs/API.md's deliberate difference: an all-zero row's cosine is 0 with gradient 0 here; PML's
    F.normalize (eps 1e-12) gives it a gradient of ~1e12. The other rows, and the values, agree."""
    x = torch.randn(8, 4, dtype=torch.float64)
    x[3] = 0
    labels = torch.arange(8) % 2
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    distances.CosineSimilarity()(ours).sum().backward()
    pml_distances.CosineSimilarity()(theirs).sum().backward()
    assert torch.equal(ours.grad[3], torch.zeros(4, dtype=torch.float64))
    assert theirs.grad[3].abs().max() > 1e9
    ours.grad, theirs.grad = None, None
    a = losses.TripletMarginLoss(distance=distances.CosineSimilarity())(ours, labels)
    b = pml_losses.TripletMarginLoss(distance=pml_distances.CosineSimilarity())(theirs, labels)
    a.backward(), b.backward()
    torch.testing.assert_close(a, b)
    assert torch.equal(ours.grad[3], torch.zeros(4, dtype=torch.float64))
    rest = torch.arange(8) != 3
    torch.testing.assert_close(ours.grad[rest], theirs.grad[rest])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch", [12, 64])  # the slot path's size, and many positives per anchor (the op path's)
def test_nonfinite_embedding_gives_pmls_value(batch, bad):
    """PML's AvgNonZeroReducer drops NaN terms (NaN > 0 is false), so a NaN or inf coordinate leaves PML's
    ContrastiveLoss and TripletMarginLoss finite; the fused ops' sums would turn NaN. Below the streaming sizes
    the drop-ins take the paths that drop them too."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, dtype=torch.float64, generator=gen)
    labels = torch.arange(batch) % 3
    x[0, 0] = bad
    for name in ("ContrastiveLoss", "TripletMarginLoss"):
        ours, theirs = getattr(losses, name)()(x, labels), getattr(pml_losses, name)()(x, labels)
        assert torch.isfinite(theirs), name
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: losses.ContrastiveLoss(reducer=object()), "reducer"),
        (lambda: losses.ContrastiveLoss(embedding_regularizer=object()), "embedding_regularizer"),
        (lambda: losses.TripletMarginLoss(embedding_reg_weight=2), "embedding_reg_weight"),
        (lambda: losses.TripletMarginLoss(triplets_per_anchor=10), "triplets_per_anchor"),
        (lambda: losses.ContrastiveLoss(distance=pml_distances.LpDistance()), "distance"),
        (lambda: distances.LpDistance(p=1), "p=2"),
        (lambda: distances.LpDistance(power=3), "power"),
        (lambda: distances.CosineSimilarity(normalize_embeddings=False), "normalize_embeddings"),
        (lambda: miners.BatchHardMiner(collect_stats=True), "collect_stats"),
        (lambda: miners.TripletMarginMiner(type_of_triplets="hardest"), "type_of_triplets"),
        (lambda: miners.TripletMarginMiner(distance=pml_distances.LpDistance()), "distance"),
    ],
)
def test_unsupported_arguments(make, match):
    with pytest.raises(NotImplementedError, match=match):
        make()


def test_bad_calls():
    loss = losses.ContrastiveLoss()
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        loss(torch.randn(3, 2))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of length 3"):
        loss(torch.randn(3, 2), torch.tensor([0, 1]))
