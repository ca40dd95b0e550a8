"""metricops.pml.losses.ArcFaceLoss / CosFaceLoss / ProxyAnchorLoss against pytorch-metric-learning 2.9, and
the metricops.nn modules: values, gradients of embeddings and parameters, reducers, state_dict both ways."""

import math

import pytest
import torch

import metricops
import metricops.nn as mnn
from metricops.pml import distances as mo_distances
from metricops.pml import losses as mo_losses
from metricops.pml import reducers as mo_reducers

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

DT = torch.float64
C, D, B = 9, 5, 24


def _data(seed=0, num_labels=C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=DT), torch.randint(0, num_labels, (B,), generator=g)


def _pair(name, **kw):
    """(ours, theirs) with PML's parameter loaded into ours."""
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw.get("pml", kw.get("both", {})))
    ours = getattr(mo_losses, name)(num_classes=C, embedding_size=D, **kw.get("ours", kw.get("both", {})))
    ours.load_state_dict(theirs.state_dict())
    return ours.to(DT), theirs.to(DT)


def _run(loss, x, labels, **kw):
    x = x.clone().requires_grad_(True)
    value = loss(x, labels, **kw)
    param = next(loss.parameters())
    gx, gp = torch.autograd.grad(value, (x, param))
    return value.detach(), gx, gp


def _assert_same(ours, theirs, x, labels, rtol=1e-9, atol=1e-11, **kw):
    for a, b in zip(_run(ours, x, labels, **kw), _run(theirs, x, labels, **kw)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss"])
@pytest.mark.parametrize("kw", [{}, {"margin": 10.0, "scale": 12.0}])
def test_margin_losses_match_pml(name, kw):
    if name == "CosFaceLoss" and "margin" in kw:
        kw = {"margin": 0.2, "scale": 12.0}
    ours, theirs = _pair(name, both=kw)
    _assert_same(ours, theirs, *_data())


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "ProxyAnchorLoss"])
@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_reducers_match_pml(name, reducer):
    ours, theirs = _pair(
        name, ours={"reducer": getattr(mo_reducers, reducer)()}, pml={"reducer": getattr(pml_reducers, reducer)()}
    )
    _assert_same(ours, theirs, *_data(num_labels=5))


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "ProxyAnchorLoss"])
def test_miner_weights_match_pml(name):
    ours, theirs = _pair(name)
    x, labels = _data(num_labels=4)
    a = torch.tensor([0, 0, 3, 5])
    p = torch.tensor([1, 2, 4, 6])
    n = torch.tensor([7, 8, 9, 7])
    _assert_same(ours, theirs, x, labels, indices_tuple=(a, p, n))


@pytest.mark.parametrize("kw", [{}, {"margin": 0.3, "alpha": 8.0}])
def test_proxy_anchor_matches_pml_with_absent_classes(kw):
    ours, theirs = _pair("ProxyAnchorLoss", both=kw)
    _assert_same(ours, theirs, *_data(num_labels=4))  # classes 4..8 are absent


def test_proxy_anchor_reducer_replaced_after_construction_matches_pml(monkeypatch):
    """PML's default reducer takes the loss with its gradient from the forward's pass (one op call); a reducer
    set after construction is read at the call and reduces the per-class terms, as PML's does."""
    ours, theirs = _pair("ProxyAnchorLoss")
    x, labels = _data(num_labels=6)
    calls = []
    fused = metricops.class_losses.ops.proxy_anchor_loss_and_grad

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.metricops, name)

        def proxy_anchor_loss_and_grad(self, *args):
            calls.append(args)
            return fused(*args)

    monkeypatch.setattr(metricops.class_losses, "ops", Spy())
    _assert_same(ours, theirs, x, labels)
    assert len(calls) == 1
    ours.reducer = mo_reducers.MultipleReducers(
        {"pos_loss": mo_reducers.MeanReducer(), "neg_loss": mo_reducers.DivisorReducer()}
    )
    theirs.reducer = pml_reducers.MultipleReducers(
        {"pos_loss": pml_reducers.MeanReducer(), "neg_loss": pml_reducers.DivisorReducer()}
    )
    _assert_same(ours, theirs, x, labels)
    assert len(calls) == 1


