"""The metricops.pml miners' lazy output (MinedTriplets) and the fused miner + TripletMarginLoss pipeline,
against the listed triplets and pytorch-metric-learning 2.9."""

import copy
import pickle

import pytest
import torch

import metricops
from common import assert_close, cpu_and_cuda
from metricops.pml import distances, losses, miners
from metricops.pml import _fused
from metricops.pml._mined import MinedTriplets

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

DISTANCES = {
    "lp": ({}, "LpDistance"),
    "lp_raw": ({"normalize_embeddings": False}, "LpDistance"),
    "lp_sq": ({"power": 2}, "LpDistance"),
    "cos": ({}, "CosineSimilarity"),
}
KINDS = ("all", "hard", "semihard", "easy", "batch_hard")


def _miner(lib_miners, lib_distances, kind, margin, dist_name="lp"):
    kw, cls = DISTANCES[dist_name]
    d = getattr(lib_distances, cls)(**kw)
    if kind == "batch_hard":
        return lib_miners.BatchHardMiner(distance=d)
    return lib_miners.TripletMarginMiner(margin, kind, distance=d)


def _loss(lib_losses, lib_distances, margin, dist_name="lp"):
    kw, cls = DISTANCES[dist_name]
    return lib_losses.TripletMarginLoss(margin, distance=getattr(lib_distances, cls)(**kw))


def _batch(seed, B=32, D=6, classes=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen, dtype=dtype), torch.randint(0, classes, (B,), generator=gen)


@pytest.fixture(params=["slots", "batch_all"])
def fused_path(request, monkeypatch):
    """Both fused implementations: per positive slot on one distance matrix, and native batch-all sums."""
    monkeypatch.setattr(_fused, "use_slots", lambda *args: request.param == "slots")
    return request.param


def _value_and_grad(loss, x, labels, make_indices):
    e = x.clone().requires_grad_()
    indices = make_indices(e)
    value = loss(e, labels, indices)
    grad = torch.autograd.grad(value, e, allow_unused=True)[0]
    return value.detach(), torch.zeros_like(e) if grad is None else grad, indices


# ------------------------------------------------------------------ the lazy tuple


@pytest.mark.parametrize("kind", KINDS)
def test_mined_triplets_behave_like_the_tuple(kind):
    x, labels = _batch(0)
    miner = _miner(miners, distances, kind, 0.1)
    out = miner(x, labels)
    eager = tuple(_miner(miners, distances, kind, 0.1)(x, labels))
    assert isinstance(out, tuple) and isinstance(out, MinedTriplets)
    assert len(out) == 3 and bool(out)
    assert not out.is_materialized  # len() and truth do not mine
    a, p, n = out
    assert out.is_materialized
    for got, want in zip((a, p, n), eager):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    want = pml_miners.BatchHardMiner() if kind == "batch_hard" else pml_miners.TripletMarginMiner(0.1, kind)
    want = want(x, labels)
    order = torch.argsort(want[0] * 10**6 + want[1] * 10**3 + want[2])
    for got, w in zip(out, want):
        assert torch.equal(got, w if kind == "batch_hard" else w[order])
    assert torch.equal(out[0], a) and torch.equal(out[-1], n) and out[0].numel() == len(a)
    assert isinstance(out[:2], tuple) and len(out[:2]) == 2 and torch.equal(out[1:][0], p)
    assert [t.numel() for t in out] == [len(a)] * 3
    assert list(reversed(out))[0] is n and out.index(a) == 0 and a in out  # as a tuple: identity first
    assert len(out + (a,)) == 4 and len((a,) + out) == 4 and len(out * 2) == 6
    assert out == out.materialize() and hash(out) == hash(out.materialize())
    assert "tensor(" in repr(out)
    for clone in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert type(clone) is tuple and all(torch.equal(c, t) for c, t in zip(clone, out))
    assert copy.copy(out) == out.materialize()
    cube = torch.arange(32**3).view(32, 32, 32)
    assert torch.equal(cube[out], cube[a, p, n])  # a tuple index, not a list of three
    assert torch.equal(torch.stack(tuple(out)), torch.stack((a, p, n)))


