"""metricops.reference's similarity losses against pytorch-metric-learning 2.9 itself (float64), torch's
cross-entropy (InfoNCE/CLIP) and hand-computed values. These pin PML's exact semantics for the native ops."""

import math

import pytest
import torch
import torch.nn.functional as F

from metricops import reference as R

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

PML_REDUCER = {
    "mean": pml_reducers.MeanReducer,
    "sum": pml_reducers.SumReducer,
    "mean_nonzero": pml_reducers.AvgNonZeroReducer,
    "none": pml_reducers.DoNothingReducer,
}

# (name, reference, PML class, {our kwarg: value}, {PML kwarg: value})
LOSSES = [
    ("supcon", R.supcon_loss, pml_losses.SupConLoss, {"temperature": 0.3}, {"temperature": 0.3}),
    ("ntxent", R.ntxent_loss, pml_losses.NTXentLoss, {"temperature": 0.2}, {"temperature": 0.2}),
    ("ms", R.multi_similarity_loss, pml_losses.MultiSimilarityLoss, {}, {}),
    (
        "ms_args",
        R.multi_similarity_loss,
        pml_losses.MultiSimilarityLoss,
        {"alpha": 1.5, "beta": 7.0, "base": 0.2},
        {"alpha": 1.5, "beta": 7.0, "base": 0.2},
    ),
    ("circle", R.circle_loss, pml_losses.CircleLoss, {}, {}),
    ("circle_args", R.circle_loss, pml_losses.CircleLoss, {"m": 0.25, "gamma": 16.0}, {"m": 0.25, "gamma": 16.0}),
    ("gls", R.generalized_lifted_structure_loss, pml_losses.GeneralizedLiftedStructureLoss, {}, {}),
    (
        "gls_margins",
        R.generalized_lifted_structure_loss,
        pml_losses.GeneralizedLiftedStructureLoss,
        {"pos_margin": 0.3, "neg_margin": 1.2},
        {"pos_margin": 0.3, "neg_margin": 1.2},
    ),
    ("lifted", R.lifted_structure_loss, pml_losses.LiftedStructureLoss, {}, {}),
    (
        "lifted_margins",
        R.lifted_structure_loss,
        pml_losses.LiftedStructureLoss,
        {"pos_margin": 0.2, "neg_margin": 1.5},
        {"pos_margin": 0.2, "neg_margin": 1.5},
    ),
]
LOSS_IDS = [case[0] for case in LOSSES]

# (B, D, number of classes): random labels leave some anchors without a positive; B classes = all distinct
SHAPES = [(12, 5, 4), (17, 8, 6), (9, 4, 9), (10, 3, 1), (2, 4, 2), (1, 3, 1)]


