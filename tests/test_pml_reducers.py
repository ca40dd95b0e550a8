"""metricops.pml.reducers against pytorch-metric-learning 2.9's reducers: directly on loss dicts, and as
``reducer=`` of every metricops.pml loss (values and gradients)."""

import pytest
import torch

from common import assert_close, labelled_batch_with_reference
from metricops.pml import distances, losses, miners, reducers

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402


def _both(name, *args, inner=None, **kwargs):
    """(ours, theirs) instances of reducer ``name``; ``inner``: the name of PerAnchorReducer's reducer."""
    if inner is not None:
        ours_inner, theirs_inner = _both(inner)
        return (
            getattr(reducers, name)(*args, reducer=ours_inner, **kwargs),
            getattr(pml_reducers, name)(*args, reducer=theirs_inner, **kwargs),
        )
    return getattr(reducers, name)(*args, **kwargs), getattr(pml_reducers, name)(*args, **kwargs)


REDUCERS = {
    "mean": lambda: _both("MeanReducer"),
    "sum": lambda: _both("SumReducer"),
    "avg_nonzero": lambda: _both("AvgNonZeroReducer"),
    "threshold_low": lambda: _both("ThresholdReducer", low=0.3),
    "threshold_high": lambda: _both("ThresholdReducer", high=0.5),
    "threshold_band": lambda: _both("ThresholdReducer", low=-0.2, high=0.8),
    "per_anchor_mean": lambda: _both("PerAnchorReducer"),
    "per_anchor_sum": lambda: _both("PerAnchorReducer", inner="SumReducer"),
    "per_anchor_avg_nonzero": lambda: _both("PerAnchorReducer", inner="AvgNonZeroReducer"),
}


def _loss_dict(reduction_type, losses_, batch=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(losses_)
    if reduction_type == "element":
        indices = torch.randperm(batch, generator=gen)[:n]
    elif reduction_type == "triplet":
        indices = tuple(torch.randint(0, batch, (n,), generator=gen) for _ in range(3))
    else:  # distinct pairs: which of two duplicates PML keeps is index_put_'s choice
        flat = torch.randperm(batch * batch, generator=gen)[:n]
        indices = (flat // batch, flat % batch)
    return {"loss": {"losses": losses_, "indices": indices, "reduction_type": reduction_type}}


def _reduce_both(ours, theirs, reduction_type, values, batch=10):
    """Value and gradients (losses, embeddings) of both reducers on the same loss dict."""
    out = []
    for reducer in (ours, theirs):
        emb = torch.randn(batch, 3, dtype=values.dtype, generator=torch.Generator().manual_seed(9)).requires_grad_()
        terms = values.clone().requires_grad_()
        value = reducer(_loss_dict(reduction_type, terms * 1, batch), emb, torch.arange(batch))
        grads = torch.autograd.grad(value, (terms, emb), allow_unused=True)
        out.append((value, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (terms, emb))]))
    return out


VALUES = {
    "mixed": torch.tensor([0.0, 0.7, -0.3, 0.2, 0.0, 1.4, 0.45, 0.31], dtype=torch.float64),
    "all_zero": torch.zeros(5, dtype=torch.float64),
    "none_in_band": torch.tensor([2.0, 3.0, -1.0], dtype=torch.float64),
    "empty": torch.zeros(0, dtype=torch.float64),
}


@pytest.mark.parametrize("reducer_name", list(REDUCERS))
@pytest.mark.parametrize("reduction_type", ["element", "pos_pair", "neg_pair", "triplet"])
@pytest.mark.parametrize("values_name", list(VALUES))
def test_reducers_match_pml(reducer_name, reduction_type, values_name):
    ours, theirs = REDUCERS[reducer_name]()
    values = VALUES[values_name]
    if reducer_name.startswith("per_anchor") and reduction_type == "triplet":
        for reducer in (ours, theirs):
            with pytest.raises(NotImplementedError, match="Triplet reduction not supported"):
                _reduce_both(reducer, reducer, reduction_type, values)
        return
    (v1, g1), (v2, g2) = _reduce_both(ours, theirs, reduction_type, values)
    assert v1.dtype == v2.dtype and v1.shape == v2.shape
    torch.testing.assert_close(v1, v2, equal_nan=True)  # MeanReducer of no term is NaN in both
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("reducer_name", list(REDUCERS))
def test_zero_loss_marker_and_already_reduced(reducer_name):
    for reduction_type, losses_ in (("already_reduced", 0), ("already_reduced", torch.tensor(0.75))):
        outs = []
        for reducer in REDUCERS[reducer_name]():
            emb = torch.ones(4, 2, requires_grad=True)
            value = reducer({"loss": {"losses": losses_, "indices": None, "reduction_type": reduction_type}}, emb, None)
            outs.append(value)
        assert_close(outs[0], outs[1])
        if not torch.is_tensor(losses_):  # the zero loss is attached to the embeddings' graph
            assert outs[0].requires_grad


def test_per_anchor_custom_aggregation_and_float32():
    def max_per_row(x, num_per_row):
        return x.max(dim=1).values

    ours = reducers.PerAnchorReducer(aggregation_func=max_per_row)
    theirs = pml_reducers.PerAnchorReducer(aggregation_func=max_per_row)
    (v1, g1), (v2, g2) = _reduce_both(ours, theirs, "pos_pair", VALUES["mixed"].float())
    assert v1.dtype == torch.float32
    assert_close(v1, v2)
    assert_close(g1[0], g2[0])


