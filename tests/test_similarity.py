"""The log-sum-exp engine's losses (metricops/similarity.py) against metricops.reference (float64), PML itself,
torch's cross-entropy, and their own properties: tiles, edge cases, gradcheck, opcheck, torch.compile, errors."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import metricops
from metricops import reference as ref
from metricops import similarity as sim
from metricops._registrations import similarity as stat
from metricops._ops import ops
from common import assert_close, cpu_and_cuda

# name -> (metricops function, reference function, keyword arguments (non-default where it matters))
LOSSES = {
    "supcon": (metricops.supcon_loss, ref.supcon_loss, {"temperature": 0.3}),
    "ntxent": (metricops.ntxent_loss, ref.ntxent_loss, {"temperature": 0.2}),
    "multi_similarity": (metricops.multi_similarity_loss, ref.multi_similarity_loss, {"alpha": 2.0, "beta": 10.0}),
    "multi_similarity_mined": (
        metricops.multi_similarity_loss,
        ref.multi_similarity_loss,
        {"beta": 10.0, "mining_epsilon": 0.1},
    ),
    "circle": (metricops.circle_loss, ref.circle_loss, {"gamma": 8.0}),
    "generalized_lifted": (
        metricops.generalized_lifted_structure_loss,
        ref.generalized_lifted_structure_loss,
        {"neg_margin": 1.2},
    ),
    "lifted": (metricops.lifted_structure_loss, ref.lifted_structure_loss, {"neg_margin": 1.2, "pos_margin": 0.1}),
}
REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
# tile shapes forced through similarity._FORCED_TILE: ragged, single entries, wider than tall, one big tile
# (and with the forward's tiles saved for the backward)
TILES = (None, (3, 5), (1, 1), (4, 9), (64, 64), (3, 5, True), (1, 1, True), (64, 64, True))


@pytest.fixture
def force_tile(monkeypatch):
    def force(tile):
        monkeypatch.setattr(sim, "_FORCED_TILE", tile)

    return force


def _labels(kind: str, b: int, device="cpu"):
    g = torch.Generator().manual_seed(b)
    if kind == "classes":  # a few classes, some anchors alone in theirs (no positive)
        labels = torch.randint(0, max(b // 3, 1), (b,), generator=g)
        labels[: min(2, b)] = torch.tensor([100, 101][: min(2, b)])
    elif kind == "distinct":
        labels = torch.arange(b)
    elif kind == "same":
        labels = torch.zeros(b, dtype=torch.int64)
    else:
        raise ValueError(kind)
    return labels.to(device)


def _data(b=17, d=6, dtype=torch.float64, device="cpu", seed=0, duplicate=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    if duplicate and b > 3:
        x[3] = x[1]  # an exact duplicate (same label below in "classes"? not necessarily: both cases are fine)
    return x.to(device).requires_grad_()


def _value_and_grad(fn, x, labels, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, labels, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if grad is None else grad)


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("labels_kind", ["classes", "distinct", "same"])
def test_parity_with_reference(device, name, labels_kind, force_tile):
    fn, ref_fn, kw = LOSSES[name]
    x = _data(device=device, duplicate=labels_kind == "classes")
    labels = _labels(labels_kind, x.shape[0], device)
    for reduction in REDUCTIONS:
        expected, expected_grad = _value_and_grad(ref_fn, x, labels, reduction=reduction, **kw)
        for tile in TILES:
            force_tile(tile)
            for memory in ("auto", "matrix", "streaming"):
                got, grad = _value_and_grad(fn, x, labels, reduction=reduction, memory=memory, **kw)
                assert_close(got, expected)
                assert_close(grad, expected_grad)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("b", [0, 1, 2])
def test_tiny_batches(name, b):
    fn, ref_fn, kw = LOSSES[name]
    x = _data(b=b)
    labels = torch.zeros(b, dtype=torch.int64)
    for reduction in REDUCTIONS:
        got, grad = _value_and_grad(fn, x, labels, reduction=reduction, **kw)
        expected, expected_grad = _value_and_grad(ref_fn, x, labels, reduction=reduction, **kw)
        assert_close(got, expected)
        assert_close(grad, expected_grad)
        loss = fn(x, labels, reduction=reduction, **kw)
        assert loss.requires_grad  # attached to the graph even with no term
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_close_to_float64(name):
    fn, _, kw = LOSSES[name]
    x = _data(b=40, d=16, seed=3)
    labels = _labels("classes", 40)
    v64, g64 = _value_and_grad(fn, x, labels, **kw)
    v32, g32 = _value_and_grad(fn, x.detach().float(), labels, **kw)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-3)


def test_duplicate_rows_have_finite_gradients():
    x = torch.randn(6, 4, dtype=torch.float64)
    x[1] = x[0]
    x[2] = x[0]
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    for name, (fn, ref_fn, kw) in LOSSES.items():
        value, grad = _value_and_grad(fn, x, labels, **kw)
        expected, _ = _value_and_grad(ref_fn, x, labels, **kw)
        assert_close(value, expected)
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_in_nan_out(name):
    fn, _, kw = LOSSES[name]
    x = _data(b=9).detach()
    x[2, 1] = float("nan")
    labels = _labels("classes", 9)
    labels[2] = labels[4]  # the NaN row has a positive
    assert torch.isnan(fn(x, labels, reduction="sum", **kw))


# ------------------------------------------------------------------------------------------------- outside oracles


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_equals_cross_entropy(device, normalize, force_tile):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(11, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()  # 4 extra negatives
    for tile in (None, (2, 3), (1, 1)):
        force_tile(tile)
        for reduction in ("mean", "sum", "none"):
            got = metricops.info_nce_loss(q, k, temperature=0.3, normalize=normalize, reduction=reduction)
            qq, kk = (F.normalize(q), F.normalize(k)) if normalize else (q, k)
            expected = F.cross_entropy(qq @ kk.T / 0.3, torch.arange(7, device=device), reduction=reduction)
            assert_close(got, expected)
            g1 = torch.autograd.grad(got.sum(), (q, k))
            g2 = torch.autograd.grad(expected.sum(), (q, k))
            for a, b in zip(g1, g2):
                assert_close(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_info_nce_symmetric_is_clip(device, force_tile):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(9, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(9, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.arange(9, device=device)
    for tile in (None, (2, 4)):
        force_tile(tile)
        got = metricops.info_nce_loss(q, k, temperature=0.07, symmetric=True)
        logits = F.normalize(q) @ F.normalize(k).T / 0.07
        expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        assert_close(got, expected)
        for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(expected, (q, k))):
            assert_close(a, b)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learnable_temperature_gradient(symmetric):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8 if symmetric else 12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    got = metricops.info_nce_loss(q, k, temperature=tau, symmetric=symmetric)
    expected = ref.info_nce_loss(q, k, temperature=tau, symmetric=symmetric)
    assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (q, k, tau)), torch.autograd.grad(expected, (q, k, tau))):
        assert_close(a, b)
    # CLIP's parametrization: τ = exp(-logit_scale)
    logit_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    got = metricops.info_nce_loss(q, k, temperature=torch.exp(-logit_scale), symmetric=symmetric)
    expected = ref.info_nce_loss(q, k, temperature=torch.exp(-logit_scale), symmetric=symmetric)
    assert_close(torch.autograd.grad(got, logit_scale)[0], torch.autograd.grad(expected, logit_scale)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_temperature_is_inverted_in_the_statistics_dtype(dtype):
    """A float16/bfloat16 τ is a number in that dtype; 1/τ rounded back to it was off by up to 2^-9 (bfloat16
    0.0698: 14.3217 became 14.3125), and the loss and τ's gradient carried that. Now the same τ in float64 gives
    the same loss, and τ's gradient differs only by its final rounding to τ's dtype."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(20, 8, generator=g, dtype=torch.float64)
    k = torch.randn(20, 8, generator=g, dtype=torch.float64)
    low = torch.tensor(0.0698, dtype=dtype, requires_grad=True)
    exact = low.detach().double().requires_grad_()
    got, expected = metricops.info_nce_loss(q, k, temperature=low), metricops.info_nce_loss(q, k, temperature=exact)
    assert got.item() == expected.item()
    got.backward(), expected.backward()
    assert low.grad.dtype == dtype and low.grad == exact.grad.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_pytorch_metric_learning(seed):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (32,), generator=g)
    cases = [
        (metricops.supcon_loss, {}, lambda e, y: pml_losses.SupConLoss()(e, y)),
        (metricops.ntxent_loss, {}, lambda e, y: pml_losses.NTXentLoss()(e, y)),
        (metricops.multi_similarity_loss, {}, lambda e, y: pml_losses.MultiSimilarityLoss()(e, y)),
        (
            metricops.multi_similarity_loss,
            {"mining_epsilon": 0.1},
            lambda e, y: pml_losses.MultiSimilarityLoss()(e, y, pml_miners.MultiSimilarityMiner(0.1)(e, y)),
        ),
        (metricops.circle_loss, {}, lambda e, y: pml_losses.CircleLoss()(e, y)),
        (
            metricops.generalized_lifted_structure_loss,
            {},
            lambda e, y: pml_losses.GeneralizedLiftedStructureLoss()(e, y),
        ),
        (metricops.lifted_structure_loss, {}, lambda e, y: pml_losses.LiftedStructureLoss()(e, y)),
    ]
    for fn, kw, pml in cases:
        got, grad = _value_and_grad(fn, x, labels, **kw)
        expected, expected_grad = _value_and_grad(pml, x, labels)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------------------------------------- autograd, ops


