"""torch.nn.Module wrappers of metricops' losses."""

from __future__ import annotations

import torch

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