def test_do_nothing_and_multiple_reducers():
    loss_dict = _loss_dict("pos_pair", VALUES["mixed"])
    emb = torch.randn(10, 3)
    assert reducers.DoNothingReducer()(loss_dict, emb, None) is loss_dict
    two = {
        "pos_loss": _loss_dict("pos_pair", VALUES["mixed"])["loss"],
        "neg_loss": _loss_dict("neg_pair", VALUES["mixed"].flip(0), seed=1)["loss"],
    }
    ours = reducers.MultipleReducers({"pos_loss": reducers.SumReducer()}, default_reducer=reducers.AvgNonZeroReducer())
    theirs = pml_reducers.MultipleReducers(
        {"pos_loss": pml_reducers.SumReducer()}, default_reducer=pml_reducers.AvgNonZeroReducer()
    )
    assert_close(ours(two, emb, None), theirs(two, emb, None))
    with pytest.raises(ValueError, match="loss dict with one entry, got 2"):
        reducers.MeanReducer()(two, emb, None)


def test_bad_reducer_arguments():
    with pytest.raises(ValueError, match="ThresholdReducer needs low or high"):
        reducers.ThresholdReducer()
    with pytest.raises(NotImplementedError, match="collect_stats"):
        reducers.MeanReducer(collect_stats=True)
    with pytest.raises(NotImplementedError, match="reducer"):
        reducers.PerAnchorReducer(reducer=pml_reducers.MeanReducer())
    with pytest.raises(NotImplementedError, match="reducer"):
        losses.TripletMarginLoss(reducer=pml_reducers.MeanReducer())
    bad = {"loss": {"losses": torch.ones(3), "indices": torch.arange(2), "reduction_type": "element"}}
    with pytest.raises(ValueError, match="one entry per loss"):
        reducers.MeanReducer()(bad, torch.ones(3, 2), None)
    bad = {"loss": {"losses": torch.ones(3), "indices": torch.arange(3), "reduction_type": "pairs"}}
    with pytest.raises(ValueError, match="reduction_type must be one of"):
        reducers.MeanReducer()(bad, torch.ones(3, 2), None)


# ------------------------------------------------------------------ as reducer= of the losses


def _loss_cases(seed=0):
    x, labels, ref, ref_labels = labelled_batch_with_reference(seed, 12, 7, 5, dtype=torch.float64)
    yield "all", x, labels, {}
    yield "ref", x, labels, dict(ref_emb=ref, ref_labels=ref_labels)
    yield "miner", x, labels, dict(indices_tuple="miner")
    yield (
        "pairs",
        x,
        labels,
        dict(
            indices_tuple=(
                torch.tensor([0, 1, 1]),
                torch.tensor([3, 4, 5]),
                torch.tensor([1, 0, 2, 2]),
                torch.tensor([6, 7, 0, 9]),
            )
        ),
    )
    yield "no_pair", x[:1], labels[:1], {}


LOSSES = {
    "triplet": lambda lib, dist, reducer: lib.TripletMarginLoss(margin=0.3, distance=dist, reducer=reducer),
    "triplet_smooth_swap": lambda lib, dist, reducer: lib.TripletMarginLoss(
        margin=0.1, swap=True, smooth_loss=True, distance=dist, reducer=reducer
    ),
    "contrastive": lambda lib, dist, reducer: lib.ContrastiveLoss(
        pos_margin=0.2, neg_margin=0.9, distance=dist, reducer=reducer
    ),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reducer_name", list(REDUCERS) + ["do_nothing", "multiple"])
@pytest.mark.parametrize("dist_name", ["LpDistance", "CosineSimilarity"])
def test_losses_with_reducers_match_pml(loss_name, reducer_name, dist_name):
    for case, x, labels, call in _loss_cases():
        if reducer_name == "do_nothing":
            pair = (reducers.DoNothingReducer(), pml_reducers.DoNothingReducer())
        elif reducer_name == "multiple":
            pair = (
                reducers.MultipleReducers({"pos_loss": reducers.SumReducer()}),
                pml_reducers.MultipleReducers({"pos_loss": pml_reducers.SumReducer()}),
            )
        else:
            pair = REDUCERS[reducer_name]()
        if reducer_name.startswith("per_anchor") and (case == "ref" or loss_name.startswith("triplet")):
            continue  # PML: triplet terms are refused; pair terms with ref_emb index a B×B matrix by ref rows
        results = []
        for lib, lib_miners, dist_lib, reducer in (
            (losses, miners, distances, pair[0]),
            (pml_losses, pml_miners, pml_distances, pair[1]),
        ):
            e = x.clone().requires_grad_()
            kw = dict(call)
            if kw.get("indices_tuple") == "miner":
                miner = lib_miners.TripletMarginMiner(0.4, distance=getattr(dist_lib, dist_name)())
                kw["indices_tuple"] = miner(e, labels)
            out = LOSSES[loss_name](lib, getattr(dist_lib, dist_name)(), reducer)(e, labels, **kw)
            results.append((e, out))
        (e1, o1), (e2, o2) = results
        if reducer_name == "do_nothing":  # the loss dicts themselves
            assert o1.keys() == o2.keys()
            for name in o1:
                assert o1[name]["reduction_type"] == o2[name]["reduction_type"]
                t1, t2 = o1[name]["losses"], o2[name]["losses"]
                if torch.is_tensor(t2):
                    assert_close(t1, t2)
                else:
                    assert t1 == t2
            continue
        assert_close(o1, o2, atol=1e-10, rtol=1e-9)
        g1 = torch.autograd.grad(o1, e1, allow_unused=True)[0]
        g2 = torch.autograd.grad(o2, e2, allow_unused=True)[0]
        assert_close(
            torch.zeros_like(e1) if g1 is None else g1,
            torch.zeros_like(e2) if g2 is None else g2,
            atol=1e-10,
            rtol=1e-9,
        )