def test_proxy_anchor_with_lp_distance_matches_pml():
    ours, theirs = _pair(
        "ProxyAnchorLoss", ours={"distance": mo_distances.LpDistance()}, pml={"distance": pml_distances.LpDistance()}
    )
    _assert_same(ours, theirs, *_data(num_labels=6))


def test_arcface_refuses_other_distances_and_arguments():
    with pytest.raises(ValueError, match="CosineSimilarity"):
        mo_losses.ArcFaceLoss(C, D, distance=mo_distances.LpDistance())
    with pytest.raises(NotImplementedError, match="embedding_regularizer"):
        mo_losses.CosFaceLoss(C, D, embedding_regularizer=object())
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        mo_losses.ArcFaceLoss(C, D)(torch.randn(3, D), torch.tensor([0, 1, 2]), ref_emb=torch.randn(3, D))
    with pytest.raises(ValueError, match="labels cannot be None"):
        mo_losses.ProxyAnchorLoss(C, D)(torch.randn(3, D))


@pytest.mark.parametrize("name,param,shape", [("ArcFaceLoss", "W", (D, C)), ("ProxyAnchorLoss", "proxies", (C, D))])
def test_state_dict_loads_both_ways_and_init_is_pmls(name, param, shape):
    torch.manual_seed(7)
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D)
    torch.manual_seed(7)
    ours = getattr(mo_losses, name)(num_classes=C, embedding_size=D)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [param]
    assert tuple(ours.state_dict()[param].shape) == shape
    torch.testing.assert_close(ours.state_dict()[param], theirs.state_dict()[param], rtol=0, atol=0)  # same init
    back = getattr(pml_losses, name)(num_classes=C, embedding_size=D)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.state_dict()[param], ours.state_dict()[param], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "ProxyAnchorLoss"])
def test_get_logits_matches_pml(name):
    ours, theirs = _pair(name)
    x, _ = _data()
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x))


def test_parameter_follows_the_embeddings_dtype_as_in_pml():
    loss = mo_losses.ArcFaceLoss(C, D)  # float32 parameter
    x, labels = _data()
    loss(x, labels)
    assert loss.W.dtype == DT


def test_nn_modules_hold_their_parameters():
    x, labels = _data()
    arc = mnn.ArcFaceLoss(C, D, margin=0.3, scale=16.0).to(DT)
    cos = mnn.CosFaceLoss(C, D).to(DT)
    proxy = mnn.ProxyAnchorLoss(C, D).to(DT)
    assert [n for n, _ in arc.named_parameters()] == ["weight"] and arc.weight.shape == (C, D)
    assert [n for n, _ in proxy.named_parameters()] == ["proxies"] and proxy.proxies.shape == (C, D)
    torch.testing.assert_close(arc(x, labels), metricops.arcface_loss(x, labels, arc.weight, margin=0.3, scale=16.0))
    torch.testing.assert_close(cos(x, labels), metricops.cosface_loss(x, labels, cos.weight))
    torch.testing.assert_close(proxy(x, labels), metricops.proxy_anchor_loss(x, labels, proxy.proxies))
    arc(x, labels).backward()
    assert arc.weight.grad is not None and arc.weight.grad.abs().sum() > 0
    assert "num_classes=9, embedding_size=5, margin=0.3, scale=16.0" in repr(arc)
    # initialisation as PML's: N(0, 1) weights; proxies kaiming fan_out (std sqrt(2 / C))
    big = mnn.ProxyAnchorLoss(400, 300)
    assert abs(big.proxies.std().item() - math.sqrt(2 / 400)) < 0.05 * math.sqrt(2 / 400)
    assert abs(mnn.ArcFaceLoss(400, 300).weight.std().item() - 1) < 0.05


