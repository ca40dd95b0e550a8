"""pytorch-metric-learning 2.9 reducers: how a loss's per-element terms become one number.

A metricops.pml loss hands its reducer PML's loss dict,
``{name: {"losses": tensor or 0, "indices": ..., "reduction_type": ...}}``
(``reduction_type``: ``"element"``, ``"pos_pair"``, ``"neg_pair"``,
``"triplet"`` or ``"already_reduced"``), and returns what the reducer returns.
A loss with several sub-losses (ContrastiveLoss: ``pos_loss``, ``neg_loss``)
reduces each with its own copy of the reducer and sums them, as PML does.

A subclass may override ``element_reduction`` etc. as in PML; each gets
``(losses, loss_indices, embeddings, labels)``.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch

from .._reduction import accumulation_dtype, mean_of_sum
from ._common import refuse_unsupported

REDUCTION_TYPES = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """PML's zero: 0 in the embeddings' dtype, attached to their graph (its gradient is 0)."""
    return torch.sum(embeddings * 0)


class BaseReducer(torch.nn.Module):
    """PML's BaseReducer: dispatches one loss dict entry to ``<reduction_type>_reduction``."""

    def __init__(self, **kwargs):
        super().__init__()
        refuse_unsupported(f"reducers.{type(self).__name__}", kwargs)

    def forward(self, loss_dict: Dict[str, dict], embeddings: torch.Tensor, labels: Optional[torch.Tensor]):
        if len(loss_dict) != 1:
            raise ValueError(
                f"reducers.{type(self).__name__} reduces a loss dict with one entry, got {len(loss_dict)} "
                f"({', '.join(loss_dict)}); use reducers.MultipleReducers for several"
            )
        (info,) = loss_dict.values()
        return self.reduce_the_loss(info["losses"], info["indices"], info["reduction_type"], embeddings, labels)

    def reduce_the_loss(self, losses, loss_indices, reduction_type, embeddings, labels):
        if not torch.is_tensor(losses) and losses == 0:  # PML's "no terms" marker
            return zero_loss(embeddings)
        if reduction_type not in REDUCTION_TYPES:
            raise ValueError(f"reduction_type must be one of {', '.join(REDUCTION_TYPES)}, got {reduction_type!r}")
        _check_sizes(losses, loss_indices, reduction_type)
        return getattr(self, f"{reduction_type}_reduction")(losses, loss_indices, embeddings, labels)

    def already_reduced_reduction(self, losses, loss_indices, embeddings, labels):
        return losses

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        raise NotImplementedError

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self.element_reduction(losses, loss_indices, embeddings, labels)

    def neg_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self.element_reduction(losses, loss_indices, embeddings, labels)

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        return self.element_reduction(losses, loss_indices, embeddings, labels)


def _check_sizes(losses, loss_indices, reduction_type):
    """PML's assert_sizes_*, as ValueErrors."""
    if reduction_type == "already_reduced":
        if losses.ndim != 0 and len(losses) != 1:
            raise ValueError(f"already_reduced losses must hold one value, got shape {tuple(losses.shape)}")
        return
    if not torch.is_tensor(losses) or losses.ndim != 1:
        raise ValueError(f"{reduction_type} losses must be a 1-D tensor")
    arity = {"element": 1, "pos_pair": 2, "neg_pair": 2, "triplet": 3}[reduction_type]
    indices = (loss_indices,) if arity == 1 else loss_indices
    if arity > 1 and (not isinstance(indices, (list, tuple)) or len(indices) != arity):
        raise ValueError(f"{reduction_type} indices must be a tuple of {arity} index tensors")
    if any(len(i) != len(losses) for i in indices):
        raise ValueError(
            f"{reduction_type} indices must hold one entry per loss ({len(losses)}), got lengths "
            f"{[len(i) for i in indices]}"
        )


class MeanReducer(BaseReducer):
    """The mean of every term (NaN for an empty tensor, as PML)."""

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return torch.mean(losses)