def test_real_pml_loss_accepts_mined_triplets():
    x, labels = _batch(1)
    for kind in KINDS:
        for make in (lambda: pml_losses.TripletMarginLoss(0.1), lambda: pml_losses.ContrastiveLoss()):
            lazy = _miner(miners, distances, kind, 0.2)(x, labels)
            eager = tuple(_miner(miners, distances, kind, 0.2)(x, labels))
            assert_close(make()(x, labels, lazy), make()(x, labels, eager))


# ------------------------------------------------------------------ fused values and gradients


@pytest.mark.parametrize("dist_name", list(DISTANCES))
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_listed_triplets_and_pml(dist_name, kind, fused_path):
    miner_margins = (0.0,) if kind == "batch_hard" else (-0.3, 0.0, 0.1, 0.4)
    for seed in (0,):
        x, labels = _batch(seed)
        for miner_margin in miner_margins:
            for loss_margin in (-0.1, 0.0, 0.3) if miner_margin != 0.1 else (0.05,):
                ours = losses.TripletMarginLoss(
                    loss_margin, distance=getattr(distances, DISTANCES[dist_name][1])(**DISTANCES[dist_name][0])
                )
                miner = _miner(miners, distances, kind, miner_margin, dist_name)
                v1, g1, lazy = _value_and_grad(ours, x, labels, lambda e: miner(e, labels))
                assert not lazy.is_materialized, "the fused path listed the triplets"
                v2, g2, _ = _value_and_grad(ours, x, labels, lambda e: tuple(miner(e, labels)))
                theirs = _loss(pml_losses, pml_distances, loss_margin, dist_name)
                pml_miner = _miner(pml_miners, pml_distances, kind, miner_margin, dist_name)
                v3, g3, _ = _value_and_grad(theirs, x, labels, lambda e: pml_miner(e, labels))
                case = (seed, miner_margin, loss_margin)
                assert_close(v1, v2, atol=1e-12, rtol=1e-10), case
                assert_close(g1, g2, atol=1e-12, rtol=1e-9), case
                assert_close(v1, v3, atol=1e-8, rtol=1e-7), case
                assert_close(g1, g3, atol=1e-8, rtol=1e-6), case


@pytest.mark.parametrize("kind, miner_margin", [("hard", 0.2), ("semihard", 0.2), ("all", 0.0), ("easy", 0.0)])
@pytest.mark.parametrize("layout", ["duplicated_across_labels", "collapsed"])
@pytest.mark.parametrize("memory", ["matrix", "streaming"])
def test_fused_ties_at_zero_equal_listed_triplets(kind, miner_margin, layout, memory, fused_path, monkeypatch):
    """m = d(a, n) − d(a, p) exactly 0 where a bound is 0: PML's hard set has these triplets, its semihard set not."""
    if memory == "streaming":  # the ops stream row blocks from this batch size on
        monkeypatch.setattr(metricops._memory, "AUTO_STREAM_MIN_B", 8)
        monkeypatch.setattr(metricops._memory, "CPU_STREAM_BLOCK_ROWS", 5)
    x, labels = _batch(2, B=24)
    if layout == "collapsed":
        x = x[:1].expand_as(x).clone()  # every distance 0: every triplet ties
    else:
        x[12:] = x[:12]  # row i + 12 duplicates row i (other labels): d(a, i) == d(a, i + 12)
    for loss_margin in (0.05, 0.3):
        loss = losses.TripletMarginLoss(loss_margin)
        miner = miners.TripletMarginMiner(miner_margin, kind)
        v1, g1, lazy = _value_and_grad(loss, x, labels, lambda e: miner(e, labels))
        assert not lazy.is_materialized
        v2, g2, _ = _value_and_grad(loss, x, labels, lambda e: tuple(miner(e, labels)))
        assert_close(v1, v2, atol=1e-12, rtol=1e-10)
        # A duplicate's distance from the GEMM is ~1e-8, not 0, and its slope is that rounding's:
        # the two backward passes round it differently (a tie's missing term is ~1e-3 here).
        assert_close(g1, g2, atol=1e-9, rtol=1e-6)
        theirs = pml_losses.TripletMarginLoss(loss_margin)
        their_miner = pml_miners.TripletMarginMiner(miner_margin, kind)
        v3, _, _ = _value_and_grad(theirs, x, labels, lambda e: their_miner(e, labels))
        assert_close(v1, v3, atol=1e-8, rtol=1e-7)
        if layout == "collapsed" and kind in ("hard", "all"):
            assert float(v1) == pytest.approx(loss_margin)  # every triplet selected, each term = margin


