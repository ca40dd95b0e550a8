"""With torch.use_deterministic_algorithms(True), every op run twice
on CPU gives bitwise-identical outputs and gradients (the flag is restored after)."""

import pytest
import torch

import metricops


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _x():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(96, 24, generator=g)


LABELS = torch.arange(96) % 7
LABELS288 = torch.arange(288) % 37
WEIGHT = torch.randn(7, 24, generator=torch.Generator().manual_seed(5))


def _rows288(x):
    """288 rows made from the 96 of x (so its gradient flows back), none equal."""
    return torch.cat([x, 0.5 * x.flip(0), x.roll(3, 1)])


CASES = {
    "pairwise_distance": lambda x: metricops.pairwise_distance(x),
    "pairwise_distance_xy_cosine": lambda x: metricops.pairwise_distance(x, x[:40] * 2, metric="cosine"),
    "pairwise_distance_normalize": lambda x: metricops.pairwise_distance(x, metric="sqeuclidean", normalize=True),
    "batch_hard": lambda x: metricops.batch_hard_triplet_loss(x, LABELS),
    "batch_hard_streaming": lambda x: metricops.batch_hard_triplet_loss(x, LABELS, memory="streaming", soft=True),
    "semihard": lambda x: metricops.semihard_triplet_loss(x, LABELS, metric="cosine"),
    "batch_all": lambda x: metricops.batch_all_triplet_loss(x, LABELS, metric="sqeuclidean"),
    "semihard_streaming": lambda x: metricops.semihard_triplet_loss(x, LABELS, memory="streaming", normalize=True),
    "batch_all_streaming": lambda x: metricops.batch_all_triplet_loss(x, LABELS, memory="streaming"),
    "contrastive": lambda x: metricops.contrastive_loss(x, LABELS, squared=True),
    "contrastive_none": lambda x: metricops.contrastive_loss(x, LABELS, reduction="none"),
    "pair_contrastive": lambda x: metricops.pair_contrastive_loss(x, x.flip(0), LABELS % 2),
    "triplet_margin": lambda x: metricops.triplet_margin_loss(x, x.roll(1, 0), x.roll(2, 0), p=3.0, swap=True),
    "triplet_statistics": lambda x: torch.stack(list(metricops.triplet_statistics(x, LABELS).values())),
    "mine_triplets": lambda x: torch.stack(metricops.mine_triplets(x, LABELS, strategy="semihard")),
    "knn": lambda x: metricops.knn(x, k=9, _chunk_size=17),
    "knn_db": lambda x: metricops.knn(x[:10], x, k=5, metric="cosine"),
    # the log-sum-exp engine on 288 rows: three strips of its 128-row CPU tiles, with row and column passes
    "supcon": lambda x: metricops.supcon_loss(_rows288(x), LABELS288),
    "supcon_streaming": lambda x: metricops.supcon_loss(_rows288(x), LABELS288, memory="streaming"),
    "ntxent": lambda x: metricops.ntxent_loss(_rows288(x), LABELS288),
    "multi_similarity_mined": lambda x: metricops.multi_similarity_loss(_rows288(x), LABELS288, mining_epsilon=0.1),
    "circle_none": lambda x: metricops.circle_loss(_rows288(x), LABELS288, reduction="none"),
    "generalized_lifted": lambda x: metricops.generalized_lifted_structure_loss(_rows288(x), LABELS288),
    "lifted_structure": lambda x: metricops.lifted_structure_loss(_rows288(x), LABELS288),
    "info_nce_symmetric": lambda x: metricops.info_nce_loss(_rows288(x), _rows288(x).roll(5, 1), symmetric=True),
    # class-parameter losses (the gradient checked is the embeddings')
    "arcface": lambda x: metricops.arcface_loss(x, LABELS, WEIGHT),
    "cosface_none": lambda x: metricops.cosface_loss(x, LABELS, WEIGHT, reduction="none"),
    "proxy_anchor": lambda x: metricops.proxy_anchor_loss(x, LABELS, WEIGHT),
}


def _run(fn):
    x = _x().requires_grad_()
    out = fn(x)
    outs = out if isinstance(out, tuple) else (out,)
    grad = None
    if outs[0].requires_grad:
        w = torch.linspace(0.5, 1.5, outs[0].numel()).reshape(outs[0].shape)
        (grad,) = torch.autograd.grad((outs[0] * w).sum(), x)
    return [o.detach().clone() for o in outs], grad


@pytest.mark.parametrize("name", list(CASES))
def test_bitwise_identical_runs(name, deterministic):
    assert torch.are_deterministic_algorithms_enabled()
    (o1, g1), (o2, g2) = _run(CASES[name]), _run(CASES[name])
    for a, b in zip(o1, o2):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
            b.view(-1).view(torch.uint8) if b.is_floating_point() else b,
        ), name
    if g1 is not None:
        assert torch.equal(g1.view(torch.uint8), g2.view(torch.uint8)), name


def test_flag_restored():
    # Runs after the parametrized cases in file order: the fixture put the flag back.
    assert not torch.are_deterministic_algorithms_enabled()
