"""torch.nn.Module wrappers of metricops' losses."""

from __future__ import annotations

import torch

from . import _validation as v
from . import triplet as _triplet
from .contrastive import contrastive_loss, pair_contrastive_loss, triplet_margin_loss
from .distance import pairwise_distance


def _check_module_args(kwargs: dict, reductions=v.REDUCTIONS, loss_margin: bool = True) -> None:
    """Refuse bad constructor arguments at construction, with the functionals' wording.

    (forward validates again, as the attributes can be reassigned.)
    """
    for name, value in kwargs.items():
        if name == "metric":
            v.check_metric(value)
        elif name == "reduction":
            v.check_reduction(value, reductions)
        elif name == "memory":
            v.check_memory(value)
        elif name in ("soft", "normalize", "squared", "swap"):
            v.check_flag(value, name)
        elif name == "margin":
            v.check_number(value, name, min_value=0.0 if loss_margin else None, finite=True)
        elif name in ("pos_margin", "neg_margin"):
            v.check_number(value, name)
        elif name == "eps":
            v.check_number(value, name, finite=True)
        elif name == "p":
            v.check_positive_finite(value, name)


class PairwiseDistance(torch.nn.Module):
    """Module form of :func:`metricops.pairwise_distance`."""

    def __init__(self, metric: str = "euclidean", normalize: bool = False):
        super().__init__()
        _check_module_args(dict(metric=metric, normalize=normalize))
        self.metric = metric
        self.normalize = normalize

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return pairwise_distance(x, y, metric=self.metric, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}"


class _LabelledBatchLoss(torch.nn.Module):
    """Shared plumbing: constructor arguments are the functional's keywords."""

    _fn = None

    _reductions = v.REDUCTIONS

    def __init__(self, **kwargs):
        super().__init__()
        _check_module_args(kwargs, type(self)._reductions)
        self.kwargs = kwargs

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(embeddings, labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class BatchHardTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.batch_hard_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.batch_hard_triplet_loss)

    def __init__(self, margin=0.2, metric="euclidean", soft=False, normalize=False, reduction="mean", memory="auto"):
        super().__init__(margin=margin, metric=metric, soft=soft, normalize=normalize, reduction=reduction, memory=memory)


class SemiHardTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.semihard_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.semihard_triplet_loss)

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean", memory="auto"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction, memory=memory)


class BatchAllTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.batch_all_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.batch_all_triplet_loss)
    _reductions = ("mean", "sum", "mean_nonzero")

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean_nonzero", memory="auto"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction, memory=memory)


class TripletMarginLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.TripletMarginLoss`, on :func:`metricops.triplet_margin_loss`."""

    def __init__(self, margin: float = 1.0, p: float = 2.0, eps: float = 1e-6, swap: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        _check_module_args(dict(margin=margin, p=p, eps=eps, swap=swap, reduction=reduction), loss_margin=False)
        self.margin = margin
        self.p = p
        self.eps = eps
        self.swap = swap
        self.reduction = reduction

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps,
                                   swap=self.swap, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, p={self.p}, eps={self.eps}, swap={self.swap}, reduction={self.reduction!r}"


class ContrastiveLoss(torch.nn.Module):
    """Module form of :func:`metricops.contrastive_loss`; ``forward(embeddings, labels)``."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, metric: str = "euclidean",
                 squared: bool = False, normalize: bool = False, reduction: str = "mean", memory: str = "auto"):
        super().__init__()
        _check_module_args(dict(pos_margin=pos_margin, neg_margin=neg_margin, metric=metric, squared=squared,
                                normalize=normalize, reduction=reduction, memory=memory))
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.metric = metric
        self.squared = squared
        self.normalize = normalize
        self.reduction = reduction
        self.memory = memory

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(embeddings, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                metric=self.metric, squared=self.squared, normalize=self.normalize,
                                reduction=self.reduction, memory=self.memory)

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, metric={self.metric!r}, "
                f"squared={self.squared}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"memory={self.memory!r}")


class PairContrastiveLoss(torch.nn.Module):
    """Module form of :func:`metricops.pair_contrastive_loss`; ``forward(x0, x1, y)``."""

    def __init__(self, margin: float = 1.0, metric: str = "euclidean", squared: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        _check_module_args(dict(margin=margin, metric=metric, squared=squared, reduction=reduction),
                           loss_margin=False)
        self.margin = margin
        self.metric = metric
        self.squared = squared
        self.reduction = reduction

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pair_contrastive_loss(x0, x1, y, margin=self.margin, metric=self.metric, squared=self.squared,
                                     reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}, squared={self.squared}, reduction={self.reduction!r}"
