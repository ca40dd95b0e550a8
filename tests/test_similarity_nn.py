"""metricops.nn's similarity-loss modules: the functionals' values, attributes read at each call, InfoNCELoss's
learnable temperature (CLIP's logit scale) and MarginRankingLoss."""

import math

import pytest
import torch
import torch.nn.functional as F

import metricops
import metricops.nn as mnn
from metricops import reference as R

# module, functional, constructor kwargs differing from the defaults, an attribute to reassign
MODULES = [
    (mnn.SupConLoss, "supcon_loss", {"temperature": 0.2, "reduction": "mean"}, ("temperature", 0.5)),
    (mnn.NTXentLoss, "ntxent_loss", {"temperature": 0.3, "reduction": "sum"}, ("temperature", 0.1)),
    (mnn.MultiSimilarityLoss, "multi_similarity_loss", {"alpha": 1.0, "mining_epsilon": 0.2}, ("base", 0.1)),
    (mnn.CircleLoss, "circle_loss", {"m": 0.3, "gamma": 30.0}, ("gamma", 10.0)),
    (mnn.GeneralizedLiftedStructureLoss, "generalized_lifted_structure_loss", {"neg_margin": 1.2}, ("pos_margin", 0.2)),
    (mnn.LiftedStructureLoss, "lifted_structure_loss", {"neg_margin": 0.8}, ("neg_margin", 1.3)),
]


@pytest.mark.parametrize("cls, op, kwargs, change", MODULES, ids=[m[0].__name__ for m in MODULES])
def test_module_equals_functional_and_reads_attributes(cls, op, kwargs, change):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    fn = getattr(R, op)
    default = cls()
    torch.testing.assert_close(default(emb, labels), fn(emb, labels))
    module = cls(**kwargs)
    torch.testing.assert_close(module(emb, labels), fn(emb, labels, **kwargs))
    name, value = change
    before = module(emb, labels)
    setattr(module, name, value)
    after = module(emb, labels)
    torch.testing.assert_close(after, fn(emb, labels, **{**kwargs, name: value}))
    assert not torch.allclose(before, after)
    assert f"{name}={value}" in repr(module)
    assert module.state_dict() == {}
    module.reduction = "none"
    assert module(emb, labels).shape == (16,)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mnn.SupConLoss(temperature=0.0), "temperature"),
        (lambda: mnn.NTXentLoss(temperature=float("nan")), "temperature"),
        (lambda: mnn.MultiSimilarityLoss(beta=-1.0), "beta"),
        (lambda: mnn.CircleLoss(gamma=0), "gamma"),
        (lambda: mnn.CircleLoss(reduction="avg"), "reduction"),
        (lambda: mnn.LiftedStructureLoss(memory="disk"), "memory"),
        (lambda: mnn.InfoNCELoss(temperature=-0.1), "temperature"),
        (lambda: mnn.InfoNCELoss(symmetric=1), "symmetric"),
        # what forward would refuse: a bool tensor, and a τ whose float32 logit scale gives τ = 0 or inf
        (lambda: mnn.InfoNCELoss(temperature=torch.tensor(True)), "temperature"),
        (lambda: mnn.InfoNCELoss(temperature=1e-50, learn_temperature=True), "temperature must be within float32"),
        (lambda: mnn.InfoNCELoss(temperature=1e50, learn_temperature=True), "temperature must be within float32"),
        (lambda: mnn.InfoNCELoss(temperature=1e-40, learn_temperature=True), "temperature must be within float32"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def _clip(q, k, tau):
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    target = torch.arange(q.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_info_nce_module():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 4, dtype=torch.float64, generator=g), torch.randn(6, 4, dtype=torch.float64, generator=g)
    module = mnn.InfoNCELoss()
    torch.testing.assert_close(module(q, k), R.info_nce_loss(q, k, temperature=0.05))
    assert list(module.parameters()) == [] and module.state_dict() == {}
    module.symmetric = True
    module.temperature = 0.3
    torch.testing.assert_close(module(q, k), _clip(q, k, 0.3))
    extra = torch.randn(9, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(
        mnn.InfoNCELoss(temperature=0.2, normalize=False)(q, extra),
        F.cross_entropy(q @ extra.T / 0.2, torch.arange(6)),
    )


def test_info_nce_learned_temperature_is_clips_logit_scale():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 5, dtype=torch.float64, generator=g)
    k = torch.randn(8, 5, dtype=torch.float64, generator=g)
    module = mnn.InfoNCELoss(temperature=0.07, symmetric=True, learn_temperature=True).double()
    assert [n for n, _ in module.named_parameters()] == ["logit_scale"]
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert module.temperature == pytest.approx(0.07)
    loss = module(q, k)
    (grad,) = torch.autograd.grad(loss, module.logit_scale)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    expected = _clip(q, k, torch.exp(-scale))
    (expected_grad,) = torch.autograd.grad(expected, scale)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad.abs().item() > 1e-6
    # an update of the parameter changes the temperature the next call uses; the setter writes the parameter
    module.logit_scale.data.add_(0.1)
    assert module.temperature == pytest.approx(math.exp(-(math.log(1 / 0.07) + 0.1)))
    torch.testing.assert_close(module(q, k), _clip(q, k, module.temperature))
    module.temperature = 0.5
    assert module.logit_scale.item() == pytest.approx(math.log(2))
    state = module.state_dict()
    restored = mnn.InfoNCELoss(learn_temperature=True).double()
    restored.load_state_dict(state)
    assert restored.temperature == pytest.approx(0.5)


def test_margin_ranking_loss_is_torchs():
    assert mnn.MarginRankingLoss is torch.nn.MarginRankingLoss
    x1, x2, y = torch.randn(5), torch.randn(5), torch.tensor([1.0, -1, 1, -1, 1])
    torch.testing.assert_close(mnn.MarginRankingLoss(margin=0.2)(x1, x2, y), F.margin_ranking_loss(x1, x2, y, 0.2))


def test_info_nce_takes_an_integer_temperature_tensor_as_a_number():
    """As every other loss's numbers (API.md): an integer 0-dim tensor is the number it holds (refused before,
    while supcon_loss took it)."""
    q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = metricops.info_nce_loss(q, k, temperature=2.0)
    torch.testing.assert_close(metricops.info_nce_loss(q, k, temperature=torch.tensor(2)), expected, rtol=0, atol=0)
    torch.testing.assert_close(mnn.InfoNCELoss(temperature=torch.tensor(2))(q, k), expected, rtol=0, atol=0)
