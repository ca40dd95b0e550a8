"""torch.nn.Module wrappers of metricops' losses."""

from __future__ import annotations

import torch

from . import triplet as _triplet
from .distance import pairwise_distance


class PairwiseDistance(torch.nn.Module):
    """Module form of :func:`metricops.pairwise_distance`."""

    def __init__(self, metric: str = "euclidean", normalize: bool = False):
        super().__init__()
        self.metric = metric
        self.normalize = normalize

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return pairwise_distance(x, y, metric=self.metric, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}"


class _LabelledBatchLoss(torch.nn.Module):
    """Shared plumbing: constructor arguments are the functional's keywords."""

    _fn = None

    def __init__(self, **kwargs):
        super().__init__()
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

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction)


class BatchAllTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.batch_all_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.batch_all_triplet_loss)

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean_nonzero"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction)