class SumReducer(BaseReducer):
    """The sum of every term."""

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return torch.sum(losses)


class ThresholdReducer(BaseReducer):
    """``ThresholdReducer(low=None, high=None)``: the mean of the terms with ``low < loss < high``.

    A missing bound is no bound; with no term inside, the zero loss. Terms
    outside (and NaN terms) get no gradient.
    """

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs low or high (at least one of them)")
        self.low = low
        self.high = high

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            keep &= losses > self.low
        if self.high is not None:
            keep &= losses < self.high
        # torch.where rather than losses[keep]: no host sync for the count.
        count = keep.sum()
        total = torch.where(keep, losses, torch.zeros_like(losses)).sum(dtype=accumulation_dtype(losses.dtype))
        mean = mean_of_sum(total, count, losses.dtype)  # float32 sums for float16/bfloat16
        return torch.where(count > 0, mean, zero_loss(embeddings).to(mean.dtype))


class AvgNonZeroReducer(ThresholdReducer):
    """The mean of the terms > 0 (PML's default for the triplet and contrastive losses)."""

    def __init__(self, **kwargs):
        super().__init__(low=0, **kwargs)


def is_avg_nonzero(reducer) -> bool:
    """Whether ``reducer`` is exactly the default AvgNonZeroReducer (what the fused paths compute)."""
    return type(reducer) is AvgNonZeroReducer and reducer.low == 0 and reducer.high is None


class DoNothingReducer(BaseReducer):
    """Returns the loss dict itself (the loss's per-term values, unreduced)."""

    def forward(self, loss_dict, embeddings, labels):
        return loss_dict


def per_anchor_mean(x: torch.Tensor, num_per_row: torch.Tensor) -> torch.Tensor:
    """PerAnchorReducer's default aggregation: row sums / row counts, 0 for rows without a term."""
    out = torch.sum(x, dim=1) / num_per_row
    return out.masked_fill(num_per_row == 0, 0)


class PerAnchorReducer(BaseReducer):
    """``PerAnchorReducer(reducer=MeanReducer(), aggregation_func=per_anchor_mean)``.

    Pair terms are first aggregated per anchor into a ``(batch_size,)`` vector
    (``aggregation_func(B×B matrix with 0 off the pairs, terms per row)``), which
    ``reducer`` then reduces as element terms. As in PML, a pair listed twice
    keeps one of its values, a term equal to +inf counts as absent, and triplet
    terms raise NotImplementedError.
    """

    def __init__(self, reducer: Optional[BaseReducer] = None, aggregation_func: Callable = per_anchor_mean, **kwargs):
        super().__init__(**kwargs)
        if reducer is not None and not isinstance(reducer, BaseReducer):
            raise NotImplementedError(
                "metricops.pml: reducers.PerAnchorReducer(reducer=...) must be a metricops.pml.reducers reducer, "
                f"got {type(reducer).__module__}.{type(reducer).__name__}"
            )
        self.reducer = MeanReducer() if reducer is None else reducer
        self.aggregation_func = aggregation_func

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        loss_dict = {"loss": {"losses": losses, "indices": loss_indices, "reduction_type": "element"}}
        return self.reducer(loss_dict, embeddings, labels)

    def _per_anchor(self, losses, loss_indices, embeddings, labels):
        batch_size = embeddings.shape[0]
        inf = torch.tensor(float("inf"), dtype=losses.dtype, device=losses.device)
        anchors, others = loss_indices
        per_pair = inf.expand(batch_size, batch_size).index_put((anchors, others), losses)
        absent = per_pair == inf
        num_per_row = batch_size - absent.sum(dim=1)
        output = self.aggregation_func(per_pair.masked_fill(absent, 0), num_per_row)
        anchor_ids = torch.arange(batch_size, device=embeddings.device)
        loss_dict = {"loss": {"losses": output, "indices": anchor_ids, "reduction_type": "element"}}
        return self.reducer(loss_dict, embeddings, labels)

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self._per_anchor(losses, loss_indices, embeddings, labels)

    def neg_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self._per_anchor(losses, loss_indices, embeddings, labels)

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        raise NotImplementedError("Triplet reduction not supported")