def test_nn_modules_refuse_bad_arguments():
    with pytest.raises(ValueError, match="margin must be a finite number"):
        mnn.ArcFaceLoss(C, D, margin=math.inf)
    with pytest.raises(ValueError, match="scale must not be NaN"):
        mnn.CosFaceLoss(C, D, scale=math.nan)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        mnn.ProxyAnchorLoss(C, D, alpha=-math.inf)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        mnn.ProxyAnchorLoss(0, D)


# Values PML 2.9 takes that an earlier metricops refused (at the first forward): ArcFace margins outside
# [0°, 180°) (≤ 0: every target takes cos(θ + m); past 180°: none does), scale 0 (the loss is log C) or
# negative, ProxyAnchor's α 0 or negative.
@pytest.mark.parametrize(
    "name,kw",
    [
        ("ArcFaceLoss", {"margin": -10.0, "scale": 8.0}),
        ("ArcFaceLoss", {"margin": 0.0, "scale": 8.0}),
        ("ArcFaceLoss", {"margin": 180.0, "scale": 8.0}),
        ("ArcFaceLoss", {"margin": 200.0, "scale": 8.0}),
        ("ArcFaceLoss", {"margin": 400.0, "scale": 8.0}),
        ("ArcFaceLoss", {"margin": 28.6, "scale": -3.0}),
        ("CosFaceLoss", {"margin": 0.35, "scale": 0.0}),
        ("CosFaceLoss", {"margin": -0.5, "scale": -4.0}),
        ("ProxyAnchorLoss", {"alpha": 0.0}),
        ("ProxyAnchorLoss", {"alpha": -8.0, "margin": -0.2}),
    ],
)
def test_values_pml_takes_match_pml(name, kw):
    ours, theirs = _pair(name, both=kw)
    x, labels = _data(seed=3)
    _assert_same(ours, theirs, x, labels)
    if name == "CosFaceLoss" and kw["scale"] == 0.0:
        assert ours(x, labels).item() == pytest.approx(math.log(C))


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "ProxyAnchorLoss"])
def test_drop_ins_refuse_non_finite_arguments_at_construction(name):
    """Not at the first forward: a training run should not build its loss and fail later. ArcFace's message
    names the value as given (degrees)."""
    second = "alpha" if name == "ProxyAnchorLoss" else "scale"
    for arg in ("margin", second):
        for bad in (math.inf, math.nan, "x"):
            with pytest.raises((ValueError, TypeError), match=arg):
                getattr(mo_losses, name)(C, D, **{arg: bad})
    with pytest.raises(ValueError, match="got inf"):
        mo_losses.ArcFaceLoss(C, D, margin=math.inf)


def test_proxy_anchor_log1p_is_exact_above_softplus_threshold():
    """log(1 + Σ e^z) with Σ e^z > e^20: F.softplus returns its argument there (off by up to e^-20 ≈ 2e-9), PML's
    logsumexp(add_one=True) does not. Rows near their proxies at α = 32 push the negatives' sum past e^20; the
    reference and the native loss must both equal PML to float64 precision."""
    from metricops import reference

    g = torch.Generator().manual_seed(3)
    proxies = torch.randn(C, D, generator=g, dtype=DT)
    labels = torch.arange(B) % C
    x = proxies[(labels + 1) % C] + 0.01 * torch.randn(B, D, generator=g, dtype=DT)  # each row at another proxy
    pml = pml_losses.ProxyAnchorLoss(num_classes=C, embedding_size=D).to(DT)
    with torch.no_grad():
        pml.proxies.copy_(proxies)
    want = pml(x, labels)
    z = 32.0 * (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(proxies, dim=1).T + 0.1)
    assert torch.logsumexp(z, 0).max() > 21  # the regime where the thresholded softplus is off
    for got in (reference.proxy_anchor_loss(x, labels, proxies), metricops.proxy_anchor_loss(x, labels, proxies)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