# Circle's gradient holds a_p and a_n constant (the paper, PML): it is not the derivative gradcheck measures;
# its gradient is pinned against the reference and PML above.
@pytest.mark.parametrize("name", [n for n in LOSSES if n != "circle"])
def test_gradcheck(name, force_tile):
    fn, _, kw = LOSSES[name]
    x = _data(b=7, d=3, seed=5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    for tile in (None, (2, 3)):
        force_tile(tile)
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda e: fn(e, labels, reduction=reduction, **kw), (x,))


def test_gradcheck_info_nce():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, t: metricops.info_nce_loss(a, b, temperature=t, symmetric=True), (q, k, tau)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: metricops.info_nce_loss(a, b, normalize=False, reduction="none"), (q, k)
    )


def _opcheck_cases():
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(11, 4, generator=g, dtype=torch.float64), dim=1)
    raw_x = 3 * torch.randn(9, 4, generator=g, dtype=torch.float64)
    raw_y = 0.5 * torch.randn(11, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4])
    scale = torch.tensor(3.0, dtype=torch.float64)
    params2 = torch.stack([torch.full((9,), -0.5, dtype=torch.float64), torch.full((9,), 0.5, dtype=torch.float64)], 1)
    lifted = torch.stack([torch.linspace(-1, 1, 9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)], 1)
    # (x, y, row_keys, col_keys, row_params, scale, policy, args, normalize, col_stats, block_rows, block_cols)
    return [
        (x, None, labels, None, None, scale, "scaled", [], False, False, 0, 0),
        (x, None, labels, None, None, scale, "multi_similarity", [2.0, 10.0, 0.5], False, False, 2, 3),
        (x, None, labels, None, params2, scale, "multi_similarity_mined", [2.0, 10.0, 0.5, 0.1], False, False, 3, 3),
        (x, None, labels, None, None, scale, "circle", [0.4, 8.0], False, False, 0, 0),
        (x, None, labels, None, None, scale, "lifted", [0.0, 1.0], False, False, 4, 5),
        (x, None, labels, None, params2[:, :1].contiguous(), scale, "ntxent_pairs", [], False, False, 0, 0),
        (x, None, labels, None, lifted, scale, "lifted_pairs", [0.1, 0.0], False, False, 2, 2),
        (x, y, torch.arange(9), torch.arange(11), None, scale, "scaled", [], False, True, 4, 3),
        (raw_x, None, labels, None, None, scale, "circle", [0.4, 8.0], True, False, 2, 3),
        (raw_x, raw_y, torch.arange(9), torch.arange(11), None, scale, "scaled", [], True, True, 4, 3),
        # the forward's tiles saved for the backward (save_tiles)
        (raw_x, None, labels, None, None, scale, "lifted", [0.0, 1.0], True, False, 4, 5, True),
        (raw_x, raw_y, torch.arange(9), torch.arange(11), None, scale, "scaled", [], True, True, 2, 3, True),
        (raw_x, raw_y, labels, torch.arange(11) % 5, None, scale, "similarity_range", [], True, True, 4, 3),
    ]


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case):
    args = _opcheck_cases()[case]
    x = args[0].clone().requires_grad_()
    y = None if args[1] is None else args[1].clone().requires_grad_()
    args = (x, y) + args[2:]
    torch.library.opcheck(ops.lse_stats.default, args)
    rows, cols, tiles = ops.lse_stats(*args)
    assert tiles.numel() > 0 if len(args) > 12 and args[12] else tiles.numel() == 0
    grad_rows = torch.randn_like(rows)
    grad_cols = torch.randn_like(cols) if cols.shape[0] else None
    x, y = x.detach(), None if y is None else y.detach()
    backward_args = (grad_rows, grad_cols, x, y) + args[2:9] + (rows.detach(), cols.detach()) + args[10:12]
    torch.library.opcheck(ops.lse_stats_backward.default, backward_args)
    if tiles.numel():
        torch.library.opcheck(ops.lse_stats_backward.default, backward_args + (tiles,))


def _packed_upper_strips(s: torch.Tensor, rows: int, self_mode: bool) -> torch.Tensor:
    """S's tiles as save_tiles keeps them: strip by strip of `rows` rows, from the strip's first row's column on in
    the self mode (the upper triangle), whole rows otherwise (row-major within a strip when it is one chunk)."""
    b = s.shape[0]
    return torch.cat([s[r0 : r0 + rows, (r0 if self_mode else 0) :].reshape(-1) for r0 in range(0, b, rows)])