def _labels(b, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    if n_classes == b:
        return torch.randperm(b, generator=g)
    return torch.randint(0, n_classes, (b,), generator=g)


def _pml_value(loss_module, emb, labels, reduction, indices_tuple=None):
    """PML's loss, with reduction="none" turned into our per-anchor vector (pair terms summed per anchor)."""
    out = loss_module(emb, labels, indices_tuple)
    if reduction != "none":
        return out
    info = out["loss"]
    per_anchor = (emb * 0).sum(dim=1)
    if info["reduction_type"] == "already_reduced":
        return per_anchor + info["losses"]
    if info["reduction_type"] == "element":  # MS and GLS give (B, 1)
        return per_anchor + info["losses"].reshape(-1)
    assert info["reduction_type"] == "pos_pair"
    return per_anchor.index_add(0, info["indices"][0], info["losses"].reshape(-1))  # lifted gives (P, 1)


def _value_and_grad(fn, emb, weight):
    e = emb.clone().requires_grad_()
    out = fn(e)
    (grad,) = torch.autograd.grad((out * weight).sum(), e)
    return out.detach(), grad


def _compare(ours_fn, pml_fn, emb, reduction):
    weight = torch.linspace(0.5, 1.5, emb.shape[0], dtype=emb.dtype) if reduction == "none" else 1.0
    ours, g_ours = _value_and_grad(ours_fn, emb, weight)
    theirs, g_theirs = _value_and_grad(pml_fn, emb, weight)
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-10, rtol=1e-8)
    return ours


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_reference_matches_pml(case, shape, reduction):
    _, ref_fn, pml_cls, ours_kw, pml_kw = case
    b, dim, n_classes = shape
    for seed in range(2):
        emb = torch.randn(b, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
        labels = _labels(b, n_classes, seed)
        pml_loss = pml_cls(reducer=PML_REDUCER[reduction](), **pml_kw)
        _compare(
            lambda e: ref_fn(e, labels, reduction=reduction, **ours_kw),
            lambda e: _pml_value(pml_loss, e, labels, reduction),
            emb,
            reduction,
        )


def test_default_arguments_and_reducers_match_pml():
    """Our defaults (temperature, margins, reducer) are PML's: the bare call equals PML's bare class."""
    emb = torch.randn(14, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    labels = _labels(14, 4, 7)
    pairs = [
        (R.supcon_loss, pml_losses.SupConLoss()),
        (R.ntxent_loss, pml_losses.NTXentLoss()),
        (R.multi_similarity_loss, pml_losses.MultiSimilarityLoss()),
        (R.circle_loss, pml_losses.CircleLoss()),
        (R.generalized_lifted_structure_loss, pml_losses.GeneralizedLiftedStructureLoss()),
        (R.lifted_structure_loss, pml_losses.LiftedStructureLoss()),
    ]
    for ref_fn, pml_loss in pairs:
        _compare(lambda e: ref_fn(e, labels), lambda e: pml_loss(e, labels), emb, "mean")


@pytest.mark.parametrize("epsilon", [0.1, 0.4, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_multi_similarity_mining_matches_pml_miner_composition(shape, epsilon):
    """mining_epsilon=ε equals MultiSimilarityLoss()(x, y, MultiSimilarityMiner(ε)(x, y))."""
    b, dim, n_classes = shape
    for seed in range(3):
        emb = torch.randn(b, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(200 + seed))
        labels = _labels(b, n_classes, seed)
        miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon)
        for reduction in ("mean", "none"):
            pml_loss = pml_losses.MultiSimilarityLoss(reducer=PML_REDUCER[reduction]())
            _compare(
                lambda e: R.multi_similarity_loss(e, labels, mining_epsilon=epsilon, reduction=reduction),
                lambda e: _pml_value(pml_loss, e, labels, reduction, miner(e, labels)),
                emb,
                reduction,
            )


def _unit(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


def test_multi_similarity_mining_single_kept_pair_gives_zero():
    """PML quirk: when the miner keeps ≤ 1 positive and ≤ 1 negative pair, the loss is 0 (not the formula)."""
    # S01 = 0.5, S02 = 0.45, S12 = 0.3, ε = 0.1: only (0, 1) and (0, 2) are kept
    e0 = _unit([1.0, 0.0, 0.0])
    e1 = _unit([0.5, math.sqrt(0.75), 0.0])
    y = (0.3 - 0.5 * 0.45) / math.sqrt(0.75)
    e2 = _unit([0.45, y, math.sqrt(1 - 0.45**2 - y**2)])
    emb = torch.stack([e0, e1, e2])
    labels = torch.tensor([0, 0, 1])
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    assert (len(a1), len(a2)) == (1, 1)
    assert R.multi_similarity_loss(emb, labels, mining_epsilon=0.1).item() == 0.0
    assert pml_losses.MultiSimilarityLoss()(emb, labels, (a1, p, a2, n)).item() == 0.0
    assert R.multi_similarity_loss(emb, labels).item() > 0.1


def test_whole_batch_zero_rules():
    """A single-class batch: SupCon, NT-Xent and lifted structure give 0 (PML's `pos and neg exist` check), while
    GeneralizedLifted and MS give their positive terms; an all-distinct batch still gives MS/GLS negative terms."""
    emb = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    same = torch.zeros(6, dtype=torch.long)
    for fn in (R.supcon_loss, R.ntxent_loss, R.lifted_structure_loss):
        e = emb.clone().requires_grad_()
        out = fn(e, same)
        assert out.item() == 0.0 and out.requires_grad
        (g,) = torch.autograd.grad(out, e)
        assert g.abs().max().item() == 0.0
    assert R.generalized_lifted_structure_loss(emb, same).item() > 0
    assert R.multi_similarity_loss(emb, same).item() > 0
    distinct = torch.arange(6)
    assert R.multi_similarity_loss(emb, distinct).item() > 0
    assert R.generalized_lifted_structure_loss(emb, distinct).item() > 0
    assert R.multi_similarity_loss(emb, distinct, mining_epsilon=0.1).item() == 0.0
    for fn in (R.supcon_loss, R.ntxent_loss, R.lifted_structure_loss, R.circle_loss):
        assert fn(emb, distinct).item() == 0.0
    assert R.supcon_loss(emb, distinct, reduction="none").shape == (6,)


# A hand-computable batch: labels [0, 0, 1]; unit vectors e0 = (1, 0), e1 = (0, 1), e2 = (−1, 0):
# S01 = 0, S02 = −1, S12 = 0; normalized euclidean d01 = √2, d02 = 2, d12 = √2. Anchor 2 has no positive.
HAND_EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 0, 1])


def test_hand_computed_supcon_and_ntxent():
    # τ = 1. SupCon anchor 0: log(e^0 + e^−1) − 0; anchor 1: log(e^0 + e^0) − 0; anchor 2: no positive → 0.
    a0, a1 = math.log(1 + math.exp(-1)), math.log(2)
    per_anchor = R.supcon_loss(HAND_EMB, HAND_LABELS, temperature=1.0, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor([a0, a1, 0.0], dtype=torch.float64))
    assert R.supcon_loss(HAND_EMB, HAND_LABELS, temperature=1.0).item() == pytest.approx((a0 + a1) / 2)
    assert R.supcon_loss(HAND_EMB, HAND_LABELS, temperature=1.0, reduction="mean").item() == pytest.approx(
        (a0 + a1) / 3
    )
    # NT-Xent pair (0, 1): −log(e^0 / (e^0 + e^−1)); pair (1, 0): −log(e^0 / (e^0 + e^0)); mean over 2 pairs
    assert R.ntxent_loss(HAND_EMB, HAND_LABELS, temperature=1.0).item() == pytest.approx((a0 + a1) / 2)
    # τ = 0.5 doubles the logits: pair (0, 1): log(1 + e^−2)
    t0, t1 = math.log(1 + math.exp(-2)), math.log(2)
    assert R.ntxent_loss(HAND_EMB, HAND_LABELS, temperature=0.5, reduction="sum").item() == pytest.approx(t0 + t1)


def test_hand_computed_multi_similarity():
    # α = 2, β = 50, base = 0.5
    pos = 0.5 * math.log(1 + math.exp(-2 * (0 - 0.5)))
    a0 = pos + math.log(1 + math.exp(50 * (-1 - 0.5))) / 50
    a1 = pos + math.log(1 + math.exp(50 * (0 - 0.5))) / 50
    a2 = math.log(1 + math.exp(50 * (-1 - 0.5)) + math.exp(50 * (0 - 0.5))) / 50  # no positive: its term is 0
    per_anchor = R.multi_similarity_loss(HAND_EMB, HAND_LABELS, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor([a0, a1, a2], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert R.multi_similarity_loss(HAND_EMB, HAND_LABELS).item() == pytest.approx((a0 + a1 + a2) / 3, rel=1e-12)


def test_hand_computed_lifted_structures():
    r2 = math.sqrt(2)
    # Generalized: anchor 0: relu(√2 + (1 − 2)); anchor 1: relu(√2 + (1 − √2)); anchor 2: no positive → LSE 0
    g = [r2 - 1, 1.0, math.log(math.exp(1 - 2) + math.exp(1 - r2))]
    per_anchor = R.generalized_lifted_structure_loss(HAND_EMB, HAND_LABELS, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor(g, dtype=torch.float64))
    # PML's lifted: pairs (0, 1) and (1, 0) both see negatives (0, 2) and (1, 2)
    pair = max(math.log(math.exp(1 - 2) + math.exp(1 - r2)) + r2, 0) ** 2 / 2
    assert R.lifted_structure_loss(HAND_EMB, HAND_LABELS).item() == pytest.approx(pair)
    torch.testing.assert_close(
        R.lifted_structure_loss(HAND_EMB, HAND_LABELS, reduction="none"),
        torch.tensor([pair, pair, 0.0], dtype=torch.float64),
    )


def test_hand_computed_circle():
    # m = 0.4, γ = 80. Anchor 0: S_p = 0 → a_p = 1.4, term −80·1.4·(0 − 0.6) = 67.2; S_n = −1 → a_n = 0 → 0.
    m, gamma = 0.4, 80.0
    a0 = F.softplus(torch.tensor(gamma * (1 + m) * (1 - m) + 0.0, dtype=torch.float64)).item()
    # Anchor 1: positive as anchor 0; S_n = 0 → a_n = 0.4, term 80·0.4·(0 − 0.4) = −12.8
    a1 = F.softplus(torch.tensor(gamma * (1 + m) * (1 - m) - gamma * m * m, dtype=torch.float64)).item()
    per_anchor = R.circle_loss(HAND_EMB, HAND_LABELS, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor([a0, a1, 0.0], dtype=torch.float64))
    assert R.circle_loss(HAND_EMB, HAND_LABELS).item() == pytest.approx((a0 + a1) / 2)


def _clip_loss(q, k, temperature, symmetric, normalize, reduction):
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0])
    loss = F.cross_entropy(logits, target, reduction=reduction)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target, reduction=reduction)) / 2
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric,n,m", [(False, 7, 7), (False, 5, 9), (True, 8, 8), (False, 1, 3)])
def test_info_nce_matches_cross_entropy(symmetric, n, m, normalize, reduction):
    g = torch.Generator().manual_seed(n * 31 + m)
    q = torch.randn(n, 6, dtype=torch.float64, generator=g)
    k = torch.randn(m, 6, dtype=torch.float64, generator=g)
    for temperature in (0.05, 0.7):
        tau_ours = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
        tau_torch = tau_ours.detach().clone().requires_grad_()
        leaves = []
        outs = []
        for fn, tau in (
            (lambda a, b, t: R.info_nce_loss(a, b, temperature=t, symmetric=symmetric, normalize=normalize,
                                             reduction=reduction), tau_ours),
            (lambda a, b, t: _clip_loss(a, b, t, symmetric, normalize, reduction), tau_torch),
        ):  # fmt: skip
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            out = fn(qq, kk, tau)
            weight = torch.linspace(0.5, 1.5, n, dtype=torch.float64) if reduction == "none" else 1.0
            outs.append(out.detach())
            leaves.append(torch.autograd.grad((out * weight).sum(), (qq, kk, tau)))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-10)
        for a, b in zip(*leaves):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        # a float temperature gives the same value as the tensor one
        float_out = R.info_nce_loss(q, k, temperature=temperature, symmetric=symmetric, normalize=normalize,
                                    reduction=reduction)  # fmt: skip
        torch.testing.assert_close(float_out, outs[0], atol=1e-12, rtol=1e-10)


