"""metricops.pml's similarity losses and MultiSimilarityMiner against pytorch-metric-learning 2.9 itself:
values and gradients over seeds, shapes, reducers, distances, indices_tuple (incl. the miner's output) and ref_emb."""

import pytest
import torch

import metricops
from metricops.pml import distances, losses, miners, reducers

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

NATIVE_OPS = {
    "SupConLoss": "supcon_loss",
    "NTXentLoss": "ntxent_loss",
    "MultiSimilarityLoss": "multi_similarity_loss",
    "CircleLoss": "circle_loss",
    "GeneralizedLiftedStructureLoss": "generalized_lifted_structure_loss",
    "LiftedStructureLoss": "lifted_structure_loss",
}


@pytest.fixture(autouse=True)
def native_ops(monkeypatch):
    """Counts the calls of metricops' functional ops and of the streaming engine (key "engine"), so tests can
    tell which path ran."""
    from metricops import similarity

    calls = {}

    def count(module, name, key):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for op in NATIVE_OPS.values():
        if hasattr(metricops, op):
            count(metricops, op, op)
    count(similarity, "_stats", "engine")
    return calls


# name: (our class kwargs == PML's kwargs, distances PML accepts for it)
ALL_DISTANCES = ("cosine", "lp", "lp_raw", "lp_power2")
LOSSES = {
    "SupConLoss": ({"temperature": 0.3}, ALL_DISTANCES),
    "NTXentLoss": ({"temperature": 0.2}, ALL_DISTANCES),
    "MultiSimilarityLoss": ({"alpha": 1.5, "beta": 9.0, "base": 0.3}, ALL_DISTANCES),
    "CircleLoss": ({"m": 0.3, "gamma": 20.0}, ("cosine",)),
    "GeneralizedLiftedStructureLoss": ({"pos_margin": 0.1, "neg_margin": 1.1}, ALL_DISTANCES),
    "LiftedStructureLoss": ({"pos_margin": 0.1, "neg_margin": 1.1}, ALL_DISTANCES),
}
DISTANCE_KW = {
    "cosine": ({}, "CosineSimilarity"),
    "lp": ({}, "LpDistance"),
    "lp_raw": ({"normalize_embeddings": False}, "LpDistance"),
    "lp_power2": ({"power": 2}, "LpDistance"),
}
REDUCERS = {
    "default": lambda mod: None,
    "mean": lambda mod: mod.MeanReducer(),
    "sum": lambda mod: mod.SumReducer(),
    "avg_nonzero": lambda mod: mod.AvgNonZeroReducer(),
    "threshold": lambda mod: mod.ThresholdReducer(low=0.05, high=3.0),
    "per_anchor": lambda mod: mod.PerAnchorReducer(mod.AvgNonZeroReducer()),
}


def _make(name, dist_name, reducer_name, **override):
    kw, _ = LOSSES[name]
    kw = {**kw, **override}
    out = []
    for loss_mod, dist_mod, red_mod in ((losses, distances, reducers), (pml_losses, pml_distances, pml_reducers)):
        extra = {}
        if dist_name is not None:
            dkw, dcls = DISTANCE_KW[dist_name]
            extra["distance"] = getattr(dist_mod, dcls)(**dkw)
        reducer = REDUCERS[reducer_name](red_mod)
        if reducer is not None:
            extra["reducer"] = reducer
        out.append(getattr(loss_mod, name)(**kw, **extra))
    return out