def _keyed_batch(g, b, m, d, classes, with_y):
    """(x (b, d), y (m, d) or None, row keys, column keys or None): float64 rows with random keys in [0, classes),
    drawn from g in that order."""
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) if with_y else None
    labels = torch.randint(0, classes, (b,), generator=g)
    col_keys = torch.randint(0, classes, (m,), generator=g) if with_y else None
    return x, y, labels, col_keys


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize(
    "policy, args", [("scaled", []), ("multi_similarity", [2.0, 10.0, 0.5]), ("lifted", [0.0, 1.0])]
)
def test_saved_tiles_are_s_and_give_the_recomputed_gradient(policy, args, with_y):
    """save_tiles keeps S's tiles (a distance policy's entries -d²/2; packed as documented, the sizes a ragged last
    strip gives) and the backward that reads them returns exactly the gradient of the one that recomputes them,
    unchanged by a second backward (a retained graph reads the same tiles again)."""
    if policy == "lifted" and with_y:
        pytest.skip("the lifted policy's callers pair rows with rows")
    g = torch.Generator().manual_seed(3)
    x, y, labels, col_keys = _keyed_batch(g, 11, 7, 5, 4, with_y)
    scale = torch.tensor(3.0, dtype=torch.float64)
    weights = torch.randn(11, stat.NUM_STATS, generator=g, dtype=torch.float64)
    weights[:, 4:] = 0
    for block_rows, block_cols in ((4, 0), (3, 2), (128, 0)):
        grads = []
        for save in (False, True):
            a = x.clone().requires_grad_()
            b = None if y is None else y.clone().requires_grad_()
            rows, _, tiles = ops.lse_stats(
                a, b, labels, col_keys, None, scale, policy, args, True, False, block_rows, block_cols, save
            )
            if save:
                s = F.normalize(x, dim=1) @ F.normalize(x if y is None else y, dim=1).T
                if policy == "lifted":  # the distance policies' entries: s + o_i + o_j = -d²/2 (o = -1/2 here)
                    s = s - 1
                if block_cols == 0:  # one chunk per strip: its packed layout is the strips'
                    torch.testing.assert_close(
                        tiles, _packed_upper_strips(s, block_rows, y is None), rtol=0, atol=1e-14
                    )
                strips = range(0, 11, min(block_rows, 11))
                m = s.shape[1]
                assert tiles.numel() == sum(min(block_rows, 11 - r0) * (m - (r0 if y is None else 0)) for r0 in strips)
            total = torch.where(torch.isfinite(rows), rows * weights, 0).sum()
            inputs = [t for t in (a, b) if t is not None]
            first = torch.autograd.grad(total, inputs, retain_graph=True)
            second = torch.autograd.grad(total, inputs)
            for u, v in zip(first, second):
                assert torch.equal(u, v)
            grads.append(first)
        for recomputed, read in zip(*grads):
            assert torch.equal(recomputed, read), (block_rows, block_cols)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("with_y", [False, True])
def test_scaled_policy_sums_dscale_only_when_learnable(with_y, device):
    """ "scaled" leaves the d/dscale columns 0 (their sums cost the CPU epilogues), "scaled_learnable" fills them;
    every other statistic is the same. A scale that requires grad is refused by "scaled": its gradient would
    silently miss the d/dscale part."""
    x, y, labels, col_keys = _keyed_batch(torch.Generator().manual_seed(5), 9, 6, 4, 3, with_y)
    scale = torch.tensor(3.0, dtype=torch.float64)
    x, y, labels, col_keys, scale = (None if t is None else t.to(device) for t in (x, y, labels, col_keys, scale))
    common = (x, y, labels, col_keys, None, scale)
    plain, plain_cols, _ = ops.lse_stats(*common, "scaled", [], True, with_y, 4, 0)
    learnable, learnable_cols, _ = ops.lse_stats(*common, "scaled_learnable", [], True, with_y, 4, 0)
    dscale = [stat.DSCALE_POS, stat.DSCALE_NEG]
    others = [c for c in range(stat.NUM_STATS) if c not in dscale]
    for p_stats, l_stats in ((plain, learnable), (plain_cols, learnable_cols)):
        if device == "cpu":  # the same sums in the same order
            assert torch.equal(p_stats[:, others], l_stats[:, others])
        else:
            torch.testing.assert_close(p_stats[:, others], l_stats[:, others], rtol=1e-13, atol=0)
        assert torch.equal(p_stats[:, dscale], torch.zeros_like(p_stats[:, dscale]))
    # Hand-computed from S, with the logits z = scale·(s - 1) (shifted by -scale: precision near s = 1): LSE_c
    # and lin_pos over z, and d LSE_c/d scale = the softmax-weighted mean of dz/dscale = s - 1
    s = F.normalize(x, dim=1) @ F.normalize(x if y is None else y, dim=1).T
    pos = labels[:, None] == (labels if y is None else col_keys)[None, :]
    if y is None:
        s = s.masked_fill(torch.eye(9, dtype=torch.bool, device=device), float("nan"))
    for c, mask in ((stat.DSCALE_POS, pos), (stat.DSCALE_NEG, ~pos)):
        z = torch.where(mask & ~s.isnan(), 3.0 * (s - 1), float("-inf"))
        w = torch.softmax(z, dim=1).nan_to_num()
        expected = (w * (s - 1).nan_to_num()).sum(1)
        torch.testing.assert_close(learnable[:, c], expected, rtol=1e-12, atol=1e-14)
        lse = stat.LSE_POS if c == stat.DSCALE_POS else stat.LSE_NEG
        torch.testing.assert_close(learnable[:, lse], torch.logsumexp(z, dim=1), rtol=1e-12, atol=1e-14)
    lin_pos = torch.where(pos & ~s.isnan(), 3.0 * (s - 1), 0.0).sum(1)
    torch.testing.assert_close(learnable[:, stat.LIN_POS], lin_pos, rtol=1e-12, atol=1e-14)
    learnable_scale = scale.clone().requires_grad_()
    rows, _, _ = ops.lse_stats(x, y, labels, col_keys, None, learnable_scale, "scaled", [], True, False, 4, 0)
    with pytest.raises(ValueError, match="a scale that requires grad needs policy 'scaled_learnable'"):
        torch.where(torch.isfinite(rows[:, :2]), rows[:, :2], 0).sum().backward()


def test_saved_tiles_bad_input():
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.arange(6) % 3
    scale = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="save_tiles=True needs block_rows > 0"):
        ops.lse_stats(x, None, labels, None, None, scale, "scaled", [], True, False, 0, 0, True)
    rows, cols, tiles = ops.lse_stats(x, None, labels, None, None, scale, "scaled", [], True, False, 4, 0, True)
    common = (x, None, labels, None, None, scale, "scaled", [], True, rows, cols)
    with pytest.raises(ValueError, match=r"tiles must be the forward's saved tiles, shape \(28,\)"):
        ops.lse_stats_backward(torch.ones_like(rows), None, *common, 4, 0, tiles[:-1])
    with pytest.raises(ValueError, match=r"tiles must be the forward's saved tiles"):  # other strips: another size
        ops.lse_stats_backward(torch.ones_like(rows), None, *common, 2, 0, tiles)
    with pytest.raises(ValueError, match="tiles must have dtype"):
        ops.lse_stats_backward(torch.ones_like(rows), None, *common, 4, 0, tiles.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_save_tiles_refused_on_cuda():
    x = torch.randn(6, 3, device="cuda")
    labels = torch.arange(6, device="cuda") % 3
    scale = torch.tensor(1.0, device="cuda")
    with pytest.raises(RuntimeError, match="save_tiles=True is not implemented on CUDA"):
        ops.lse_stats(x, None, labels, None, None, scale, "scaled", [], True, False, 4, 0, True)
    # the public losses never ask for it there, and their values and gradients do not depend on it
    xg = x.clone().requires_grad_()
    metricops.supcon_loss(xg, labels, memory="matrix").backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_compile_fullgraph(name):
    fn, _, kw = LOSSES[name]
    x = _data(b=12, d=5, seed=7)
    labels = _labels("classes", 12)
    compiled = torch.compile(lambda e, y: fn(e, y, **kw), fullgraph=True, backend="aot_eager")
    value, grad = _value_and_grad(compiled, x, labels)
    expected, expected_grad = _value_and_grad(fn, x, labels, **kw)
    assert_close(value, expected)
    assert_close(grad, expected_grad)


def test_compile_fullgraph_info_nce_learnable_temperature():
    q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    f = lambda a, b, t: metricops.info_nce_loss(a, b, temperature=t, symmetric=True)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, tau)
    expected = f(q, k, tau)
    assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (q, k, tau)), torch.autograd.grad(expected, (q, k, tau))):
        assert_close(a, b)