def test_info_nce_hand_computed_and_errors():
    # q0 = k0 = (1, 0), q1 = k1 = (0, 1), τ = 1: each row's logits are (1, 0) with target the 1 → log(1 + e^−1)
    eye = torch.eye(2, dtype=torch.float64)
    expected = math.log(1 + math.exp(-1))
    assert R.info_nce_loss(eye, eye, temperature=1.0).item() == pytest.approx(expected)
    assert R.info_nce_loss(eye, eye, temperature=1.0, symmetric=True).item() == pytest.approx(expected)
    # an extra key (−1, 0) adds e^−1 to row 0's denominator and e^0 to row 1's
    keys = torch.cat([eye, torch.tensor([[-1.0, 0.0]], dtype=torch.float64)])
    row0 = math.log(1 + math.exp(-1) + math.exp(-2)) - 0
    row1 = math.log(math.exp(-1) + 1 + math.exp(-1))
    torch.testing.assert_close(
        R.info_nce_loss(eye, keys, temperature=1.0, reduction="none"), torch.tensor([row0, row1], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="symmetric"):
        R.info_nce_loss(eye, keys, symmetric=True)
    with pytest.raises(ValueError, match="M >= N"):
        R.info_nce_loss(keys, eye)
    with pytest.raises(ValueError, match="same D"):
        R.info_nce_loss(eye, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        R.supcon_loss(eye, torch.tensor([0, 0]), reduction="avg")
