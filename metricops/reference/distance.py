"""Reference distances: pairwise and row-wise, with the contract's conventions at 0."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) at 0."""
    positive = sq > 0
    rest = torch.where(torch.isnan(sq), sq, torch.zeros_like(sq))  # NaN stays NaN
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), rest)


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
        # 1 − cos = ‖x̂ − ŷ‖²/2 from explicit differences (exactly 0 for parallel
        # rows, never negative); below the resolution of the normalised rows,
        # tol², it is 0; cos with a zero row is 0 (distance 1).
        ux, uy = _unit_rows(x), _unit_rows(y)
        diff = ux[:, None, :] - uy[None, :, :]
        half_sq = 0.5 * (diff * diff).sum(-1)
        tol = (2 * x.shape[1] + 8) * torch.finfo(x.dtype).eps
        half_sq = torch.where(half_sq <= tol * tol, torch.zeros_like(half_sq), half_sq)
        zero_row = (torch.linalg.vector_norm(x, dim=1) == 0)[:, None] | (torch.linalg.vector_norm(y, dim=1) == 0)[
            None, :
        ]
        return torch.where(zero_row, torch.ones_like(half_sq), half_sq)
    raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")


def _row_distance(x0: torch.Tensor, x1: torch.Tensor, metric: str) -> torch.Tensor:
    if metric in ("euclidean", "sqeuclidean"):
        diff = x0 - x1
        sq = (diff * diff).sum(-1)
        return _safe_sqrt(sq) if metric == "euclidean" else sq
    if metric == "cosine":
        return 1 - (_unit_rows(x0) * _unit_rows(x1)).sum(-1)
    raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")