def test_double_backward_is_refused():
    x = _data(b=6)
    loss = metricops.supcon_loss(x, _labels("classes", 6))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(bad):
    x, labels = _data(b=4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="temperature"):
        metricops.supcon_loss(x, labels, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        metricops.ntxent_loss(x, labels, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        metricops.info_nce_loss(x, x, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        metricops.info_nce_loss(x, x, temperature=torch.tensor(bad))


def test_bad_arguments():
    x, labels = _data(b=4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="symmetric"):
        metricops.info_nce_loss(x, torch.randn(6, 6, dtype=torch.float64), symmetric=True)
    with pytest.raises(ValueError, match="keys"):
        metricops.info_nce_loss(x, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="keys"):
        metricops.info_nce_loss(x, torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels"):
        metricops.supcon_loss(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="memory"):
        metricops.circle_loss(x, labels, memory="tiles")
    with pytest.raises(ValueError, match="reduction"):
        metricops.multi_similarity_loss(x, labels, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        metricops.info_nce_loss(x, x, reduction="mean_nonzero")
    with pytest.raises(ValueError, match="alpha"):
        metricops.multi_similarity_loss(x, labels, alpha=0.0)
    with pytest.raises(ValueError, match="gamma"):
        metricops.circle_loss(x, labels, gamma=float("nan"))
    with pytest.raises(ValueError, match="mining_epsilon"):
        metricops.multi_similarity_loss(x, labels, mining_epsilon=float("nan"))
    with pytest.raises(TypeError, match="labels"):
        metricops.ntxent_loss(x, labels.float())
    with pytest.raises(ValueError, match="temperature"):
        metricops.info_nce_loss(x, x, temperature=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="embeddings"):
        metricops.lifted_structure_loss(x.to(torch.int64), labels)


@pytest.mark.parametrize("policy,args", [("scaled", []), ("circle", [0.4, 8.0]), ("lifted", [0.1, 1.0])])
@pytest.mark.parametrize("with_y", [False, True])
def test_normalize_folded_into_tiles_equals_f_normalize_first(policy, args, with_y):
    """normalize=True scales each raw GEMM tile by the rows' inverse norms and applies F.normalize's Jacobian to
    the accumulated gradient: against F.normalize then normalize=False (torch's autograd through F.normalize), with
    rows of every norm: large, small, exactly zero, and below eps (F.normalize's clamp active: no projection)."""
    if policy == "lifted" and with_y:
        pytest.skip("the lifted policy's callers pair rows with rows")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 10, dtype=torch.float64)[:, None]
    if policy != "lifted":
        # (The lifted policy reads d² = 2 - 2s: for unit rows with normalize=False; with normalize=True it adds the
        # offsets of rows F.normalize leaves shorter, test_lifted_losses_with_zero_and_tiny_rows.)
        x[3] = 0.0
        x[7] = torch.tensor([3e-13, -1e-13, 2e-13, 0.0], dtype=torch.float64)  # norm < 1e-12
    y = torch.randn(7, 4, generator=g, dtype=torch.float64) * 5 if with_y else None
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4, 4])
    col_keys = torch.tensor([0, 1, 2, 3, 4, 5, 0]) if with_y else None
    scale = torch.tensor(2.0, dtype=torch.float64)
    for tile in ((0, 0), (3, 4)):
        fused_in = [x.clone().requires_grad_(), None if y is None else y.clone().requires_grad_()]
        plain_in = [x.clone().requires_grad_(), None if y is None else y.clone().requires_grad_()]

        def stats(inputs, normalize):
            a, b = inputs
            if not normalize:
                a, b = F.normalize(a, dim=1), None if b is None else F.normalize(b, dim=1)
            return ops.lse_stats(a, b, labels, col_keys, None, scale, policy, args, normalize, with_y, *tile)

        fused, plain = stats(fused_in, True), stats(plain_in, False)
        for got, want in zip(fused, plain):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.randn(fused[0].shape, generator=g, dtype=torch.float64)
        weights[:, 4:] = 0  # gradients flow through columns 0-3 only

        def picked(st):
            rows = torch.where(torch.isfinite(st[0]), st[0] * weights, 0).sum()
            return rows + (torch.where(torch.isfinite(st[1]), st[1], 0)[:, :4].sum() if with_y else 0)

        grads_fused = torch.autograd.grad(picked(fused), [t for t in fused_in if t is not None])
        grads_plain = torch.autograd.grad(picked(plain), [t for t in plain_in if t is not None])
        for got, want in zip(grads_fused, grads_plain):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert torch.count_nonzero(grads_fused[0][7]) > 0  # the clamped row's gradient is the plain g/eps


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("with_y", [False, True])
def test_similarity_range_is_the_masked_min_and_max(device, with_y):
    """The MS miner's thresholds ("similarity_range"): per row the min similarity over its positives and the max
    over its negatives (the self pair excluded), against torch's masked amin/amax, across tiles, with duplicated
    rows (ties), an anchor with no positive (+inf) and one with no negative (-inf); per column with y. The other
    policies leave both fields at +inf / -inf (they skip that work)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64)
    x[4] = x[2]  # a duplicated row: ties
    labels = torch.tensor([7, 0, 0, 1, 0, 2, 2, 1, 1, 3, 3, 3, 3])  # row 0 alone in its class
    y = torch.randn(6, 5, generator=g, dtype=torch.float64) if with_y else None
    col_keys = torch.tensor([0, 1, 1, 9, 9, 9]) if with_y else None
    if not with_y:
        labels[9:] = 0  # with every other row in class 0 ... rows 1, 2, 4 still have negatives
    x, labels = x.to(device), labels.to(device)
    y = None if y is None else y.to(device)
    col_keys = None if col_keys is None else col_keys.to(device)
    keys = labels if y is None else col_keys
    s = F.normalize(x, dim=1) @ F.normalize(x if y is None else y, dim=1).T
    pos = labels[:, None] == keys[None, :]
    valid = torch.ones_like(pos)
    if y is None:
        valid.fill_diagonal_(False)
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=device)
    want_min = torch.where(pos & valid, s, inf).amin(1)
    want_max = torch.where(~pos & valid, s, -inf).amax(1)
    scale = torch.tensor(1.0, dtype=torch.float64, device=device)
    for tile in ((0, 0), (3, 4), (1, 1)):
        rows, cols, _ = ops.lse_stats(x, y, labels, col_keys, None, scale, "similarity_range", [], True, with_y, *tile)
        torch.testing.assert_close(rows[:, sim.MIN_POS], want_min, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows[:, sim.MAX_NEG], want_max, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows[:, sim.COUNT_POS], (pos & valid).sum(1).double())
        if with_y:
            torch.testing.assert_close(cols[:, sim.MIN_POS], torch.where(pos, s, inf).amin(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cols[:, sim.MAX_NEG], torch.where(~pos, s, -inf).amax(0), rtol=1e-12, atol=1e-12)
    assert (rows[:, sim.LSE_POS] == -inf).all() and (rows[:, sim.LSE_NEG] == -inf).all()  # no exp in this pass
    if not with_y:
        assert want_min[0] == inf and want_max[1:9].isfinite().all()
    rows, _, _ = ops.lse_stats(
        x, y, labels, col_keys, None, scale, "multi_similarity", [2.0, 10.0, 0.5], True, with_y, 0, 0
    )
    assert (rows[:, sim.MIN_POS] == inf).all() and (rows[:, sim.MAX_NEG] == -inf).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_positives_only_policy_against_torch_with_a_nan_row(device):
    """ntxent_pairs gives each positive lin = softplus(m_i - z) and aux = sigmoid(m_i - z), z = scale·(s - 1) (the
    "scaled" policy's logits), and the negatives nothing: on the CPU only the positives are evaluated. Against
    torch, across tiles and in both directions (a NaN row makes its own and its positives' sums NaN, and nobody's
    negative sums)."""
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    x[6] = float("nan")
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4, 4])  # row 7 alone: no positive
    m = torch.randn(10, 1, generator=g, dtype=torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64)
    u = m - scale * (x @ x.T - 1)
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(10, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.float64)
    want_lin = torch.where(pos, F.softplus(u), zero).sum(1)
    want_aux = torch.where(pos, torch.sigmoid(u), zero).sum(1)
    assert want_lin[[5, 6]].isnan().all() and want_lin[[0, 1, 2, 3, 4, 7, 8, 9]].isfinite().all()
    x, labels, m, scale = x.to(device), labels.to(device), m.to(device), scale.to(device)
    for tile in ((0, 0), (3, 4), (1, 1), (4, 3)):
        rows, _, _ = ops.lse_stats(x, None, labels, None, m, scale, "ntxent_pairs", [], False, False, *tile)
        rows = rows.cpu()
        torch.testing.assert_close(rows[:, sim.LIN_POS], want_lin, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(rows[:, sim.AUX_POS], want_aux, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert (rows[:, stat.LIN_NEG] == 0).all() and (rows[:, stat.AUX_NEG] == 0).all()
        torch.testing.assert_close(rows[:, sim.COUNT_POS], pos.sum(1).double())
        torch.testing.assert_close(rows[:, sim.COUNT_NEG], (~pos).sum(1).double() - 1)


@pytest.mark.parametrize("name", ["ntxent", "lifted"])
def test_pair_passes_sparse_and_dense_agree_and_gradcheck(name, force_tile):
    """With few positives per row and no tiles kept, the CPU engine runs the pair pass (ntxent_pairs,
    lifted_pairs) on the positive pairs alone; with the tiles kept it runs the dense tile loop. Both against
    the reference, and gradcheck through the sparse path."""
    fn, ref_fn, kw = LOSSES[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = torch.randperm(40, generator=g) // 2  # 40 positive pairs of 1560 entries: sparse
    want = ref_fn(x, labels, **kw)
    results = []
    for tile in (None, (8, 16, True)):  # sparse; dense with the tiles kept
        force_tile(tile)
        xr = x.clone().requires_grad_()
        out = fn(xr, labels, **kw)
        (grad,) = torch.autograd.grad(out, xr)
        results.append((out.detach(), grad))
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)
    force_tile(None)
    xs = x[:24].clone().requires_grad_()
    torch.autograd.gradcheck(lambda t: fn(t, labels[:24], **kw), (xs,))


def test_native_op_checks_name_the_argument():
    x = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    labels = torch.arange(5)
    scale = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="policy"):
        ops.lse_stats(x, None, labels, None, None, scale, "nope", [], False, False, 0, 0)
    with pytest.raises(ValueError, match="row_keys"):
        ops.lse_stats(x, None, labels[:3], None, None, scale, "scaled", [], False, False, 0, 0)
    with pytest.raises(ValueError, match="y must have the same number of columns"):
        ops.lse_stats(
            x,
            torch.randn(4, 2, dtype=torch.float64),
            labels,
            torch.arange(4),
            None,
            scale,
            "scaled",
            [],
            False,
            False,
            0,
            0,
        )
    with pytest.raises(ValueError, match="row_params"):
        ops.lse_stats(x, None, labels, None, None, scale, "ntxent_pairs", [], False, False, 0, 0)
    with pytest.raises(ValueError, match="args"):
        ops.lse_stats(x, None, labels, None, None, scale, "circle", [0.4], False, False, 0, 0)
    # a loss head: a known name, on the statistics of its own loss's policy; the fake kernel says the same
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = (x, None, labels, None, None, scale)
    for policy, args, head, message in (
        ("scaled", [], "triplet", "head must be one of 'none', 'supcon'"),
        ("circle", [0.4, 80.0], "supcon", "head 'supcon' reads another policy's statistics, got policy 'circle'"),
        ("scaled_learnable", [], "info_nce", "head 'info_nce' reads another policy's statistics"),
    ):
        with pytest.raises(ValueError, match=message):
            ops.lse_stats(*base, policy, args, False, False, 0, 0, False, head)
        rows, cols, _ = ops.lse_stats(*base, policy, args, False, False, 0, 0)
        with pytest.raises(ValueError, match=message):
            ops.lse_stats_backward(rows, None, *base, policy, args, False, rows, cols, 0, 0, None, head)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=message):
            ops.lse_stats(
                *[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in base],
                policy,
                args,
                False,
                False,
                0,
                0,
                False,
                head,
            )


def test_losses_save_tiles_only_when_a_backward_will_read_them(monkeypatch):
    """The labelled losses ask the engine to keep S's tiles on CPU with memory="matrix" and "auto" (small B), and
    only when a gradient will be needed; "streaming" never does (its promise: nothing B×B)."""
    calls = []

    class Recording:
        def __getattr__(self, name):
            op = getattr(ops, name)
            if name != "lse_stats":
                return op

            def record(*args):
                calls.append(args[12] if len(args) > 12 else False)
                return op(*args)

            record.default = record  # the callers take the overload (ops.lse_stats.default)
            return record

    monkeypatch.setattr(sim, "ops", Recording())
    x = torch.randn(12, 4, dtype=torch.float64)
    labels = torch.arange(12) % 4

    def saved(memory, requires_grad=True, grad_mode=True):
        calls.clear()
        with torch.set_grad_enabled(grad_mode):
            metricops.supcon_loss(x.clone().requires_grad_(requires_grad), labels, memory=memory)
        return calls

    assert saved("auto") == [True]
    assert saved("matrix") == [True]
    calls.clear()
    metricops.ntxent_loss(x.clone().requires_grad_(), labels)
    assert calls == [True, False]  # the pair pass reads a few entries per row: no tiles
    assert saved("streaming") == [False]
    assert saved("auto", requires_grad=False) == [False]
    assert saved("auto", grad_mode=False) == [False]


@pytest.mark.parametrize("name", ["generalized_lifted_structure_loss", "lifted_structure_loss"])
def test_lifted_losses_with_zero_and_tiny_rows(name):
    """The lifted losses read d = ||x̂_i - x̂_j|| with x̂ = F.normalize(x): a zero row stays 0 (distance 1 from a unit
    row), a row of norm n < eps (1e-12) becomes x/eps (norm n/eps). Values match the reference with both; the
    gradients too with zero rows; with a tiny row every other row's gradient matches, while the tiny row's own
    leaves out the term through its norm (documented: its gradient is of order 1/eps anyway)."""
    g = torch.Generator().manual_seed(4)
    ours, theirs = getattr(metricops, name), getattr(ref, name)
    # 20 rows in 6 classes: the tiles; 64 rows in pairs: lifted structure's pair pass on the positives alone
    for b_rows, labels in ((20, torch.arange(20) % 6), (64, torch.arange(64) // 2)):
        x = torch.randn(b_rows, 5, generator=g, dtype=torch.float64)
        x[2] = 0
        x[8] = x[14] = 0  # 8 and 14 share a class either way: two zero rows at distance 0
        for memory in ("matrix", "streaming"):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            got, want = ours(a, labels, memory=memory), theirs(b, labels)
            assert_close(got, want, atol=1e-12, rtol=1e-10)
            assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0], atol=1e-6, rtol=1e-10)
    x, labels = x[:20], torch.arange(20) % 6
    x[5] = 3e-14 * x[5]  # a tiny row
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = ours(a, labels), theirs(b, labels)
    assert_close(got, want, atol=1e-12, rtol=1e-10)
    ga, gb = torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0]
    others = torch.arange(20) != 5
    assert_close(ga[others], gb[others], atol=1e-6, rtol=1e-10)


def _fixed_reference_case(case: str, dtype):
    """(our loss, the reference's, inputs) for test_fixed_reference_and_its_fallback."""
    g = torch.Generator().manual_seed(7)
    x = F.normalize(torch.randn(48, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(48) // 4
    noise = 0.05 * torch.randn(48, 6, generator=g, dtype=torch.float64)
    if case == "info_nce_column_falls_back":
        # key 0's negatives (queries 1..) all point away from it: its column sum at τ = 0.02 is e^-95 of the bound
        q = x.clone()
        q[1:] = -x[0] + 0.2 * noise[1:]
        k = q + noise
        k[0] = q[0]
        kw = {"temperature": 0.02, "symmetric": True}
        return (
            lambda a, b: metricops.info_nce_loss(a, b, **kw),
            lambda a, b: ref.info_nce_loss(a, b, **kw),
            (q.to(dtype), k.to(dtype)),
        )
    if case == "supcon_falls_back":
        x[1:4] = -x[0] + noise[1:4]  # anchor 0's positives point away from it: at τ = 0.02 its sum is ~e^-95
    if case in ("ms_falls_back", "ms_mined_falls_back"):
        x[4:] = -x[0] + 6 * noise[4:]  # anchor 0's negatives all at s < -0.5: MS's (β = 50) sum is ~e^-75
    if case == "ms_mined_falls_back":
        x[1:4] = -x[0] + noise[1:4]  # its positives too: the miner keeps those negatives (s + 0.1 > min positive)
    name, kw = ("multi_similarity_loss", {}) if case.startswith("ms") else ("supcon_loss", {"temperature": 0.02})
    if case.startswith("ms_mined"):
        kw = {"mining_epsilon": 0.1}
    ours, theirs = getattr(metricops, name), getattr(ref, name)
    return (lambda a: ours(a, labels, **kw), lambda a: theirs(a, labels, **kw), (x.to(dtype),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "case",
    [
        "supcon_passes",
        "supcon_falls_back",
        "ms_passes",
        "ms_falls_back",
        "ms_mined_passes",
        "ms_mined_falls_back",
        "info_nce_column_falls_back",
    ],
)
@pytest.mark.parametrize("tile", [None, (5, 7), (5, 7, True)])
def test_fixed_reference_and_its_fallback(case, dtype, tile, force_tile):
    """With normalized rows and a bounded φ, the CPU engine takes each exp against its class's upper bound of φ
    (one exp per entry, for its row and its column). A row (or column) whose largest φ lies ~70 below that bound
    would lose its sum to underflow: the engine checks every sum and then redoes the call with running maxima.
    SupCon at τ = 0.02 and MS at β = 50 span 100 (both are tried; the mined MS with each row's thresholds, read
    from the row and from the column); values and gradients against the reference."""
    force_tile(tile)
    ours, theirs, inputs = _fixed_reference_case(case, dtype)
    mine = [t.clone().requires_grad_() for t in inputs]
    want_inputs = [t.double().clone().requires_grad_() for t in inputs]
    got, want = ours(*mine), theirs(*want_inputs)
    got_grads = torch.autograd.grad(got, mine)
    want_grads = torch.autograd.grad(want, want_inputs)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
    assert torch.isfinite(want) and want > 0.1
    assert_close(got.double(), want, **tol)
    for a, b in zip(got_grads, want_grads):
        scale = b.abs().max()
        assert scale > 0
        assert_close(a.double() / scale, b / scale, **tol)


def test_fixed_reference_backward_falls_back_where_a_coefficient_would_overflow():
    """The fixed-reference backward scales each entry's exp(φ - hi) by a = g·exp(hi - LSE): with a row ~60 below
    its bound (still exact in the forward) and a large upstream gradient, a overflows float32 although every
    dL/ds is finite. The backward then takes the running-max path: gradients match the reference."""
    g = torch.Generator().manual_seed(11)
    q = F.normalize(torch.randn(48, 6, generator=g, dtype=torch.float64), dim=1)
    # every key at s = -0.26 from query 0, whose LSE over them is then ~59 below the bound 50 (τ = 0.02); the
    # other queries are their own keys, so every other sum is near its bound (the forward keeps the fixed reference)
    u = q[0]
    r = torch.randn(48, 6, generator=g, dtype=torch.float64)
    v = F.normalize(r - (r @ u)[:, None] * u, dim=1)  # orthogonal to query 0
    k = v * (1 - 0.26**2) ** 0.5 - 0.26 * u
    q = torch.cat([q[:1], k[1:]])
    scale = 1e14  # a = scale·e^59 > float32's max (3.4e38); each dL/ds stays below ~1e16
    mine = [t.float().clone().requires_grad_() for t in (q, k)]
    theirs = [t.clone().requires_grad_() for t in (q, k)]
    got = metricops.info_nce_loss(*mine, temperature=0.02, reduction="sum") * scale
    want = ref.info_nce_loss(*theirs, temperature=0.02, reduction="sum") * scale
    assert_close(got.double(), want, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(got, mine), torch.autograd.grad(want, theirs)):
        assert torch.isfinite(a).all()
        assert_close(a.double() / b.abs().max(), b / b.abs().max(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "loss, memory",
    [(name, memory) for name in ("supcon", "ntxent") for memory in ("matrix", "streaming")]
    + [("info_nce", None), ("info_nce_symmetric", None), ("info_nce_unnormalized", None)],
)
def test_float32_keeps_relative_precision_near_convergence(loss, memory):
    """Near convergence (each anchor's one positive at s ≈ 1 - 1e-6, negatives near s = 0) the per-anchor losses
    are ~1e-7-1e-5 and the logits near 1/τ: computed from unshifted logits, float32's rounding at 1/τ (~1e-6) made
    their error ~50% (the float32 reference's own: 16-75% here). The engine's logits are shifted by -1/τ (ScaledPolicy),
    so float32 keeps its relative precision: against the float64 reference, per anchor, and for the gradient. (τ =
    0.05: the fixed-reference epilogues; normalize=False on unit rows: the running-max ones.)"""
    g = torch.Generator().manual_seed(12)
    centers = F.normalize(torch.randn(64, 128, generator=g, dtype=torch.float64), dim=1)
    x = torch.repeat_interleave(centers, 2, 0) + 1e-4 * torch.randn(128, 128, generator=g, dtype=torch.float64)
    labels = torch.arange(128) // 2
    if loss.startswith("info_nce"):
        q, k = x[0::2], x[1::2]
        if loss == "info_nce_unnormalized":
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        kw = {"symmetric": loss == "info_nce_symmetric", "normalize": loss != "info_nce_unnormalized"}
        ours, theirs = (partial(f.info_nce_loss, temperature=0.05, reduction="none", **kw) for f in (metricops, ref))
        inputs = (q, k)
    else:
        name = f"{loss}_loss"
        ours = partial(getattr(metricops, name), labels=labels, temperature=0.05, reduction="none", memory=memory)
        theirs = partial(getattr(ref, name), labels=labels, temperature=0.05, reduction="none")
        inputs = (x,)
    want_in = [t.clone().requires_grad_() for t in inputs]
    got_in = [t.float().requires_grad_() for t in inputs]
    their32_in = [t.float().requires_grad_() for t in inputs]
    want, got, their32 = theirs(*want_in), ours(*got_in), theirs(*their32_in)
    assert want.max() < 1e-4 and want.min() > 0  # the regime: small, nonzero losses
    # (measured: at most 2e-4 for SupCon and NT-Xent, 2e-3 for InfoNCE, whose loss is ~1e-7 here)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)
    weights = torch.rand(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * weights).sum(), want_in)
    got_grads = torch.autograd.grad((got * weights.float()).sum(), got_in)
    their32_grads = torch.autograd.grad((their32 * weights.float()).sum(), their32_in)
    # The gradient's positive entry is softmax - 1 (~ -1e-6), a difference either way: no worse than the float32
    # reference's error
    for a, b, c in zip(got_grads, want_grads, their32_grads):
        assert (a.double() - b).norm() <= 2 * (c.double() - b).norm()


@pytest.mark.parametrize("memory", ["matrix", "streaming"])
@pytest.mark.parametrize("name", ["generalized_lifted", "lifted"])
def test_float32_lifted_losses_at_a_near_duplicate_pair(name, memory):
    """A negative pair at d ≈ 1e-3 (nearly equal rows) in float32: from the GEMM, d² = -2e carries ~(2D + 8)·ε of
    rounding, so d came out as 0 (the tolerance) with a 30% gradient error; the CPU engine recomputes such entries
    from the rows. Against the float64 reference and PML (whose cdist takes differences at this size)."""
    fn, ref_fn, kw = LOSSES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64)
    x[1] = x[0] + 1e-3 * torch.randn(64, generator=g, dtype=torch.float64) * x[0].norm() / 8
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    d = (F.normalize(x[0], dim=0) - F.normalize(x[1], dim=0)).norm()
    assert 5e-4 < d < 2e-3
    want_in, got_in = x.clone().requires_grad_(), x.float().requires_grad_()
    want, got = ref_fn(want_in, labels, **kw), fn(got_in, labels, memory=memory, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    (want_grad,), (got_grad,) = torch.autograd.grad(want, want_in), torch.autograd.grad(got, got_in)
    assert (got_grad.double() - want_grad).norm() <= 1e-3 * want_grad.norm()
    pml_name = {"generalized_lifted": "GeneralizedLiftedStructureLoss", "lifted": "LiftedStructureLoss"}[name]
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    theirs = getattr(pml_losses, pml_name)(**kw)(x.float(), labels)
    torch.testing.assert_close(got, theirs, rtol=1e-6, atol=0)


def test_info_nce_raw_dot_products_keep_a_zero_gradient_at_zero_loss():
    """normalize=False with logits of 1e4-1e5: each query's positive dominates, the float32 loss is exactly 0 and
    so is torch's gradient. The backward must take exp(φ - LSE) with the forward's rounded φ (no FMA contraction
    there): contracted, exp(±ulp/2) - 1 made an O(1) gradient. Also against float64 at larger losses."""
    g = torch.Generator().manual_seed(0)
    q = 10 * torch.randn(4, 16, generator=g)
    k = q + 0.1 * torch.randn(4, 16, generator=g)
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = metricops.info_nce_loss(a, b, temperature=0.01, normalize=False)
    loss.backward()
    assert loss == 0 and torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    # a nonzero loss at logits of ~1e4: extra negatives (keys past N) next to each query's positive
    q = 10 * torch.randn(8, 32, generator=g, dtype=torch.float64)
    k = torch.cat([q + 0.01 * torch.randn(8, 32, generator=g, dtype=torch.float64), q])
    want_in = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    got_in = [q.float().requires_grad_(), k.float().requires_grad_()]
    torch_in = [q.float().requires_grad_(), k.float().requires_grad_()]
    want = F.cross_entropy(want_in[0] @ want_in[1].T / 0.1, torch.arange(8))
    theirs = F.cross_entropy(torch_in[0] @ torch_in[1].T / 0.1, torch.arange(8))
    got = metricops.info_nce_loss(*got_in, temperature=0.1, normalize=False)
    assert want > 1e-2 and (want_in[0] @ want_in[1].T).max() / 0.1 > 1e4
    want_grads = torch.autograd.grad(want, want_in)
    errors = [
        [(u.double() - w).norm() / w.norm() for u, w in zip(torch.autograd.grad(loss, inputs), want_grads)]
        for loss, inputs in ((got, got_in), (theirs, torch_in))
    ]
    for ours, torch_error in zip(*errors):  # no worse than torch's own float32
        assert ours <= 2 * torch_error + 1e-6, (ours, torch_error)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_row_whose_norm_overflows_gives_nan(name):
    """float32 rows of norm above ~1.8e19: the engine's raw products overflow with them. docs/API.md promises NaN;
    with the row's inverse norm left at 0 it passed for a zero row (the lifted losses put it at distance √2 from a
    parallel row: a finite, wrong loss)."""
    fn, _, kw = LOSSES[name]
    x = torch.tensor([[1e20, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.isnan(fn(x, labels, **kw))


def test_lifted_tiny_rows_near_each_other_get_no_amplified_gradient():
    """Two rows of norm below eps (F.normalize leaves them at norm ||x||/eps), 5e-8 apart once normalized: their
    offsets are held constant in the backward, so an exact small d there would turn the missing term through
    ||x̂||² into a gradient 1/d too large (1e18 here, PML: 5e11). Such pairs keep the Gram form's d, 0 within its
    rounding, as documented: the gradient stays bounded."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x = torch.tensor([[3e-13, 4e-13, 0.0], [3.0000003e-13, 4.0000004e-13, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    for ours, theirs in (
        (metricops.lifted_structure_loss, pml_losses.LiftedStructureLoss()),
        (metricops.generalized_lifted_structure_loss, pml_losses.GeneralizedLiftedStructureLoss()),
    ):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(ours(a, labels), theirs(b, labels), rtol=1e-6, atol=0)
        ours(a, labels).backward()
        theirs(b, labels).backward()
        assert a.grad.isfinite().all() and a.grad.abs().max() <= 2 * b.grad.abs().max()


def _head_formula(head, st, args, cols=None):
    """The per-anchor formulas in plain torch on the statistics (what metricops/similarity.py computed before the
    heads moved into the op): the oracle of the op's TERM column and its gradient."""

    def safe(t, valid):
        return torch.where(valid, t, torch.zeros_like(t))

    lse_pos, lse_neg, lin_pos = st[:, stat.LSE_POS], st[:, stat.LSE_NEG], st[:, stat.LIN_POS]
    n_pos, n_neg = st[:, stat.COUNT_POS], st[:, stat.COUNT_NEG]
    has_pos, has_neg = n_pos > 0, n_neg > 0
    if head == "supcon":
        valid = has_pos & has_pos.any() & has_neg.any()
        loss = torch.logaddexp(safe(lse_pos, valid), safe(lse_neg, valid)) - safe(lin_pos, valid) / n_pos.clamp_min(1)
        return safe(loss, valid)
    if head in ("multi_similarity", "multi_similarity_mined"):
        zero = torch.zeros_like(lse_pos)
        pos = torch.logaddexp(safe(lse_pos, has_pos), zero)
        neg = torch.logaddexp(safe(lse_neg, has_neg), zero)
        loss = safe(pos, has_pos) / args[0] + safe(neg, has_neg) / args[1]
        if head == "multi_similarity_mined":
            enough = (n_pos.sum() > 1) | (n_neg.sum() > 1)
            loss = safe(loss, enough.expand_as(loss))
        return loss
    if head == "circle":
        valid = has_pos & has_neg
        return safe(F.softplus(safe(lse_pos, valid) + safe(lse_neg, valid)), valid)
    if head == "generalized_lifted":
        return torch.relu(safe(lse_pos, has_pos) + safe(lse_neg, has_neg))
    assert head == "info_nce"
    return torch.logaddexp(lse_pos, lse_neg) - lin_pos


@pytest.mark.parametrize("kind", ["classes", "distinct", "same", "nan_row", "one_pair"])
@pytest.mark.parametrize(
    "policy, args, head",
    [
        ("scaled", [], "supcon"),
        ("multi_similarity", [2.0, 10.0, 0.5], "multi_similarity"),
        ("multi_similarity_mined", [2.0, 10.0, 0.5, 0.1], "multi_similarity_mined"),
        ("circle", [0.4, 80.0], "circle"),
        ("lifted", [0.0, 1.0], "generalized_lifted"),
        ("lifted", [0.0, -5.0], "generalized_lifted"),  # every term below 0: relu's zero gradient
        ("scaled", [], "info_nce"),
    ],
)
def test_loss_heads_match_their_torch_formulas(policy, args, head, kind):
    """The op's head (column TERM, and its gradient through lse_stats_backward) equals the loss's formula written
    in torch on the same op's statistics, values and gradients, in float64: anchors without a positive or a
    negative, batches without any, a NaN row, a miner output of a single pair, relu and softplus thresholds."""
    b = 2 if kind == "one_pair" else 11
    x = _data(b=b, d=5, seed=5).detach()
    if kind == "nan_row":
        x[4, 2] = float("nan")
    labels = _labels("classes" if kind in ("nan_row", "one_pair") else kind, b)
    if kind == "one_pair":
        labels = torch.tensor([0, 0])
    paired = head == "info_nce"
    y = _data(b=b, d=5, seed=6).detach() if paired else None
    row_keys, col_keys = (torch.arange(b), torch.arange(b)) if paired else (labels, None)
    scale = torch.tensor(3.0, dtype=torch.float64)
    params = None
    if policy == "multi_similarity_mined":
        first, _, _ = ops.lse_stats(x, None, labels, None, None, scale, "similarity_range", [], True, False, 0, 0)
        params = first[:, stat.MIN_POS : stat.MAX_NEG + 1].contiguous()
    weights = torch.randn(b, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(with_head):
        a = x.clone().requires_grad_()
        c = None if y is None else y.clone().requires_grad_()
        rows, cols, _ = ops.lse_stats(
            a,
            c,
            row_keys,
            col_keys,
            params,
            scale,
            policy,
            args,
            True,
            paired,
            4,
            3,
            False,
            head if with_head else "none",
        )
        if with_head:
            terms = rows[:, stat.TERM] + (cols[:, stat.TERM] if paired else 0)
        else:
            terms = _head_formula(head, rows, args) + (_head_formula(head, cols, args) if paired else 0)
        grads = torch.autograd.grad((terms * weights).nansum(), [t for t in (a, c) if t is not None])
        return terms.detach(), grads

    got, got_grads = run(True)
    want, want_grads = run(False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, equal_nan=True)
    if kind == "nan_row" and head not in ("info_nce", "multi_similarity_mined"):  # (the miner drops NaN pairs)
        assert got[4].isnan()  # the NaN row's own term


def test_backward_op_checks_the_statistics_shapes():
    """lse_stats_backward read kNumStats values per row of grad_row_stats, grad_col_stats and col_stats without
    checking their shapes: a (1, 13) gradient for 6 rows was read past its end. Each is now checked, by the
    kernel and by the fake kernel alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    labels, col_labels = torch.arange(6) // 2, torch.arange(5) // 2
    scale = torch.tensor(2.0, dtype=torch.float64)
    rows, cols, _ = ops.lse_stats(x, y, labels, col_labels, None, scale, "scaled", [], True, True, 0, 0)
    good = torch.ones_like(rows)

    def backward(grad_rows, grad_cols, row_stats=rows, col_stats=cols):
        return ops.lse_stats_backward(
            grad_rows, grad_cols, x, y, labels, col_labels, None, scale, "scaled", [], True, row_stats, col_stats, 0, 0
        )

    cases = [
        ((good[:1], None), r"grad_row_stats must have shape \(6, 13\), got \[1, 13\]"),
        ((good[:, :5], None), r"grad_row_stats must have shape \(6, 13\)"),
        ((good, torch.ones(1, 13, dtype=torch.float64)), r"grad_col_stats must have shape \(5, 13\)"),
        ((good, None, rows, cols[:, :5]), r"col_stats must have shape \(5, 13\)"),
        ((good, None, rows[:4]), r"row_stats must have shape \(6, 13\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            backward(*args)
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=message):
            backward(*args)
    backward(good, torch.ones_like(cols))  # the right shapes pass