class MultipleReducers(BaseReducer):
    """``MultipleReducers({sub_loss_name: reducer}, default_reducer=MeanReducer())``: the sum of the
    sub-losses, each reduced by its own reducer, in the embeddings' dtype."""

    def __init__(self, reducers: Dict[str, BaseReducer], default_reducer: Optional[BaseReducer] = None, **kwargs):
        super().__init__(**kwargs)
        for name, r in list(reducers.items()) + [("default_reducer", default_reducer)]:
            if r is not None and not isinstance(r, BaseReducer):
                raise NotImplementedError(
                    f"metricops.pml: reducers.MultipleReducers: {name} must be a metricops.pml.reducers reducer, "
                    f"got {type(r).__module__}.{type(r).__name__}"
                )
        self.reducers = torch.nn.ModuleDict(reducers)
        self.default_reducer = MeanReducer() if default_reducer is None else default_reducer

    def forward(self, loss_dict, embeddings, labels):
        sub_losses = []
        for name, info in loss_dict.items():
            reducer = self.reducers[name] if name in self.reducers else self.default_reducer
            sub_losses.append(reducer({name: info}, embeddings, labels).to(embeddings.dtype))
        return torch.stack(sub_losses).sum()


class DivisorReducer(BaseReducer):
    """The sum of the terms over the loss dict entry's ``"divisor"`` (a number or a 0-dim tensor; the zero
    loss when it is 0), as PML's DivisorReducer (ProxyAnchorLoss's default)."""

    def forward(self, loss_dict, embeddings, labels):
        if len(loss_dict) != 1:
            return super().forward(loss_dict, embeddings, labels)  # the same refusal as every reducer
        (info,) = loss_dict.values()
        losses = info["losses"]
        if info["reduction_type"] == "already_reduced" or (not torch.is_tensor(losses) and losses == 0):
            return super().forward(loss_dict, embeddings, labels)
        if "divisor" not in info:
            raise ValueError("reducers.DivisorReducer needs a 'divisor' in the loss dict entry")
        _check_sizes(losses, info["indices"], info["reduction_type"])
        divisor = torch.as_tensor(info["divisor"], device=losses.device)
        total = losses.sum(dtype=accumulation_dtype(losses.dtype))
        # where, not a branch on the value: no host sync (torch.compile-friendly).
        nonzero = divisor != 0
        safe_divisor = torch.where(nonzero, divisor, torch.ones_like(divisor)).to(total.dtype)
        out = torch.where(nonzero, total / safe_divisor, zero_loss(embeddings).to(total.dtype))
        return out.to(losses.dtype)


def resolve(reducer, sub_loss_names, default: Callable[[], BaseReducer], cls_name: str) -> BaseReducer:
    """PML's set_reducer: one (deep-copied) reducer per sub-loss, summed by MultipleReducers."""
    if reducer is not None and not isinstance(reducer, BaseReducer):
        raise NotImplementedError(
            f"metricops.pml: {cls_name}(reducer=...) must be a metricops.pml.reducers reducer, "
            f"got {type(reducer).__module__}.{type(reducer).__name__}"
        )
    if isinstance(reducer, (MultipleReducers, DoNothingReducer)):
        return reducer
    make = default if reducer is None else (lambda: copy.deepcopy(reducer))
    if len(sub_loss_names) == 1:
        return make()
    return MultipleReducers({name: make() for name in sub_loss_names})


__all__ = [
    "BaseReducer",
    "MeanReducer",
    "SumReducer",
    "ThresholdReducer",
    "AvgNonZeroReducer",
    "DoNothingReducer",
    "PerAnchorReducer",
    "MultipleReducers",
    "DivisorReducer",
]
