"""ArcFace, CosFace and ProxyAnchor on the native chunked ops, against metricops.reference (float64).

The reference itself is checked against pytorch-metric-learning 2.9 and by hand in
test_class_losses_reference.py. Forced small class chunks (metricops.class_losses._CLASS_CHUNK) cross the
chunk boundaries the online log-sum-exp merges over.
"""

import math

import pytest
import torch

import metricops
import metricops.class_losses as class_losses
from common import cpu_and_cuda
from metricops import reference
from metricops.reference.class_losses import cosine_matrix

ops = torch.ops.metricops
LOSSES = {
    "arcface": (metricops.arcface_loss, reference.arcface_loss, dict(margin=0.4, scale=8.0)),
    "cosface": (metricops.cosface_loss, reference.cosface_loss, dict(margin=0.3, scale=8.0)),
    "proxy_anchor": (metricops.proxy_anchor_loss, reference.proxy_anchor_loss, dict(margin=0.1, alpha=6.0)),
}


@pytest.fixture
def chunk(monkeypatch):
    def set_chunk(n):
        monkeypatch.setattr(class_losses, "_CLASS_CHUNK", n)

    return set_chunk


def _inputs(B, C, D, device="cpu", dtype=torch.float64, seed=0, num_labels=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(device)
    w = torch.randn(C, D, generator=g, dtype=dtype).to(device)
    labels = torch.randint(0, num_labels or C, (B,), generator=g).to(device)
    return x, labels, w


def _value_and_grads(fn, x, labels, w, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, labels, w, **kw)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("class_chunk", [0, 1, 3, 64])
def test_matches_reference_float64(device, name, class_chunk, chunk):
    chunk(class_chunk)
    ours, ref, kw = LOSSES[name]
    x, labels, w = _inputs(20, 11, 5, device, num_labels=8)  # classes 8..10 are absent from the batch
    got = _value_and_grads(ours, x, labels, w, **kw)
    expected = _value_and_grads(ref, x, labels, w, **kw)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# Arguments outside the usual ranges, which PML takes: ArcFace margins ≤ 0 (every target inside θ ≤ π − m), at π
# and past it (none inside), negative and zero scales, ProxyAnchor's α ≤ 0.
EXTREME_ARGUMENTS = [
    ("arcface", dict(margin=-0.4, scale=6.0)),
    ("arcface", dict(margin=math.pi, scale=6.0)),
    ("arcface", dict(margin=3.6, scale=-5.0)),
    ("arcface", dict(margin=0.4, scale=0.0)),
    ("cosface", dict(margin=-0.3, scale=-6.0)),
    ("proxy_anchor", dict(margin=0.1, alpha=0.0)),
    ("proxy_anchor", dict(margin=-0.2, alpha=-5.0)),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name,kw", EXTREME_ARGUMENTS)
def test_extreme_arguments_match_reference(device, name, kw, chunk):
    chunk(3)
    ours, ref, _ = LOSSES[name]
    x, labels, w = _inputs(14, 8, 4, device, num_labels=6)
    got = _value_and_grads(ours, x, labels, w, **kw)
    expected = _value_and_grads(ref, x, labels, w, **kw)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if device == "cpu":
        x, labels, w = _inputs(5, 4, 3, num_labels=4)
        x.requires_grad_(True)
        w.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, w: ours(x, labels, w, **kw), (x, w))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_reduction_none_and_sum(device, name, chunk):
    chunk(4)
    ours, ref, kw = LOSSES[name]
    x, labels, w = _inputs(9, 10, 3, device)
    for reduction in ("none", "sum"):
        got = _value_and_grads(ours, x, labels, w, reduction=reduction, **kw)
        expected = _value_and_grads(ref, x, labels, w, reduction=reduction, **kw)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_float32_matches_float64_reference(device, chunk):
    chunk(7)
    for name, (ours, ref, kw) in LOSSES.items():
        x, labels, w = _inputs(32, 40, 16, device, dtype=torch.float32)
        got = _value_and_grads(ours, x, labels, w, **kw)
        expected = _value_and_grads(ref, x.double(), labels, w.double(), **kw)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name, chunk):
    chunk(2)
    ours, _, kw = LOSSES[name]
    x, labels, w = _inputs(6, 5, 3, num_labels=4)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.autograd.gradcheck(lambda x, w: ours(x, labels, w, **kw), (x, w))