def _run(ours, theirs, emb, labels, *, atol=1e-10, rtol=1e-8, indices=None, **call):
    """Both losses' values and gradients (embeddings, and ref_emb when given) on the same inputs.
    ``indices``: (ours, theirs) indices_tuple, e.g. each library's own miner output."""
    results = []
    for k, loss in enumerate((ours, theirs)):
        e = emb.clone().requires_grad_()
        kw = dict(call)
        leaves = [e]
        if call.get("ref_emb") is not None:
            kw["ref_emb"] = call["ref_emb"].clone().requires_grad_()
            leaves.append(kw["ref_emb"])
        if indices is not None:
            kw["indices_tuple"] = indices[k](e, kw.get("ref_emb")) if callable(indices[k]) else indices[k]
        out = loss(e, labels, **kw)
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
        results.append((out.detach(), [torch.zeros_like(lf) if g is None else g for g, lf in zip(grads, leaves)]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2.to(o1.dtype), atol=atol, rtol=rtol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return o1


def _batch(b, d, n_classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=dtype)
    labels = torch.arange(b) if n_classes == b else torch.randint(0, n_classes, (b,), generator=g)
    return emb, labels


# (B, D, classes): anchors without a positive; all distinct labels; one class; a pair; one row
SHAPES = [(14, 6, 4), (11, 5, 11), (8, 4, 1), (2, 3, 2), (1, 3, 1)]


@pytest.mark.parametrize("reducer_name", list(REDUCERS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_all_pairs_every_distance_and_reducer(name, reducer_name, native_ops):
    if name == "LiftedStructureLoss" and reducer_name == "per_anchor":
        pytest.skip("PML 2.9 fails here itself: its lifted-structure pair terms are (P, 1), which its reducer rejects")
    for dist_name in LOSSES[name][1]:
        for shape in SHAPES:
            for seed in range(2 if reducer_name == "default" else 1):
                emb, labels = _batch(*shape, seed=10 * seed + shape[0])
                ours, theirs = _make(name, dist_name, reducer_name)
                _run(ours, theirs, emb, labels)
    # the default distance with a reducer the op computes runs natively (PML's lifted structure: from the
    # engine's row statistics, with any reducer)
    if reducer_name in ("default", "mean", "sum", "avg_nonzero") or name != "NTXentLoss":
        assert native_ops.get("engine", 0) > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_default_construction_float32(name, native_ops):
    """PML's defaults (arguments, distance, reducer) on float32 and int32 labels, to float32 rounding."""
    ours, theirs = getattr(losses, name)(), getattr(pml_losses, name)()
    for seed in range(3):
        emb, labels = _batch(32, 16, 6, seed, dtype=torch.float32)
        _run(ours, theirs, emb, labels.int(), atol=1e-5, rtol=1e-4)
    assert native_ops.get("engine", 0) >= 3


def _indices_cases(b, r, seed):
    """indices_tuples: 4-tuples with duplicates, 3-tuples, a single pair (PML: zero loss), empty."""
    g = torch.Generator().manual_seed(seed)
    a1 = torch.randint(0, b, (25,), generator=g)
    p = torch.randint(0, r, (25,), generator=g)
    a2 = torch.randint(0, b, (30,), generator=g)
    n = torch.randint(0, r, (30,), generator=g)
    key_pos = set(zip(a1.tolist(), p.tolist()))
    keep = torch.tensor([(x, y) not in key_pos for x, y in zip(a2.tolist(), n.tolist())])
    a2, n = a2[keep], n[keep]  # a pair may not be both positive and negative (PML asserts)
    a1, p = torch.cat([a1, a1[:3]]), torch.cat([p, p[:3]])  # listed twice
    tn = torch.randint(0, r, (a1.shape[0],), generator=g)
    ok = torch.tensor([(x, y) not in key_pos for x, y in zip(a1.tolist(), tn.tolist())])
    trip = (a1[ok], p[ok], tn[ok])
    single = (a1[:1], p[:1], a2[:1], n[:1])
    empty = tuple(torch.empty(0, dtype=torch.long) for _ in range(4))
    return [(a1, p, a2, n), trip, single, empty, (a1, p, a2[:0], n[:0]), (a1[:0], p[:0], a2, n)]


@pytest.mark.parametrize("name", list(LOSSES))
def test_indices_tuple_and_ref_emb(name, native_ops):
    for dist_name in LOSSES[name][1][:2]:
        for seed in range(2):
            emb, labels = _batch(12, 5, 3, seed)
            ref, ref_labels = _batch(9, 5, 3, seed + 50)
            # PerAnchorReducer on one seed (PML's own fails on its lifted-structure terms)
            reducers = ("default", "per_anchor") if seed == 0 and name != "LiftedStructureLoss" else ("default",)
            for reducer_name in reducers:
                ours, theirs = _make(name, dist_name, reducer_name)
                for idx in _indices_cases(12, 12, seed):
                    _run(ours, theirs, emb, labels, indices=(idx, idx))
                    _run(ours, theirs, emb, None, indices=(idx, idx))
                engine_calls = native_ops.get("engine", 0)
                _run(ours, theirs, emb, labels, ref_emb=ref, ref_labels=ref_labels)
                # per-anchor losses with the default distance: the engine, rows against the reference set
                default_distance = "lp" if "Lifted" in name else "cosine"
                on_engine = dist_name == default_distance and name not in ("NTXentLoss", "LiftedStructureLoss")
                assert (native_ops.get("engine", 0) > engine_calls) == on_engine, (name, dist_name)
                _run(ours, theirs, emb, labels, ref_emb=emb.clone(), ref_labels=labels)  # PML drops (i, i) here
                for idx in _indices_cases(12, 9, seed):
                    _run(ours, theirs, emb, labels, ref_emb=ref, ref_labels=ref_labels, indices=(idx, idx))


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("dist_name", ["cosine", "lp"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_with_multi_similarity_miner_output(name, dist_name, epsilon, native_ops):
    """Each loss given each library's own MultiSimilarityMiner output (ours lazy, fused for MS + cosine)."""
    if dist_name not in LOSSES[name][1]:
        pytest.skip("PML refuses this distance for this loss")
    for shape in [(16, 6, 4), (10, 4, 10), (6, 3, 1), (12, 2, 3)]:
        for seed in range(2):
            emb, labels = _batch(*shape, seed=seed + 7)
            ours, theirs = _make(name, dist_name, "default")
            dkw, dcls = DISTANCE_KW[dist_name]
            our_miner = miners.MultiSimilarityMiner(epsilon, distance=getattr(distances, dcls)(**dkw))
            pml_miner = pml_miners.MultiSimilarityMiner(epsilon, distance=getattr(pml_distances, dcls)(**dkw))
            _run(
                ours,
                theirs,
                emb,
                labels,
                indices=(lambda e, _r: our_miner(e, labels), lambda e, _r: pml_miner(e, labels)),
            )
    if name == "MultiSimilarityLoss" and dist_name == "cosine":
        assert native_ops.get("multi_similarity_loss", 0) == 8  # fused: one native call, no listed pairs


def test_miner_fused_only_when_exact(native_ops):
    """The fused MS path is taken only for the very tensor mined, unchanged; otherwise the pairs are listed."""
    emb, labels = _batch(12, 4, 3, 1)
    loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(0.2)
    mined = miner(emb, labels)
    assert not mined.is_materialized
    fused = loss(emb, labels, mined)
    assert native_ops["multi_similarity_loss"] == 1 and not mined.is_materialized
    listed = loss(emb, labels, tuple(mined))
    torch.testing.assert_close(fused, listed, atol=1e-12, rtol=1e-12)
    other = emb.clone()
    assert native_ops["multi_similarity_loss"] == 1
    theirs = pml_losses.MultiSimilarityLoss()(other, labels, pml_miners.MultiSimilarityMiner(0.2)(emb, labels))
    torch.testing.assert_close(loss(other, labels, mined), theirs, atol=1e-12, rtol=1e-12)
    assert native_ops["multi_similarity_loss"] == 1  # another tensor: listed pairs
    emb.mul_(2.0)
    torch.testing.assert_close(loss(emb, labels, mined), pml_losses.MultiSimilarityLoss()(emb, labels, tuple(mined)))
    assert native_ops["multi_similarity_loss"] == 1  # modified in place: listed pairs
    # written through .data, which leaves the version counter alone: the values tell
    emb, labels = _batch(12, 4, 3, 2)
    mined, before = miner(emb, labels), emb.clone()
    emb.data.add_(torch.linspace(-1.0, 1.0, emb.numel(), dtype=emb.dtype).view_as(emb))
    theirs = pml_losses.MultiSimilarityLoss()(emb, labels, pml_miners.MultiSimilarityMiner(0.2)(before, labels))
    torch.testing.assert_close(loss(emb, labels, mined), theirs, atol=1e-12, rtol=1e-12)
    assert native_ops["multi_similarity_loss"] == 1


def _unit(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


def test_fused_miner_single_kept_pair_gives_zero():
    # S01 = 0.5, S02 = 0.45, S12 = 0.3, epsilon = 0.1: the miner keeps only (0, 1) and (0, 2); PML's loss is then 0
    y = (0.3 - 0.5 * 0.45) / 0.75**0.5
    emb = torch.stack(
        [_unit([1.0, 0.0, 0.0]), _unit([0.5, 0.75**0.5, 0.0]), _unit([0.45, y, (1 - 0.45**2 - y**2) ** 0.5])]
    )
    labels = torch.tensor([0, 0, 1])
    theirs = pml_losses.MultiSimilarityLoss()(emb, labels, pml_miners.MultiSimilarityMiner(0.1)(emb, labels))
    assert theirs.item() == 0.0
    assert losses.MultiSimilarityLoss()(emb, labels, tuple(miners.MultiSimilarityMiner(0.1)(emb, labels))).item() == 0
    assert losses.MultiSimilarityLoss()(emb, labels, miners.MultiSimilarityMiner(0.1)(emb, labels)).item() == 0.0


@pytest.mark.parametrize("dist_name", ["cosine", "lp", "lp_raw", "lp_power2"])
def test_multi_similarity_miner_matches_pml(dist_name):
    """The same pairs as PML's miner (as sets, per anchor), with and without a reference set."""
    dkw, dcls = DISTANCE_KW[dist_name]
    for epsilon in (0.0, 0.1, 0.7):
        for shape in [(20, 5, 4), (9, 4, 9), (7, 3, 1), (1, 3, 1)]:
            for seed in range(2):
                emb, labels = _batch(*shape, seed=seed)
                ref, ref_labels = _batch(13, shape[1], 4, seed + 3)
                ours = miners.MultiSimilarityMiner(epsilon, distance=getattr(distances, dcls)(**dkw))
                theirs = pml_miners.MultiSimilarityMiner(epsilon, distance=getattr(pml_distances, dcls)(**dkw))
                for call in ({}, {"ref_emb": ref, "ref_labels": ref_labels}, {"ref_emb": emb, "ref_labels": labels}):
                    got, want = ours(emb, labels, **call), theirs(emb, labels, **call)
                    assert len(got) == 4
                    for k in (0, 2):
                        assert got[k].dtype == torch.int64
                        assert sorted(zip(got[k].tolist(), got[k + 1].tolist())) == sorted(
                            zip(want[k].tolist(), want[k + 1].tolist())
                        )


def test_miner_no_positive_or_no_negative_gives_nothing():
    emb = torch.randn(6, 3, dtype=torch.float64)
    for labels in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
        out = miners.MultiSimilarityMiner()(emb, labels)
        assert all(len(t) == 0 for t in out)


def test_attributes_changed_after_construction_take_effect():
    emb, labels = _batch(10, 4, 3, 0)
    for name, attr, value in (
        ("SupConLoss", "temperature", 0.5),
        ("NTXentLoss", "temperature", 0.5),
        ("MultiSimilarityLoss", "base", 0.1),
        ("CircleLoss", "gamma", 30.0),
        ("GeneralizedLiftedStructureLoss", "neg_margin", 0.6),
        ("LiftedStructureLoss", "pos_margin", 0.3),
    ):
        ours, theirs = getattr(losses, name)(), getattr(pml_losses, name)()
        setattr(ours, attr, value)
        setattr(theirs, attr, value)
        _run(ours, theirs, emb, labels)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: losses.SupConLoss(collect_stats=True), "collect_stats"),
        (lambda: losses.NTXentLoss(embedding_regularizer=object()), "embedding_regularizer"),
        (lambda: losses.MultiSimilarityLoss(reducer=pml_reducers.MeanReducer()), "reducer"),
        (lambda: losses.LiftedStructureLoss(distance=pml_distances.LpDistance()), "distance"),
        (lambda: losses.GeneralizedLiftedStructureLoss(embedding_reg_weight=1), "embedding_reg_weight"),
        (lambda: miners.MultiSimilarityMiner(collect_stats=True), "collect_stats"),
        (lambda: miners.MultiSimilarityMiner(distance=pml_distances.CosineSimilarity()), "distance"),
    ],
)
def test_unsupported_arguments(make, match):
    with pytest.raises(NotImplementedError, match=match):
        make()


def test_bad_calls():
    with pytest.raises(ValueError, match="CosineSimilarity"):
        losses.CircleLoss(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        losses.SupConLoss()(torch.randn(3, 2))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of length 3"):
        losses.NTXentLoss()(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="either positive or negative"):
        idx = torch.tensor([0])
        losses.MultiSimilarityLoss()(
            torch.randn(3, 2), None, (torch.tensor([0, 1]), torch.tensor([1, 0]), idx, idx + 1)
        )
    with pytest.raises(ValueError, match="epsilon"):
        miners.MultiSimilarityMiner(float("nan"))


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_row_blocks_match_pml(name, monkeypatch):
    """Every pair with another distance or a reference set: PML's matrix in row blocks (here 1-3 rows each,
    recomputed in the backward), the same values and gradients."""
    from metricops.pml import _listed_pairs

    monkeypatch.setattr(_listed_pairs, "_DENSE_BLOCK_ELEMENTS", 20)
    emb, labels = _batch(13, 5, 4, 3)
    ref, ref_labels = _batch(9, 5, 4, 4)
    for dist_name in LOSSES[name][1]:
        for reducer_name in ("default", "threshold"):
            ours, theirs = _make(name, dist_name, reducer_name)
            _run(ours, theirs, emb, labels)
            _run(ours, theirs, emb, labels, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("name", ["NTXentLoss", "LiftedStructureLoss"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_pair_losses_on_the_sparse_positive_path_match_pml(name, with_ref, native_ops):
    """Few positives per row (here 2-3 of 48, under 1/16 of the entries): the CPU engine evaluates NT-Xent's and
    lifted structure's pair passes on the positive pairs alone, as dot products (forward and backward, ref_emb's
    gradient summed per column). Against PML itself, values and gradients, with duplicated rows (zero distance)."""
    if name == "LiftedStructureLoss" and with_ref:
        pytest.skip("the engine's lifted_pairs pass pairs rows with rows: with ref_emb the drop-in lists pairs instead")
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(48, 8, generator=g, dtype=torch.float64)
    labels = torch.randperm(48, generator=g) // 3  # 16 classes of 3
    labels[labels == 15] = 14  # one class of 6
    emb[7] = emb[labels.tolist().index(int(labels[7]))]  # a duplicated row of its own class
    call = {}
    if with_ref:
        call = {"ref_emb": torch.randn(40, 8, generator=g, dtype=torch.float64), "ref_labels": torch.arange(40) // 2}
    ours, theirs = getattr(losses, name)(), getattr(pml_losses, name)()
    _run(ours, theirs, emb, labels, **call)


@pytest.mark.parametrize("name", ["GeneralizedLiftedStructureLoss", "LiftedStructureLoss"])
def test_lifted_losses_with_zero_rows_match_pml(name):
    """F.normalize leaves a zero row at 0, at distance 1 from every unit row (and 0 from another zero row), not
    sqrt(2 - 2s) = sqrt(2): the engine's distance policies add each row's offset (1 - ||x̂||²)/2 to s. Values and
    gradients against PML itself (which takes torch.cdist of the normalized rows), two zero rows in one class."""
    emb, labels = _batch(14, 6, 4, seed=11)
    emb[2] = 0
    emb[labels.tolist().index(int(labels[2]), 3)] = 0  # another zero row, in row 2's class
    emb[9] = 0
    ours, theirs = getattr(losses, name)(), getattr(pml_losses, name)()
    _run(ours, theirs, emb, labels)


def test_generalized_lifted_with_zero_rows_in_ref_emb_matches_pml():
    """With ref_emb the distance offsets come from each side's own rows (more columns than rows here, zero rows
    on both sides), against PML itself."""
    emb, labels = _batch(6, 4, 3, seed=12)
    emb[1] = 0
    g = torch.Generator().manual_seed(13)
    ref_emb, ref_labels = torch.randn(15, 4, generator=g, dtype=torch.float64), torch.arange(15) % 3
    ref_emb[[0, 7, 13]] = 0
    ours, theirs = losses.GeneralizedLiftedStructureLoss(), pml_losses.GeneralizedLiftedStructureLoss()
    _run(ours, theirs, emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)


def test_multi_similarity_log1p_is_exact_above_softplus_threshold():
    """MS's (1/β)·log(1 + Σ_n e^{β(s - base)}) with the negatives' LSE above 20 (β = 50, base = 0.5: s near 1):
    F.softplus would return its argument there, off by up to e^-20; PML's logsumexp(add_one=True) is exact."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).repeat_interleave(3, 0)
    x = x + 1e-3 * torch.randn(12, 6, generator=g, dtype=torch.float64)  # near-duplicates across classes
    labels = torch.arange(12)  # every other row a negative: four of them at s ≈ 1 (LSE ≈ 25 + log 2)
    want = pml_losses.MultiSimilarityLoss()(x, labels)
    for got in (metricops.multi_similarity_loss(x, labels), metricops.pml.losses.MultiSimilarityLoss()(x, labels)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_mean_nonzero_counts_the_terms_pml_rounds_to_zero():
    """AvgNonZeroReducer averages the terms > 0. NT-Xent's pair terms log(1 + Σ_n e^{z_in − z_ip}) are all > 0,
    and metricops counts them all; PML computes −log(num/den + tiny), exactly 0 once the sum falls below half
    an ulp of 1, and leaves those pairs out of its count (documented in metricops/reference/similarity.py).
    Here, at τ = 0.01, four ordered pairs have terms of ~2e-22 and two of ~3e-11."""
    c = 0.75**0.5
    x = torch.tensor(
        [[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0.5, 0, c], [0, 0.5, c]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    z = (x @ x.T) / 0.01
    terms = []
    for i in range(6):
        for p in range(6):
            if p != i and labels[p] == labels[i]:
                negatives = z[i][labels != labels[i]]
                terms.append(torch.log1p(torch.exp(torch.logsumexp(negatives, 0) - z[i, p])))  # exact when tiny
    terms = torch.stack(terms)
    assert (terms > 0).all() and (terms < 1e-20).sum() == 4 and (terms > 1e-12).sum() == 2
    ours = losses.NTXentLoss(temperature=0.01, reducer=reducers.AvgNonZeroReducer())(x, labels)
    torch.testing.assert_close(ours, terms.sum() / 6, rtol=1e-9, atol=0)
    pml = pml_losses.NTXentLoss(temperature=0.01, reducer=pml_reducers.AvgNonZeroReducer())(x, labels)
    # PML: the two pairs it sees as > 0 (its own terms carry ~1e-5 relative rounding at this size)
    torch.testing.assert_close(pml, terms.sum() / 2, rtol=1e-3, atol=0)


def test_ntxent_listed_pair_terms_keep_tiny_values():
    """The listed-pairs path (LpDistance, ref_emb) computes each term as log(1 + e^{L - z}): a term of 3e-16 stays
    3e-16 (logaddexp(z, L) - z made it 0, and AvgNonZeroReducer then divided by one term fewer than PML)."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 2, (6,), generator=g)
    x, ref = (torch.randn(6, 2, dtype=torch.float64, generator=g) for _ in range(2))
    z = -torch.cdist(x, ref)  # LpDistance's similarity is -d; τ = 0.07 (the default)
    z = z / 0.07
    terms = []
    for i in range(6):
        negatives = z[i][labels != labels[i]]
        for p in range(6):
            if labels[p] == labels[i] and p != i:  # (ref_labels is labels: PML drops the pairs (i, i))
                terms.append(torch.log1p(torch.exp(torch.logsumexp(negatives, 0) - z[i, p])))
    terms = torch.stack(terms)
    assert (terms < 1e-15).any() and (terms > 0).all()  # the regime: a tiny, nonzero term
    kw = {"reducer": reducers.AvgNonZeroReducer(), "distance": distances.LpDistance(normalize_embeddings=False)}
    ours = losses.NTXentLoss(**kw)(x, labels, ref_emb=ref, ref_labels=labels)
    torch.testing.assert_close(ours, terms.mean(), rtol=1e-12, atol=0)
    kw = {"reducer": pml_reducers.AvgNonZeroReducer(), "distance": pml_distances.LpDistance(normalize_embeddings=False)}
    theirs = pml_losses.NTXentLoss(**kw)(x, labels, ref_emb=ref, ref_labels=labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=0)


def test_ntxent_pair_terms_above_pml_float32_cap_stay_exact():
    """PML's NT-Xent term −log(num/den + tiny) cannot exceed −log(tiny) (87.3 in float32): at τ = 0.01 a
    positive 1 below a negative in similarity has a term of ~100, which PML's float32 caps. metricops'
    float32 terms stay within float32 rounding of the float64 value. Here two of the four pair terms are
    ~100 (the mean is ~63; PML's float32 gives ~57)."""
    x = torch.tensor([[1.0, 0, 0], [-0.5, 0.866, 0], [0.5, 0.866, 0], [0, 0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    exact = metricops.reference.ntxent_loss(x, labels, temperature=0.01)
    assert exact > 60
    for loss in (
        metricops.ntxent_loss(x.float(), labels, temperature=0.01),
        losses.NTXentLoss(temperature=0.01)(x.float(), labels),
    ):
        torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
    capped = pml_losses.NTXentLoss(temperature=0.01)(x.float(), labels)
    assert capped < exact - 5  # PML's float32 value: both ~100 terms capped at 87.3


@pytest.mark.parametrize("name", list(LOSSES))
def test_listed_indices_count_from_the_end_and_out_of_range_raises(name):
    """indices_tuple as PML's tensor indexing reads it: -1 is the last row, and an index past the batch raises
    IndexError. The listed-pairs path keyed each pair as a·B + b, so p = -1 or 7 (B = 6) aliased another pair:
    a wrong finite loss, or a backward that raised."""
    emb, labels = _batch(6, 3, 3, 0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    t = torch.tensor
    for indices in ((t([0, 1]), t([1, -1]), t([3, 2])), (t([0, -5]), t([1, 0]), t([0, 2]), t([2, 3]))):
        _run(*_make(name, None, "default"), emb, labels, indices=(indices, indices))
    ours, _ = _make(name, None, "default")
    with pytest.raises(IndexError, match="indices_tuple: index 7 is out of bounds"):
        ours(emb, labels, indices_tuple=(t([0, 1]), t([1, 7]), t([3, 2])))


@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_batch_with_reducers_of_per_anchor_terms_is_zero(name):
    """B = 0 through the reducers that reduce the per-anchor vector (PerAnchorReducer, MultipleReducers): PML's
    zero loss (at most one pair listed), not the NaN mean of no term; attached, with a zero gradient."""
    for make in (lambda m: m.PerAnchorReducer(), lambda m: m.MultipleReducers({"loss": m.MeanReducer()})):
        ours = getattr(losses, name)(reducer=make(reducers))
        theirs = getattr(pml_losses, name)(reducer=make(pml_reducers))
        for b in (0, 1):
            emb = torch.randn(b, 4, dtype=torch.float64, requires_grad=True)
            labels = torch.zeros(b, dtype=torch.long)
            got = ours(emb, labels)
            assert got.item() == 0.0 == theirs(emb, labels).item()
            (grad,) = torch.autograd.grad(got, emb, allow_unused=True)
            assert grad is None or not grad.any()


@pytest.mark.parametrize("name", ["GeneralizedLiftedStructureLoss", "LiftedStructureLoss", "SupConLoss"])
def test_lp_distance_takes_half_precision_on_cpu(name):
    """float16 with an LpDistance on CPU ran into the native distance's "x must be float32 or float64" (naming
    an internal argument) while the cosine paths took it. Now computed in float32 and rounded once: no farther
    from PML's float64 value than PML's own float16 run."""
    emb, labels = _batch(16, 8, 4, 6, dtype=torch.float32)
    kw = {"distance": None} if name != "SupConLoss" else {}
    ours = getattr(losses, name)(distance=distances.LpDistance(), **{k: v for k, v in kw.items() if v})
    theirs = getattr(pml_losses, name)(distance=pml_distances.LpDistance())
    exact = theirs(emb.double(), labels).item()
    pml_error = abs(theirs(emb.half(), labels).item() - exact)
    got = ours(emb.half(), labels)
    assert got.dtype == torch.float16
    assert abs(got.item() - exact) <= 2 * pml_error + 2 * torch.finfo(torch.float16).eps * abs(exact)


def test_circle_loss_reads_m_at_each_call():
    """The documented difference: PML's CircleLoss derives op, on, Δp, Δn from m at construction (setting m later
    changes nothing there); metricops' reads m at each call, as its other attributes."""
    emb, labels = _batch(10, 4, 3, 0)
    changed = losses.CircleLoss()
    changed.m = 0.1
    torch.testing.assert_close(changed(emb, labels), losses.CircleLoss(m=0.1)(emb, labels), rtol=1e-12, atol=0)
    pml_changed = pml_losses.CircleLoss()
    pml_changed.m = 0.1
    torch.testing.assert_close(pml_changed(emb, labels), pml_losses.CircleLoss()(emb, labels), rtol=1e-12, atol=0)