def test_unfusable_calls_list_the_triplets_and_match_pml():
    x, labels = _batch(3)
    cases = [
        # another tensor than the one mined
        (
            lambda e: miners.TripletMarginMiner(0.2, "semihard")(e.detach().clone(), labels),
            losses.TripletMarginLoss(0.1),
            lambda e: pml_miners.TripletMarginMiner(0.2, "semihard")(e.detach().clone(), labels),
            pml_losses.TripletMarginLoss(0.1),
        ),
        # the loss's distance differs from the miner's
        (
            lambda e: miners.TripletMarginMiner(0.2, "hard")(e, labels),
            losses.TripletMarginLoss(0.1, distance=distances.CosineSimilarity()),
            lambda e: pml_miners.TripletMarginMiner(0.2, "hard")(e, labels),
            pml_losses.TripletMarginLoss(0.1, distance=pml_distances.CosineSimilarity()),
        ),
        # swap / smooth_loss are not the fused hinge
        (
            lambda e: miners.BatchHardMiner()(e, labels),
            losses.TripletMarginLoss(0.1, swap=True),
            lambda e: pml_miners.BatchHardMiner()(e, labels),
            pml_losses.TripletMarginLoss(0.1, swap=True),
        ),
        (
            lambda e: miners.TripletMarginMiner(0.3)(e, labels),
            losses.TripletMarginLoss(0.1, smooth_loss=True),
            lambda e: pml_miners.TripletMarginMiner(0.3)(e, labels),
            pml_losses.TripletMarginLoss(0.1, smooth_loss=True),
        ),
    ]
    for ours_mine, ours_loss, their_mine, their_loss in cases:
        v1, g1, lazy = _value_and_grad(ours_loss, x, labels, ours_mine)
        assert lazy.is_materialized
        v2, g2, _ = _value_and_grad(their_loss, x, labels, their_mine)
        assert_close(v1, v2, atol=1e-8, rtol=1e-7)
        assert_close(g1, g2, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("how", ["in_place", "through_data"])
def test_embeddings_changed_in_place_after_mining(how):
    """The triplets are those of the values mined; the loss then sees the new values (as with PML). A write
    through ``.data`` leaves the version counter alone: the values are compared too."""
    x, labels = _batch(4)
    for lib_miners, lib_losses in ((miners, losses), (pml_miners, pml_losses)):
        e = x.clone().requires_grad_()
        h = e * 1
        indices = lib_miners.TripletMarginMiner(0.2, "semihard")(h, labels)
        shift = torch.linspace(-1.0, 1.0, h.numel(), dtype=h.dtype).view_as(h)
        if how == "through_data":
            h.data.add_(shift)
        else:
            with torch.no_grad():  # (LpDistance normalizes: a shift, not a scale, moves the distances)
                h.add_(shift)
        value = lib_losses.TripletMarginLoss(0.1)(h, labels, indices)
        if lib_miners is miners:
            ours = value
        else:
            assert_close(ours, value, atol=1e-8, rtol=1e-7)


def test_loss_without_miner_lists_no_triplet(fused_path, monkeypatch):
    """TripletMarginLoss(embeddings, labels): every triplet, fused (no miner, no list), equal to PML."""

    def listing_forbidden(*args, **kwargs):
        raise AssertionError("the triplets were listed")

    x, labels = _batch(5)
    monkeypatch.setattr(losses.TripletMarginLoss, "compute_loss", listing_forbidden)
    for loss_margin in (-0.1, 0.0, 0.2):
        v1, g1, _ = _value_and_grad(losses.TripletMarginLoss(loss_margin), x, labels, lambda e: None)
        v2, g2, _ = _value_and_grad(pml_losses.TripletMarginLoss(loss_margin), x, labels, lambda e: None)
        assert_close(v1, v2, atol=1e-8, rtol=1e-7)
        assert_close(g1, g2, atol=1e-8, rtol=1e-6)


def test_float32_pipeline_matches_listed_triplets_and_pml(fused_path):
    """float32: the fused value is a difference of two float32 sums (semihard, easy), so ~1e-6 relative; PML's
    own rounding moves a triplet across a bound now and then, which moves a few gradient rows."""
    x, labels = _batch(6, B=128, D=16, classes=16, dtype=torch.float32)
    for kind in KINDS:
        miner = _miner(miners, distances, kind, 0.2)
        v1, g1, lazy = _value_and_grad(losses.TripletMarginLoss(0.05), x, labels, lambda e: miner(e, labels))
        assert not lazy.is_materialized
        v2, g2, _ = _value_and_grad(losses.TripletMarginLoss(0.05), x, labels, lambda e: tuple(miner(e, labels)))
        assert_close(v1, v2, atol=1e-7, rtol=1e-5)
        assert_close(g1, g2, atol=1e-8, rtol=1e-5)
        v3, g3, _ = _value_and_grad(
            pml_losses.TripletMarginLoss(0.05),
            x,
            labels,
            lambda e: _miner(pml_miners, pml_distances, kind, 0.2)(e, labels),
        )
        assert_close(v1, v3, atol=1e-7, rtol=1e-3)  # one triplet moved changes the mean by ~1/count
        assert float((g1 - g3).norm() / g3.norm().clamp_min(1e-30)) < 1e-2


def test_inference_mode_tensors():
    """Inference tensors keep no in-place version: the loss lists the triplets rather than assume them unchanged."""
    with torch.inference_mode():
        x, labels = _batch(7, dtype=torch.float32)
        out = miners.TripletMarginMiner(0.2, "hard")(x, labels)
        value = losses.TripletMarginLoss(0.1)(x, labels, out)
        assert out.is_materialized
        theirs = pml_losses.TripletMarginLoss(0.1)(x, labels, pml_miners.TripletMarginMiner(0.2, "hard")(x, labels))
        assert_close(value, theirs)


# ------------------------------------------------------------------ the native interval counter


def _interval_weights_by_listing(dist, labels, lower, upper, inclusive):
    """The op's contract by listing every triplet, with torch's own float subtraction and comparisons."""
    B = dist.shape[0]
    weight = torch.zeros(B, B, dtype=torch.float64)
    row_count = torch.zeros(B, dtype=torch.int64)
    for a in range(B):
        for p in range(B):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(B):
                if labels[n] == labels[a]:
                    continue
                m = dist[a, n] - dist[a, p]  # a 0-dim tensor in dist's dtype
                keep = bool(m <= upper) if inclusive else bool(m < upper)
                if lower is not None:
                    keep = keep and bool(m > lower)
                if keep:
                    weight[a, p] += 1
                    weight[a, n] -= 1
                    row_count[a] += 1
    return weight, row_count


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interval", [(None, 0.0, True), (0.0, 0.2, True), (0.0, 0.05, False), (None, 0.2, False)])
def test_interval_weights_match_listing_with_ties_at_bounds(device, dtype, interval):
    # Integer coordinates: many m exactly at 0 and at the bounds (0.2 = 1/5 of a step of 1 after scaling).
    x = torch.tensor([0, 2, -2, 3, -1, 10, 5, 0, 1, 2], dtype=dtype)[:, None] / 5
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    dist = metricops.pairwise_distance(x)
    dist[3, 7] = float("nan")  # never selected
    lower, upper, inclusive = interval
    weight, row_count = torch.ops.metricops.triplet_interval_weights(
        dist.to(device), labels.to(device), 0.0 if lower is None else lower, lower is not None, upper, inclusive
    )
    expected_weight, expected_count = _interval_weights_by_listing(dist, labels, lower, upper, inclusive)
    assert weight.dtype == dtype
    assert torch.equal(weight.cpu().double(), expected_weight)
    assert torch.equal(row_count.cpu(), expected_count)
    assert int(expected_count.sum()) > 0  # the example selects something in every interval


def test_interval_weights_pinned_semihard_example():
    # 1-D x = [0, 2, -2, 3, -1, 10], labels [0,0,1,1,2,2] (distances |xi - xj|). Anchor 0, positive 1
    # (d = 2): semi-hard (0 < m <= 0.2 on m = d_an - 2) takes no negative (d_an: 2, 3, 1, 10, tie at 2 is
    # m = 0, excluded); with an inclusive upper bound of 1.0 it takes negative 3 (m = 1).
    x = torch.tensor([[0.0], [2.0], [-2.0], [3.0], [-1.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    dist = metricops.pairwise_distance(x)
    weight, _ = torch.ops.metricops.triplet_interval_weights(dist, labels, 0.0, True, 0.2, True)
    assert weight[0, 1] == 0
    weight, count = torch.ops.metricops.triplet_interval_weights(dist, labels, 0.0, True, 1.0, True)
    assert weight[0, 1] == 1 and weight[0, 3] == -1 and weight[0, 2] == 0
    assert int(count[0]) == 1


def test_interval_weights_opcheck_and_bad_input():
    x = torch.randn(12, 3, dtype=torch.float64)
    labels = torch.arange(12) % 3
    dist = metricops.pairwise_distance(x)
    torch.library.opcheck(torch.ops.metricops.triplet_interval_weights, (dist, labels, 0.0, True, 0.3, False))
    with pytest.raises(ValueError, match="dist must be a square"):
        torch.ops.metricops.triplet_interval_weights(dist[:, :5], labels, 0.0, True, 0.3, False)
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of length B=12"):
        torch.ops.metricops.triplet_interval_weights(dist, labels[:5], 0.0, True, 0.3, False)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        torch.ops.metricops.triplet_interval_weights(dist, labels.float(), 0.0, True, 0.3, False)
    empty, count = torch.ops.metricops.triplet_interval_weights(dist[:0, :0], labels[:0], 0.0, True, 0.3, False)
    assert empty.shape == (0, 0) and count.shape == (0,)


def _raw(lib_distances):
    return lib_distances.LpDistance(normalize_embeddings=False)


@pytest.mark.parametrize("kind,mu,margin", [("all", 1.0, 2.0), ("easy", 1.0, 2.0), ("semihard", 1.0, 2.0)])
def test_miner_bound_ties_with_many_positives_match_pml(kind, mu, margin):
    """Integer points tie exactly at the miner's bound μ = 1 (m = d(a, n) − d(a, p) = 1). With 9 positives per
    anchor the fused loss took the batch-all op, which counts m < μ where PML's miner keeps m <= μ ("easy":
    drops it): 2.0 against PML's 48/38 for "all". Values and gradients now agree with PML."""
    x = torch.tensor([[0.0]] * 9 + [[1.0], [2.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0] * 10 + [1] * 2)
    results = []
    for lib_losses, lib_miners, lib_distances in ((losses, miners, distances), (pml_losses, pml_miners, pml_distances)):
        e = x.clone().requires_grad_()
        miner = lib_miners.TripletMarginMiner(mu, kind, distance=_raw(lib_distances))
        value = lib_losses.TripletMarginLoss(margin, distance=_raw(lib_distances))(e, labels, miner(e, labels))
        results.append((value.detach(), torch.autograd.grad(value, e, allow_unused=True)[0]))
    (v1, g1), (v2, g2) = results
    assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    assert_close(g1, torch.zeros_like(x) if g2 is None else g2, rtol=1e-12, atol=1e-12)
    if kind == "all":
        assert v1.item() == pytest.approx(48 / 38)


@pytest.mark.parametrize("kind", ["easy", "semihard", "all"])
def test_miner_output_with_an_infinite_row_matches_pml(kind):
    """Pairs the miner did not select are left out of the fused loss, not multiplied by 0: 0 · inf was NaN
    where PML (and the listed triplets) give 1.5 ("easy")."""
    x = torch.tensor([[0.0], [1.0], [3.0], [float("inf")]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    got = []
    for lib_losses, lib_miners, lib_distances in ((losses, miners, distances), (pml_losses, pml_miners, pml_distances)):
        miner = lib_miners.TripletMarginMiner(0.1, kind, distance=_raw(lib_distances))
        loss = lib_losses.TripletMarginLoss(3.0, distance=_raw(lib_distances))
        got.append(loss(x, labels, miner(x, labels)))
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=0, equal_nan=True)
    if kind == "easy":
        assert got[0].item() == 1.5


def test_triplet_drop_ins_take_half_precision_on_cpu():
    """TripletMarginLoss and both miners refused float16 on CPU (the native mining op's check, naming
    "embeddings"), where PML computes it; mining now runs on a float32 copy, the loss on the half values."""
    torch.manual_seed(0)
    x = torch.randn(6, 4).half()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    exact = pml_losses.TripletMarginLoss()(x.double(), y).item()
    ours = losses.TripletMarginLoss()(x, y)
    assert ours.dtype == torch.float16
    assert abs(ours.item() - exact) <= 2 * abs(pml_losses.TripletMarginLoss()(x, y).item() - exact) + 2e-3
    for ours_miner, their_miner in (
        (miners.BatchHardMiner(), pml_miners.BatchHardMiner()),
        (miners.TripletMarginMiner(0.5, "all"), pml_miners.TripletMarginMiner(0.5, "all")),
    ):
        ours_t = [t.tolist() for t in ours_miner(x, y)]
        theirs_t = [t.tolist() for t in their_miner(x.float(), y)]
        assert ours_t == theirs_t


def test_miners_take_float_labels_as_pml():
    """PML compares labels, whatever their values: 0.5 and 1.5 are two classes (refused before)."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.tensor([0.5, 0.5, 1.5, 1.5, 2.5, 2.5, 0.5, 1.5], dtype=torch.float64)
    for ours, theirs in ((miners.TripletMarginMiner(0.3, "all"), pml_miners.TripletMarginMiner(0.3, "all")),):
        assert [t.tolist() for t in ours(x, y)] == [t.tolist() for t in theirs(x, y)]


def test_attributes_set_after_construction_are_checked_with_their_names():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = losses.TripletMarginLoss()
    loss.triplets_per_anchor = 2  # was silently computed as "all"
    with pytest.raises(NotImplementedError, match="triplets_per_anchor"):
        loss(x, y)
    miner = miners.TripletMarginMiner()
    miner.type_of_triplets = "bogus"
    with pytest.raises(NotImplementedError, match="type_of_triplets"):
        miner(x, y)
    contrastive = losses.ContrastiveLoss()
    contrastive.pos_margin = "a"
    with pytest.raises(TypeError, match="pos_margin"):
        contrastive(x, y)
