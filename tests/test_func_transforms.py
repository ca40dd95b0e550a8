"""Every differentiable public function under torch.func and forward-mode AD.

Reverse mode (torch.func.grad, vjp, jacrev, and vmap around or inside them)
equals torch.autograd. Forward mode (torch.func.jvp, jacfwd,
torch.autograd.forward_ad) is not implemented: it must raise an error naming
the op, never return zero tangents (as it silently did). Differentiating
twice raises, never returns zeros.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import metricops
from metricops import reference
from metricops._registrations._common import forward_op_names
from common import assert_close
from samples import NOT_DIFFERENTIABLE

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])  # every anchor has a positive and negatives

# name -> (scalar function of three (6, 4) tensors, the metricops op that meets the tangent first)
CASES = {
    "pairwise_distance": (lambda a, b, c: metricops.pairwise_distance(a).sum(), "pairwise_distance"),
    "pairwise_distance_xy": (
        lambda a, b, c: metricops.pairwise_distance(a, b, metric="cosine").pow(2).sum(),
        "pairwise_distance",
    ),
    "pairwise_distance_normalize": (
        lambda a, b, c: metricops.pairwise_distance(a, b, normalize=True).sum(),
        "l2_normalize",
    ),
    "batch_hard": (lambda a, b, c: metricops.batch_hard_triplet_loss(a, LABELS, margin=1.0), "batch_hard_triplet"),
    "batch_hard_normalize_soft_streaming": (
        lambda a, b, c: metricops.batch_hard_triplet_loss(a, LABELS, normalize=True, soft=True, memory="streaming"),
        "batch_hard_triplet",
    ),
    "semihard": (lambda a, b, c: metricops.semihard_triplet_loss(a, LABELS, margin=1.0), "semihard_triplet"),
    "semihard_none": (
        lambda a, b, c: metricops.semihard_triplet_loss(a, LABELS, margin=1.0, reduction="none").pow(2).sum(),
        "semihard_triplet",
    ),
    "semihard_streaming": (
        lambda a, b, c: metricops.semihard_triplet_loss(a, LABELS, margin=1.0, memory="streaming"),
        "semihard_triplet_streaming",
    ),
    "batch_all": (lambda a, b, c: metricops.batch_all_triplet_loss(a, LABELS, margin=1.0), "batch_all_triplet"),
    "batch_all_streaming": (
        lambda a, b, c: metricops.batch_all_triplet_loss(a, LABELS, margin=1.0, memory="streaming"),
        "batch_all_triplet_streaming",
    ),
    "contrastive": (lambda a, b, c: metricops.contrastive_loss(a, LABELS, neg_margin=3.0), "contrastive_loss"),
    "contrastive_none": (
        lambda a, b, c: metricops.contrastive_loss(a, LABELS, neg_margin=3.0, squared=True, reduction="none").sum(),
        "contrastive_loss",
    ),
    "contrastive_streaming": (
        lambda a, b, c: metricops.contrastive_loss(a, LABELS, neg_margin=3.0, memory="streaming"),
        "contrastive_loss_streaming",
    ),
    "pair_contrastive": (
        lambda a, b, c: metricops.pair_contrastive_loss(a, b, LABELS % 2, margin=3.0),
        "pair_contrastive_loss",
    ),
    "triplet_margin": (
        lambda a, b, c: metricops.triplet_margin_loss(a, b, c, margin=2.0, swap=True),
        "triplet_margin_loss",
    ),
    "triplet_margin_squared": (
        lambda a, b, c: metricops.triplet_margin_loss(a, b, c, margin=2.0, squared=True),
        "triplet_margin_loss",
    ),
    # The labelled similarity losses normalize inside their op (lse_stats' normalize=True).
    "supcon": (lambda a, b, c: metricops.supcon_loss(a, LABELS, temperature=0.5), "lse_stats"),
    "ntxent": (lambda a, b, c: metricops.ntxent_loss(a, LABELS, temperature=0.5), "lse_stats"),
    "multi_similarity_mined": (
        lambda a, b, c: metricops.multi_similarity_loss(a, LABELS, beta=10.0, mining_epsilon=0.5),
        "lse_stats",
    ),
    "lifted_structure": (lambda a, b, c: metricops.lifted_structure_loss(a, LABELS, neg_margin=1.5), "lse_stats"),
    "info_nce_symmetric": (
        lambda a, b, c: metricops.info_nce_loss(a, b, temperature=2.0, symmetric=True, normalize=False),
        "lse_stats",
    ),
    # Class-parameter losses (labels < 3: weight/proxies are b's first 3 rows). ArcFace normalizes the embeddings
    # first (l2_normalize meets the tangent), ProxyAnchor inside its op; the direct op calls normalize with torch.
    "arcface": (lambda a, b, c: metricops.arcface_loss(a, LABELS, b[:3], scale=4.0), "l2_normalize"),
    "proxy_anchor": (
        lambda a, b, c: metricops.proxy_anchor_loss(a, LABELS, b[:3], alpha=4.0),
        "proxy_anchor_loss_and_grad",
    ),
    "margin_softmax_op": (
        lambda a, b, c: torch.ops.metricops.margin_softmax_loss(
            torch.nn.functional.normalize(a), LABELS, b[:3], "cosface", 0.3, 4.0, 2
        )[0].sum(),
        "margin_softmax_loss",
    ),
    "proxy_anchor_op": (
        lambda a, b, c: sum(
            t.pow(2).sum()
            for t in torch.ops.metricops.proxy_anchor_loss(
                torch.nn.functional.normalize(a), LABELS, b[:3], 0.1, 4.0, 2
            )[:2]
        ),
        "proxy_anchor_loss",
    ),
}
ARGNUMS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    # vmap runs the ops one sample at a time (no batching rule) and says so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        yield


def _inputs(batch=()):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*batch, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))


def _autograd_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(fn(*leaves), leaves, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads))


def _assert_all_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reverse_mode_transforms_match_autograd(case):
    fn, _ = CASES[case]
    inputs = _inputs()
    expected = _autograd_grads(fn, inputs)
    assert any(e.abs().sum() > 0 for e in expected)  # a case with no gradient would prove nothing
    _assert_all_close(torch.func.grad(fn, argnums=ARGNUMS)(*inputs), expected)
    _assert_all_close(torch.func.jacrev(fn, argnums=ARGNUMS)(*inputs), expected)
    value, vjp_fn = torch.func.vjp(fn, *inputs)
    assert_close(value, fn(*inputs), atol=0, rtol=0)
    _assert_all_close(vjp_fn(torch.tensor(3.0, dtype=torch.float64)), tuple(3 * e for e in expected))


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmap_matches_a_loop(case):
    """vmap over a batch of batches, outside and inside grad: the same numbers as one call per batch."""
    fn, _ = CASES[case]
    stacked = _inputs(batch=(3,))
    per_batch = [tuple(t[i] for t in stacked) for i in range(3)]
    assert_close(torch.vmap(fn)(*stacked), torch.stack([fn(*inputs) for inputs in per_batch]), atol=1e-12, rtol=1e-10)
    expected = [torch.stack(g) for g in zip(*[_autograd_grads(fn, inputs) for inputs in per_batch])]
    _assert_all_close(torch.vmap(torch.func.grad(fn, argnums=ARGNUMS))(*stacked), expected)
    _assert_all_close(torch.func.grad(lambda *t: torch.vmap(fn)(*t).sum(), argnums=ARGNUMS)(*stacked), expected)


def test_vmap_over_a_temperature_tensor():
    """info_nce_loss's temperature tensor batched by vmap (a sweep), outside and inside grad: the reference's
    numbers; the value check reads the wrapped values (a batched tensor has no .item()), so a bad one still raises."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    taus = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")  # functorch's loop over the batch
        for symmetric in (False, True):
            ours = lambda t: metricops.info_nce_loss(q, k, temperature=t, symmetric=symmetric)  # noqa: E731
            theirs = lambda t: reference.info_nce_loss(q, k, temperature=t, symmetric=symmetric)  # noqa: E731
            assert_close(torch.vmap(ours)(taus), torch.vmap(theirs)(taus), atol=1e-12, rtol=1e-10)
            assert_close(
                torch.vmap(torch.func.grad(ours))(taus),
                torch.vmap(torch.func.grad(theirs))(taus),
                atol=1e-12,
                rtol=1e-9,
            )
        with pytest.raises(
            ValueError, match="temperature must be a finite number > 0 whose inverse is finite, got -1.0"
        ):
            torch.vmap(ours)(torch.tensor([0.1, -1.0, 2.0], dtype=torch.float64))


