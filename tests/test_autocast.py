"""The losses under torch.autocast: half-precision activations are upcast to float32 by the ops.

Bound (as documented in metricops/_registrations/autocast.py): with
half-precision embeddings ``x``, the loss under autocast and the float64
reference on the same rounded values ``x.double()`` satisfy
``|loss - ref| <= 1e-4 * (1 + |ref|)``: the upcast is exact, so only float32
arithmetic separates them.
"""

import pytest
import torch

import metricops
from metricops import reference
from common import assert_close, cpu_and_cuda

BOUND = 1e-4


def _split3(x):
    n = x.shape[0] // 3
    return x[:n], x[n : 2 * n], x[2 * n : 3 * n]


# name -> f(module, embeddings, labels): a scalar loss, from metricops or reference.
CASES = {
    "batch_hard": lambda m, x, y: m.batch_hard_triplet_loss(x, y, margin=0.3),
    "batch_hard_soft_cosine": lambda m, x, y: m.batch_hard_triplet_loss(x, y, soft=True, metric="cosine"),
    "semihard": lambda m, x, y: m.semihard_triplet_loss(x, y, margin=0.5),
    "batch_all": lambda m, x, y: m.batch_all_triplet_loss(x, y, margin=0.5, metric="sqeuclidean"),
    "contrastive": lambda m, x, y: m.contrastive_loss(x, y, neg_margin=4.0),
    "pair_contrastive": lambda m, x, y: m.pair_contrastive_loss(
        x[: len(y) // 2], x[len(y) // 2 : 2 * (len(y) // 2)], (y[: len(y) // 2] % 2), margin=4.0
    ),
    "triplet_margin": lambda m, x, y: m.triplet_margin_loss(*_split3(x), margin=1.0),
    "pairwise_distance": lambda m, x, y: m.pairwise_distance(x[:10], x[10:]).sum(),
    # the similarity losses (log-sum-exp engine) and the class-parameter losses
    "supcon": lambda m, x, y: m.supcon_loss(x, y, temperature=0.5),
    "ntxent": lambda m, x, y: m.ntxent_loss(x, y, temperature=0.5),
    "multi_similarity_mined": lambda m, x, y: m.multi_similarity_loss(x, y, mining_epsilon=0.5),
    "circle": lambda m, x, y: m.circle_loss(x, y, gamma=16.0),
    "generalized_lifted": lambda m, x, y: m.generalized_lifted_structure_loss(x, y),
    "lifted_structure": lambda m, x, y: m.lifted_structure_loss(x, y),
    "info_nce_symmetric": lambda m, x, y: m.info_nce_loss(x[:12], x[12:24], symmetric=True, temperature=0.5),
    "arcface": lambda m, x, y: m.arcface_loss(x, y, _class_weight(x), scale=8.0),
    "proxy_anchor": lambda m, x, y: m.proxy_anchor_loss(x, y, _class_weight(x), alpha=8.0),
}


def _class_weight(x):
    """Fixed (4, D) class weights / proxies for the 4 labels of _data, in float32 (float64 for the reference)."""
    w = torch.randn(4, x.shape[1], generator=torch.Generator().manual_seed(9))
    return w.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)


def _autocast_dtypes(device):
    return (torch.bfloat16,) if device == "cpu" else (torch.bfloat16, torch.float16)


def _data(device, b=24, d=8):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(b, d, generator=gen).to(device), torch.randint(0, 4, (b,), generator=gen).to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(CASES))
def test_training_step_under_autocast(device, name):
    for dtype in _autocast_dtypes(device):
        torch.manual_seed(0)
        x, y = _data(device, d=12)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast(device, dtype=dtype):
            emb = model(x)
            assert emb.dtype == dtype  # the loss really receives half-precision activations
            loss = CASES[name](metricops, emb, y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        opt.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(CASES))
def test_half_inputs_match_float64_reference_within_bound(device, name):
    for dtype in _autocast_dtypes(device):
        x, y = _data(device)
        x = x.to(dtype).requires_grad_(True)
        with torch.autocast(device, dtype=dtype):
            out = CASES[name](metricops, x, y)
        x64 = x.detach().double().requires_grad_(True)  # the same rounded values, exactly
        ref = CASES[name](reference, x64, y)
        assert out.dtype == torch.float32
        err = abs(out.item() - ref.item())
        assert err <= BOUND * (1 + abs(ref.item())), (name, dtype, out.item(), ref.item())
        # The gradient reaches the half-precision input in its dtype: float32 math, then one rounding.
        (g,) = torch.autograd.grad(out, x)
        (g_ref,) = torch.autograd.grad(ref, x64)
        assert g.dtype == dtype
        scale = g_ref.abs().max().item()
        assert_close(g.double(), g_ref, atol=1e-2 * scale + 1e-6, rtol=1e-2)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_and_statistics_under_autocast(device):
    x, y = _data(device, b=30)
    x = x.to(torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        dists, idx = metricops.knn(x, k=3)
        stats = metricops.triplet_statistics(x, y, margin=0.3)
        mined = metricops.mine_triplets(x, y, strategy="batch_hard")
    ref_d, ref_i = reference.knn(x.double(), k=3)
    assert dists.dtype == torch.float32
    assert torch.equal(idx.cpu(), ref_i.cpu())
    assert_close(dists.double(), ref_d, atol=BOUND, rtol=BOUND)
    ref_stats = reference.triplet_statistics(x.double(), y, margin=0.3)
    assert {k: int(v) for k, v in stats.items()} == {k: int(v) for k, v in ref_stats.items()}
    ref_mined = reference.mine_triplets(x.double(), y, strategy="batch_hard")
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(mined, ref_mined))


def test_float64_is_left_alone_under_autocast():
    x, y = _data("cpu")
    x = x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = metricops.batch_hard_triplet_loss(x, y, reduction="none")
    assert out.dtype == torch.float64
    assert_close(out, reference.batch_hard_triplet_loss(x, y, reduction="none"))


def test_bfloat16_on_cpu_without_autocast_is_still_refused():
    x, y = _data("cpu")
    with pytest.raises(TypeError, match="embeddings must be float32 or float64"):
        metricops.batch_hard_triplet_loss(x.to(torch.bfloat16), y)
