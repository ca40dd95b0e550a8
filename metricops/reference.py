"""Plain-PyTorch reference implementations: the ground truth for tests.

Written for clarity, not speed (some use O(B³) memory); every native op is
checked against these in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) at 0."""
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ row-wise, with zero rows mapped to zero (and zero gradient)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    nonzero = norm != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return x * inv


def pairwise_distance(
    x: torch.Tensor, y: Optional[torch.Tensor] = None, *, metric: str = "euclidean", normalize: bool = False
) -> torch.Tensor:
    """Reference for :func:`metricops.pairwise_distance`, by explicit differences."""
    self_distance = y is None
    if normalize:
        x = F.normalize(x, p=2, dim=1)
        y = None if y is None else F.normalize(y, p=2, dim=1)
    if y is None:
        y = x
    if metric in ("euclidean", "sqeuclidean"):
        diff = x[:, None, :] - y[None, :, :]
        sq = (diff * diff).sum(-1)
        d = _safe_sqrt(sq) if metric == "euclidean" else sq
        if self_distance:
            d = d * (1 - torch.eye(x.shape[0], dtype=d.dtype, device=d.device))
        return d
    if metric == "cosine":
        return 1 - _unit_rows(x) @ _unit_rows(y).T
    raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")