def _jvp(fn, inputs, tangents):
    return torch.func.jvp(fn, inputs, tangents)


def _jacfwd(fn, inputs, tangents):
    return torch.func.jacfwd(fn, argnums=ARGNUMS)(*inputs)


def _forward_ad(fn, inputs, tangents):
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, dt) for t, dt in zip(inputs, tangents)]
        return forward_ad.unpack_dual(fn(*duals)).tangent


@pytest.mark.parametrize("mode", [_jvp, _jacfwd, _forward_ad], ids=["jvp", "jacfwd", "forward_ad"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_mode_raises_naming_the_op(case, mode):
    fn, op = CASES[case]
    inputs = _inputs()
    message = rf"metricops::{op}: forward-mode AD .* is not supported; use reverse mode \(torch\.func\.jacrev"
    with pytest.raises(NotImplementedError, match=message):
        mode(fn, inputs, tuple(torch.ones_like(t) for t in inputs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_derivatives_raise(case):
    """Nested torch.func.grad refuses like autograd's double backward, never gives zeros; hessian is forward-mode."""
    fn, _ = CASES[case]
    inputs = _inputs()
    with pytest.raises(RuntimeError, match="metricops: double backward of .* is not supported"):
        torch.func.grad(lambda *t: torch.func.grad(fn)(*t).pow(2).sum())(*inputs)
    with pytest.raises(NotImplementedError, match=r"metricops::\w+: forward-mode AD"):
        torch.func.hessian(fn)(*inputs)


def test_ops_without_tangents_inside_a_dual_level():
    """Inside forward_ad.dual_level, inputs without a tangent still run forward and backward normally."""
    fn, _ = CASES["contrastive"]
    inputs = _inputs()
    expected_value, expected_grads = fn(*inputs), _autograd_grads(fn, inputs)
    with forward_ad.dual_level():
        forward_ad.make_dual(torch.zeros(3), torch.ones(3))  # a dual tensor elsewhere
        assert_close(fn(*inputs), expected_value, atol=0, rtol=0)
        _assert_all_close(_autograd_grads(fn, inputs), expected_grads)


def test_knn_and_counts_are_constants_under_transforms():
    """knn detaches its inputs and the counts are integers: no tangent or gradient flows, and vmap equals a loop."""
    (x,) = _inputs()[:1]
    tangent = torch.func.jvp(lambda e: metricops.knn(e, k=2)[0], (x,), (torch.ones_like(x),))[1]
    assert torch.equal(tangent, torch.zeros_like(tangent))
    stacked = _inputs(batch=(3,))[0]
    got = torch.vmap(lambda e: metricops.knn(e, k=2)[0])(stacked)
    assert_close(got, torch.stack([metricops.knn(e, k=2)[0] for e in stacked]), atol=0, rtol=0)
    counts = torch.vmap(lambda e: metricops.triplet_statistics(e, LABELS)["hard"])(stacked)
    assert counts.tolist() == [metricops.triplet_statistics(e, LABELS)["hard"].item() for e in stacked]


def test_cases_cover_every_differentiable_op():
    """Each op with an autograd formula (its *_backward op aside) is the first op of some case."""
    differentiable = set(forward_op_names()) - NOT_DIFFERENTIABLE
    assert differentiable == {op for _, op in CASES.values()}


def test_vmap_over_labels_of_class_losses_and_pair_labels():
    """vmap over labels (one label set per batch): the class losses' label range check and pair_contrastive_loss's
    0/1 check read the values, which a batched tensor cannot give ("calling .item()"); they are skipped under
    torch.func transforms (each sample still reaches the kernel's own range check)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.randperm(8, generator=g) % 4 for _ in range(3)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")
        for fn in (
            lambda e, lab: metricops.arcface_loss(e, lab, weight, scale=8.0),
            lambda e, lab: metricops.cosface_loss(e, lab, weight, scale=8.0),
            lambda e, lab: metricops.proxy_anchor_loss(e, lab, weight, alpha=8.0),
            lambda e, lab: metricops.pair_contrastive_loss(e, e.flip(0), lab % 2),
        ):
            expected = torch.stack([fn(x[i], labels[i]) for i in range(3)])
            assert_close(torch.vmap(fn)(x, labels), expected, atol=1e-12, rtol=1e-10)
            grads = torch.vmap(torch.func.grad(fn))(x, labels)
            for i in range(3):
                assert_close(grads[i], torch.func.grad(fn)(x[i], labels[i]), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="labels must be class indices"):  # each sample's kernel check
        torch.vmap(lambda e, lab: metricops.arcface_loss(e, lab, weight))(x, labels + 4)
