"""metricops.reference's ArcFace, CosFace and ProxyAnchor against pytorch-metric-learning 2.9 and by hand.

PML's conventions differ from ours: ArcFaceLoss's margin is in degrees and its W is (D, C); the reference
takes weight (C, D) and the margin in radians. Everything here runs in float64.
"""

import math

import pytest
import torch

from metricops import reference

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

DT = torch.float64


def _inputs(B, C, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=DT)
    labels = torch.randint(0, C, (B,), generator=g)
    return x, labels


def _grads(loss_fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize(
    "margin,scale",
    # PML takes any margin and scale: ArcFace past π (no target inside θ ≤ π − m) and negative (all inside)
    [(None, None), (0.2, 8.0), (1.3, 30.0), (-0.3, 8.0), (3.5, 8.0), (2.0, -4.0), (0.4, 0.0)],
)
def test_margin_softmax_matches_pml(kind, margin, scale):
    B, C, D = 24, 7, 5
    x, labels = _inputs(B, C, D)
    torch.manual_seed(1)
    kwargs = {}
    if margin is not None:
        # PML's ArcFace margin is in degrees, ours in radians.
        kwargs = {"margin": math.degrees(margin) if kind == "arcface" else margin, "scale": scale}
    cls = pml_losses.ArcFaceLoss if kind == "arcface" else pml_losses.CosFaceLoss
    pml = cls(num_classes=C, embedding_size=D, **kwargs).to(DT)
    W = pml.W.detach().clone()  # (D, C)
    assert W.shape == (D, C)

    def theirs(x, W):
        del pml.W  # PML reads its parameter: put the leaf in its place
        pml.W = W
        return pml(x, labels)

    ref_fn = reference.arcface_loss if kind == "arcface" else reference.cosface_loss
    ours_kwargs = {"margin": margin, "scale": scale}
    if margin is None:  # PML's defaults: ArcFace 28.6° (not quite our 0.5 rad), CosFace 0.35; scale 64
        ours_kwargs = {"margin": math.radians(28.6) if kind == "arcface" else 0.35, "scale": 64.0}

    def ours(x, W):
        return ref_fn(x, labels, W.T, **ours_kwargs)  # weight (C, D)

    loss_p, (gx_p, gW_p) = _grads(theirs, x, W)
    loss_r, (gx_r, gW_r) = _grads(ours, x, W)
    torch.testing.assert_close(loss_r, loss_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_r, gx_p, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gW_r, gW_p, rtol=1e-8, atol=1e-10)


def test_arcface_defaults_are_pmls():
    # PML's default margin 28.6° is 0.4992 rad; ours is 0.5 rad, and its scale 64 is ours.
    import inspect

    sig = inspect.signature(reference.arcface_loss)
    assert sig.parameters["margin"].default == 0.5 and sig.parameters["scale"].default == 64.0
    assert abs(math.radians(28.6) - 0.5) < 2e-3


@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.5, 4.0), (0.1, 0.0), (-0.2, -6.0)])
def test_proxy_anchor_matches_pml(margin, alpha):
    B, C, D = 30, 12, 6  # labels in [0, 6): half of the classes are absent from the batch
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=DT)
    labels = torch.randint(0, 6, (B,), generator=g)
    torch.manual_seed(2)
    pml = pml_losses.ProxyAnchorLoss(C, D, margin=margin, alpha=alpha).to(DT)
    P = pml.proxies.detach().clone()

    def theirs(x, P):
        del pml.proxies
        pml.proxies = P
        return pml(x, labels)

    loss_p, (gx_p, gP_p) = _grads(theirs, x, P)
    loss_r, (gx_r, gP_r) = _grads(
        lambda x, P: reference.proxy_anchor_loss(x, labels, P, margin=margin, alpha=alpha), x, P
    )
    torch.testing.assert_close(loss_r, loss_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_r, gx_p, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gP_r, gP_p, rtol=1e-8, atol=1e-10)
    if alpha != 0:  # (α = 0: every exponent is 0, no gradient at all)
        assert gP_r[6:].abs().sum() > 0  # absent classes still get the negative term's gradient


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


@pytest.mark.parametrize("theta_deg", [40.0, 170.0])  # below and above π − m (m = 0.5 rad = 28.6°: 151.4°)
def test_arcface_by_hand_both_branches(theta_deg):
    m, s = 0.5, 2.0
    x = torch.tensor([[3.0, 0.0]], dtype=DT)  # norm 3: normalized away
    weight = torch.tensor([_unit(theta_deg), [0.5, 0.0], _unit(90.0)], dtype=DT)  # class 0: at θ; 1: parallel to x
    labels = torch.tensor([0])
    theta = math.radians(theta_deg)
    target = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
    if theta_deg == 170.0:
        assert theta > math.pi - m
    others = [1.0, 0.0]  # cos to classes 1 and 2
    expected = math.log(math.exp(s * target) + sum(math.exp(s * c) for c in others)) - s * target
    got = reference.arcface_loss(x, labels, weight, margin=m, scale=s)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got_cos = reference.cosface_loss(x, labels, weight, margin=0.35, scale=s)
    t = math.cos(theta) - 0.35
    assert got_cos.item() == pytest.approx(
        math.log(math.exp(s * t) + sum(math.exp(s * c) for c in others)) - s * t, rel=1e-12
    )


def test_arcface_parallel_target_has_a_finite_gradient():
    # sin θ = 0 at the target: PML's acos gives an infinite slope (NaN gradient); the reference floors sin θ.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=DT, requires_grad=True)
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=DT, requires_grad=True)
    loss = reference.arcface_loss(x, torch.tensor([0, 1]), weight, margin=0.5, scale=4.0)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    # the value is cos(0 + m) for both targets: exactly as without the floor
    c = [math.cos(0.5), math.cos(0.5)]
    others = [[0.0, math.sqrt(0.5)], [0.0, math.sqrt(0.5)]]
    expected = sum(math.log(math.exp(4 * c[i]) + sum(math.exp(4 * o) for o in others[i])) - 4 * c[i] for i in range(2))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-12)


def test_proxy_anchor_by_hand_with_an_absent_class():
    delta, alpha = 0.1, 3.0
    x = torch.tensor([_unit(0.0), _unit(60.0), _unit(120.0)], dtype=DT)
    proxies = torch.tensor([_unit(0.0), _unit(90.0), _unit(180.0)], dtype=DT) * 2.0
    labels = torch.tensor([0, 0, 1])  # class 2 is absent
    S = [[math.cos(math.radians(a - p)) for p in (0.0, 90.0, 180.0)] for a in (0.0, 60.0, 120.0)]
    pos = [math.log(1 + sum(math.exp(-alpha * (S[i][c] - delta)) for i in range(3) if labels[i] == c)) for c in (0, 1)]
    neg = [math.log(1 + sum(math.exp(alpha * (S[i][c] + delta)) for i in range(3) if labels[i] != c)) for c in range(3)]
    expected = sum(pos) / 2 + sum(neg) / 3
    got = reference.proxy_anchor_loss(x, labels, proxies, margin=delta, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    p, n, present = reference.proxy_anchor_terms(x, labels, proxies, margin=delta, alpha=alpha)
    assert present.tolist() == [True, True, False] and p[2].item() == 0.0


def test_empty_batch_gives_an_attached_zero():
    x = torch.zeros(0, 4, dtype=DT, requires_grad=True)
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    for fn in (reference.arcface_loss, reference.cosface_loss, reference.proxy_anchor_loss):
        loss = fn(x, labels, w)
        assert loss.item() == 0.0
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert gx.shape == x.shape and (gw == 0).all()