def test_arcface_gradcheck_past_the_threshold(chunk):
    # Targets with θ > π − m (the cos θ − m·sin m branch): each label's weight points away from its embedding.
    chunk(2)
    x, _, w = _inputs(4, 5, 3, seed=5)
    labels = torch.tensor([2, 0, 4, 1])
    w = w.clone()
    for i in range(4):
        w[labels[i]] = -x[i] + 0.05 * torch.randn(3, dtype=torch.float64)
    cos_t = cosine_matrix(x, w).gather(1, labels[:, None])
    assert (cos_t < -math.cos(1.0)).all()  # margin 1.0: every target past the threshold
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.autograd.gradcheck(lambda x, w: metricops.arcface_loss(x, labels, w, margin=1.0, scale=4.0), (x, w))


def test_opcheck():
    x, labels, w = _inputs(7, 5, 4)
    xn = torch.nn.functional.normalize(x).requires_grad_(True)
    w.requires_grad_(True)
    for kind in ("arcface", "cosface"):
        for class_chunk in (0, 2):
            torch.library.opcheck(ops.margin_softmax_loss.default, (xn, labels, w, kind, 0.5, 4.0, class_chunk))
    for class_chunk in (0, 2):
        torch.library.opcheck(ops.proxy_anchor_loss.default, (xn, labels, w, 0.1, 4.0, class_chunk))
    loss, lse = ops.margin_softmax_loss(xn.detach(), labels, w.detach(), "arcface", 0.5, 4.0, 2)
    torch.library.opcheck(
        ops.margin_softmax_loss_backward.default,
        (torch.randn_like(loss), xn.detach(), labels, w.detach(), lse, "arcface", 0.5, 4.0, 2),
    )
    for save_tile in (False, True):
        pos, neg, tile = ops.proxy_anchor_loss(xn.detach(), labels, w.detach(), 0.1, 4.0, 0, save_tile)
        torch.library.opcheck(
            ops.proxy_anchor_loss_backward.default,
            (torch.randn_like(pos), torch.randn_like(neg), xn.detach(), labels, w.detach(), pos, neg, tile, 0.1, 4.0),
        )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compile_fullgraph(name):
    ours, _, kw = LOSSES[name]
    x, labels, w = _inputs(10, 6, 4, dtype=torch.float32)
    eager = _value_and_grads(ours, x, labels, w, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, labels, w: ours(x, labels, w, **kw), fullgraph=True, backend="aot_eager")
    got = _value_and_grads(compiled, x, labels, w)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_class_and_empty_batch(device, name):
    ours, ref, kw = LOSSES[name]
    x, labels, w = _inputs(5, 1, 3, device)  # C = 1: every label is 0
    for a, b in zip(_value_and_grads(ours, x, labels, w, **kw), _value_and_grads(ref, x, labels, w, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x1, labels1, w4 = _inputs(1, 4, 3, device)  # one row: its class present, the three others absent
    for a, b in zip(_value_and_grads(ours, x1, labels1, w4, **kw), _value_and_grads(ref, x1, labels1, w4, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x0 = torch.zeros(0, 3, dtype=torch.float64, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    loss, gx, gw = _value_and_grads(ours, x0, empty, w, **kw)
    assert loss.item() == 0.0 and gx.shape == (0, 3) and (gw == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_duplicate_labels_and_transposed_weight(device, name, chunk):
    # Every row has the same label; the weight is a transposed view, as PML's W (D, C) gives it.
    chunk(3)
    ours, ref, kw = LOSSES[name]
    x, _, w = _inputs(8, 7, 4, device)
    labels = torch.full((8,), 5, device=device, dtype=torch.int32)
    w_t = w.T.contiguous().T
    got = _value_and_grads(ours, x, labels, w_t, **kw)
    expected = _value_and_grads(ref, x, labels, w, **kw)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_nan_in_gives_nan_out(device, chunk):
    chunk(2)
    x, labels, w = _inputs(6, 5, 3, device)
    x_nan = x.clone()
    x_nan[2, 1] = float("nan")
    rows = metricops.arcface_loss(x_nan, labels, w, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(metricops.cosface_loss(x_nan, labels, w))
    assert torch.isnan(metricops.proxy_anchor_loss(x_nan, labels, w))
    w_nan = w.clone()
    w_nan[4, 0] = float("nan")  # a class every row's log-sum-exp and every proxy term's gradient sees
    assert torch.isnan(metricops.arcface_loss(x, labels, w_nan, reduction="none")).all()
    assert torch.isnan(metricops.proxy_anchor_loss(x, labels, w_nan))


def test_bad_inputs_name_the_argument():
    x, labels, w = _inputs(4, 3, 5)
    for fn in (metricops.arcface_loss, metricops.cosface_loss, metricops.proxy_anchor_loss):
        wname = "proxies" if fn is metricops.proxy_anchor_loss else "weight"
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, C\) with C=3"):
            fn(x, torch.tensor([0, 1, 3, 0]), w)
        with pytest.raises(ValueError, match=r"labels must be class indices"):
            fn(x, torch.tensor([0, -1, 2, 0]), w)
        with pytest.raises(ValueError, match=rf"{wname} must have the same embedding size D as embeddings \(5\)"):
            fn(x, labels, torch.randn(3, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"{wname} must be a 2-D tensor of shape \(C, D\)"):
            fn(x, labels, torch.randn(15, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"{wname} must hold at least one class"):
            fn(x, labels, torch.randn(0, 5, dtype=torch.float64))
        with pytest.raises(TypeError, match=rf"{wname} must have the same dtype as embeddings"):
            fn(x, labels, w.float())
        with pytest.raises(ValueError, match=rf"{wname} must be on the same device as embeddings"):
            fn(x, labels, w.to("meta"))
        with pytest.raises(TypeError, match=r"labels must be int32 or int64"):
            fn(x, labels.float(), w)
        with pytest.raises(TypeError, match=r"embeddings must be float32 or float64"):
            fn(x.to(torch.int64), labels, w)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"margin must"):
            metricops.arcface_loss(x, labels, w, margin=bad)
    for fn in (metricops.arcface_loss, metricops.cosface_loss):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"scale must"):
                fn(x, labels, w, scale=bad)
        with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
            fn(x, labels, w, reduction="mean_nonzero")
    with pytest.raises(ValueError, match=r"margin must"):
        metricops.cosface_loss(x, labels, w, margin=float("nan"))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"alpha must"):
            metricops.proxy_anchor_loss(x, labels, w, alpha=bad)
    with pytest.raises(ValueError, match=r"margin must"):
        metricops.proxy_anchor_loss(x, labels, w, margin=float("inf"))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_proxy_anchor_saved_tile_equals_recomputing(device, dtype, monkeypatch):
    """The forward's saved (C, B) dot products give the backward exactly what recomputing them does, and the
    public loss saves them only when a gradient is needed and C·B is under the threshold."""
    x, labels, w = _inputs(13, 9, 6, device, dtype, num_labels=7)
    xn = torch.nn.functional.normalize(x)
    pos, neg, tile = ops.proxy_anchor_loss(xn, labels, w, 0.1, 6.0, 0, True)
    pos2, neg2, none = ops.proxy_anchor_loss(xn, labels, w, 0.1, 6.0, 0, False)
    assert tile.shape == (9, 13) and none.shape == (0, 13)
    torch.testing.assert_close(tile, w @ xn.T)  # the raw dot products (the proxies are normalized inside)
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)
    g_pos, g_neg = torch.randn_like(pos), torch.randn_like(neg)
    for chunk in (0, 2):  # the backward may walk the saved tile in other chunks than the forward's one
        saved = ops.proxy_anchor_loss_backward(g_pos, g_neg, xn, labels, w, pos, neg, tile, 0.1, 6.0, chunk)
        again = ops.proxy_anchor_loss_backward(g_pos, g_neg, xn, labels, w, pos, neg, none, 0.1, 6.0, chunk)
        for a, b in zip(saved, again):
            # the same formula on dot products from differently shaped GEMMs: equal up to their rounding
            torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)))

    calls = []

    class SpyOps:  # records save_tile (after class_chunk)
        def __getattr__(self, name):
            return getattr(ops, name)

        def proxy_anchor_loss(self, *args):
            calls.append(args[6])
            return ops.proxy_anchor_loss(*args)

    # the per-class terms (metricops.pml's ProxyAnchorLoss, whose reducer is the user's) keep the tile
    monkeypatch.setattr(class_losses, "ops", SpyOps())
    leaf = x.clone().requires_grad_(True)
    terms = class_losses._proxy_anchor_terms
    terms(leaf, labels, w, 0.1, 6.0)[0].sum().backward()
    with torch.no_grad():
        terms(leaf, labels, w, 0.1, 6.0)
    monkeypatch.setattr(class_losses, "_PROXY_SAVED_TILE_ENTRIES", 9 * 13 - 1)
    terms(leaf, labels, w, 0.1, 6.0)
    assert calls == [True, False, False]
    with pytest.raises(ValueError, match=r"tile must have shape \(9, 13\) \(saved by the forward\) or \(0, 13\)"):
        ops.proxy_anchor_loss_backward(g_pos, g_neg, xn, labels, w, pos, neg, tile[:4], 0.1, 6.0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_proxy_anchor_gradient_from_the_forward_pass_equals_the_backward_op(device, dtype, monkeypatch):
    """proxy_anchor_loss_and_grad (each class's derivatives taken as soon as its row is reduced) against the
    per-class op and its backward op with ProxyAnchor's weights 1/|C⁺| and 1/C; chunks of 1, 4 and all classes,
    raw embeddings normalized inside and unit ones used as given; classes 7 and 8 absent."""
    x, labels, w = _inputs(13, 9, 6, device, dtype, num_labels=7)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    num_present = float(labels.unique().numel())
    for normalize in (True, False):
        xs = x if normalize else torch.nn.functional.normalize(x)
        for chunk in (0, 1, 4):
            loss, pos, neg, grad_x, grad_w = ops.proxy_anchor_loss_and_grad(
                xs, labels, w, 0.1, 6.0, chunk, normalize, True, True
            )
            pos2, neg2, tile = ops.proxy_anchor_loss(xs, labels, w, 0.1, 6.0, chunk, False, normalize)
            torch.testing.assert_close(pos, pos2, **tol)
            torch.testing.assert_close(neg, neg2, **tol)
            torch.testing.assert_close(loss, pos2.sum() / num_present + neg2.sum() / 9, **tol)
            g_pos, g_neg = torch.full_like(pos, 1 / num_present), torch.full_like(neg, 1 / 9)
            expected = ops.proxy_anchor_loss_backward(
                g_pos, g_neg, xs, labels, w, pos2, neg2, tile, 0.1, 6.0, chunk, normalize
            )
            torch.testing.assert_close(grad_x, expected[0], **tol)
            torch.testing.assert_close(grad_w, expected[1], **tol)
            for want_x, want_w in ((False, False), (True, False), (False, True)):
                part = ops.proxy_anchor_loss_and_grad(xs, labels, w, 0.1, 6.0, chunk, normalize, want_x, want_w)
                for a, b in zip(part[:3], (loss, pos, neg)):
                    assert torch.equal(a, b)
                for got, want, full in ((part[3], want_x, grad_x), (part[4], want_w, grad_w)):
                    if want:
                        torch.testing.assert_close(got, full, **tol)  # one GEMM fewer, the same gradient
                    else:
                        assert got.shape == (0, 6)

    # the public loss asks for the gradient exactly when autograd will record the op
    calls = []

    class SpyOps:  # records (grad_embeddings, grad_proxies), the last two arguments
        def __getattr__(self, name):
            return getattr(ops, name)

        def proxy_anchor_loss_and_grad(self, *args):
            calls.append(args[7:])
            return ops.proxy_anchor_loss_and_grad(*args)

    monkeypatch.setattr(class_losses, "ops", SpyOps())
    leaf = x.clone().requires_grad_(True)
    metricops.proxy_anchor_loss(leaf, labels, w).backward()
    metricops.proxy_anchor_loss(x, labels, w.clone().requires_grad_(True))
    with torch.no_grad():
        metricops.proxy_anchor_loss(leaf, labels, w)
    metricops.proxy_anchor_loss(x, labels, w)
    assert calls == [(True, False), (False, True), (False, False), (False, False)]
    both = (x.clone().requires_grad_(True), w.clone().requires_grad_(True))
    metricops.proxy_anchor_loss(*both[:1], labels, both[1]).backward()
    assert calls[-1] == (True, True)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_proxy_anchor_backward_without_the_forward_gradient(device):
    """The backward recomputes when the forward did not take the gradients it needs (yet was recorded), when
    the per-class terms are differentiated too, and under create_graph, where a second derivative is refused
    (never the zeros that scaling the forward's gradient as a constant would give)."""
    x, labels, w = _inputs(11, 7, 5, device, num_labels=5)
    leaves = lambda: (x.clone().requires_grad_(True), w.clone().requires_grad_(True))  # noqa: E731
    a, wa = leaves()
    expected = torch.autograd.grad(
        ops.proxy_anchor_loss_and_grad(a, labels, wa, 0.1, 6.0, 0, True, True, True)[0], (a, wa)
    )
    for flags in ((False, False), (True, False), (False, True)):
        a, wa = leaves()
        got = torch.autograd.grad(ops.proxy_anchor_loss_and_grad(a, labels, wa, 0.1, 6.0, 0, True, *flags)[0], (a, wa))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)
    # loss and per-class terms together: the per-class op's gradient of the same sum
    a, wa = leaves()
    loss, pos, neg = ops.proxy_anchor_loss_and_grad(a, labels, wa, 0.1, 6.0, 2, True, True, True)[:3]
    got = torch.autograd.grad(3 * loss + pos[1] - 2 * neg[4], (a, wa))
    a, wa = leaves()
    e_loss = reference.proxy_anchor_loss(a, labels, wa, margin=0.1, alpha=6.0)
    e_pos, e_neg = reference.proxy_anchor_terms(a, labels, wa, margin=0.1, alpha=6.0)[:2]
    expected = torch.autograd.grad(3 * e_loss + e_pos[1] - 2 * e_neg[4], (a, wa))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    # a retained graph: the first backward hands over the forward's gradients, the second recomputes them
    a, wa = leaves()
    loss = metricops.proxy_anchor_loss(a, labels, wa)
    first = [g.clone() for g in torch.autograd.grad(loss, (a, wa), retain_graph=True)]
    second = torch.autograd.grad(2 * loss, (a, wa))
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g2, 2 * g1, rtol=1e-12, atol=1e-13)
    # create_graph: the same gradient, through the backward op, which refuses to be differentiated
    a, wa = leaves()
    (grad_x,) = torch.autograd.grad(metricops.proxy_anchor_loss(a, labels, wa), (a,), create_graph=True)
    a2, wa2 = leaves()
    torch.testing.assert_close(grad_x, torch.autograd.grad(metricops.proxy_anchor_loss(a2, labels, wa2), (a2,))[0])
    with pytest.raises(RuntimeError, match="double backward of proxy_anchor_loss is not supported"):
        grad_x.pow(2).sum().backward()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_proxy_anchor_normalize_inside_equals_f_normalize_first(device):
    """normalize=True (raw embeddings, each tile entry scaled by both rows' inverse norms) against F.normalize
    followed by the op, values and both gradients through torch's autograd; rows of norm 1e-3 to 1e2, an exactly
    zero row and one below F.normalize's eps (the clamp active)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 9, dtype=torch.float64)[:, None]
    x[4] = 0.0
    x[7] = torch.tensor([3e-13, -1e-13, 2e-13, 0.0, 1e-13], dtype=torch.float64)
    x = x.to(device)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 0, 5, 2]).to(device)
    for save_tile, chunk in ((False, 0), (False, 2), (True, 0)):
        a, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        b, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        inside = ops.proxy_anchor_loss(a, labels, wa, 0.1, 6.0, chunk, save_tile, True)
        first = ops.proxy_anchor_loss(torch.nn.functional.normalize(b), labels, wb, 0.1, 6.0, chunk, save_tile)
        for got, want in zip(inside[:2], first[:2]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.randn(2, 6, generator=g, dtype=torch.float64).to(device)
        grads_inside = torch.autograd.grad((inside[0] * weights[0]).sum() + (inside[1] * weights[1]).sum(), (a, wa))
        grads_first = torch.autograd.grad((first[0] * weights[0]).sum() + (first[1] * weights[1]).sum(), (b, wb))
        for got, want in zip(grads_inside, grads_first):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert torch.count_nonzero(grads_inside[0][7]) > 0  # the clamped row: F.normalize's g/eps


def test_direct_op_calls_are_checked_in_cpp():
    x, labels, w = _inputs(4, 3, 5)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, C\) with C=3"):
        ops.margin_softmax_loss(x, torch.tensor([0, 1, 7, 0]), w, "arcface", 0.5, 64.0)
    with pytest.raises(ValueError, match=r"labels must be class indices"):
        ops.proxy_anchor_loss(x, torch.tensor([0, 1, -2, 0]), w, 0.1, 32.0)
    with pytest.raises(ValueError, match=r"margin must be a finite number, got nan"):
        ops.margin_softmax_loss(x, labels, w, "arcface", math.nan, 64.0)
    with pytest.raises(ValueError, match=r"scale must be a finite number, got inf"):
        ops.margin_softmax_loss(x, labels, w, "cosface", 0.3, math.inf)
    with pytest.raises(ValueError, match=r"kind must be 'arcface' or 'cosface'"):
        ops.margin_softmax_loss(x, labels, w, "sphereface", 0.3, 1.0)
    with pytest.raises(ValueError, match=r"weight must have the same embedding size D"):
        ops.margin_softmax_loss(x, labels, w[:, :2], "arcface", 0.5, 64.0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number, got -inf"):
        ops.proxy_anchor_loss(x, labels, w, 0.1, -math.inf)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_large_logits_stay_finite(device, chunk):
    # scale 64 and near-parallel targets: logits ~64 would overflow exp without the running max.
    chunk(3)
    x, labels, w = _inputs(12, 9, 4, device)
    w = w.clone()
    w[labels] = x * 3.0 + 1e-3  # each row's label points (almost) at it
    for fn, ref in ((metricops.arcface_loss, reference.arcface_loss), (metricops.cosface_loss, reference.cosface_loss)):
        got = _value_and_grads(fn, x, labels, w, scale=64.0)
        expected = _value_and_grads(ref, x, labels, w, scale=64.0)
        assert all(torch.isfinite(t).all() for t in got)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_cpu_autocast_runs_in_float32():
    x, labels, w = _inputs(8, 6, 4, dtype=torch.float32)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        arc = metricops.arcface_loss(xb, labels, wb, scale=8.0)
        proxy = metricops.proxy_anchor_loss(xb, labels, wb, alpha=6.0)
    assert arc.dtype == proxy.dtype == torch.float32
    for got, ref in (
        (arc, reference.arcface_loss(xb.double(), labels, wb.double(), scale=8.0)),
        (proxy, reference.proxy_anchor_loss(xb.double(), labels, wb.double(), alpha=6.0)),
    ):
        assert abs(got.item() - ref.item()) <= 1e-4 * (1 + abs(ref.item()))
