"""Reference contrastive losses and the explicit-input losses (pairs, triplets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distance import _row_distance, pairwise_distance


def _reduce_terms(terms: torch.Tensor, reduction: str, count: int) -> torch.Tensor:
    """mean over `count` items, sum, mean over terms > 0, or none; 0 when there is no item."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(count, 1)
    if reduction == "mean_nonzero":
        return terms.sum() / (terms > 0).sum().clamp_min(1).to(terms.dtype)
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got {reduction!r}")


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference for :func:`metricops.contrastive_loss`: explicit (B, B) terms, masked."""
    b = embeddings.shape[0]
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    same = labels[:, None] == labels[None, :]
    terms = torch.where(same, F.relu(d - pos_margin), F.relu(neg_margin - d))
    if squared:
        terms = terms * terms
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=embeddings.device)
    terms = torch.where(off_diagonal, terms, torch.zeros_like(terms))
    return _reduce_terms(terms, reduction, b * (b - 1))


def pair_contrastive_loss(
    x0: torch.Tensor,
    x1: torch.Tensor,
    y: torch.Tensor,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference for :func:`metricops.pair_contrastive_loss`: y·d^q + (1−y)·relu(margin − d)^q."""
    d = _row_distance(x0, x1, metric)
    yf = y.to(d.dtype)
    q = 2 if squared else 1
    terms = yf * d**q + (1 - yf) * F.relu(margin - d) ** q
    return _reduce_terms(terms, reduction, x0.shape[0])


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 1.0,
    p: float = 2.0,
    eps: float = 1e-6,
    swap: bool = False,
    reduction: str = "mean",
    squared: bool = False,
) -> torch.Tensor:
    """Reference for :func:`metricops.triplet_margin_loss`, written out as torch's formula.

    Distances are ‖x − y + eps‖_p (torch's pairwise_distance) or, with
    squared=True, ‖x − y‖² without eps.
    """

    def dist(x, y):
        if squared:
            diff = x - y
            return (diff * diff).sum(-1)
        return torch.linalg.vector_norm(x - y + eps, ord=p, dim=-1)

    d_ap = dist(anchor, positive)
    d_an = dist(anchor, negative)
    if swap:
        d_an = torch.minimum(d_an, dist(positive, negative))
    terms = torch.clamp_min(margin + d_ap - d_an, 0)
    if reduction == "mean" and terms.numel() > 0:
        return terms.mean()
    return _reduce_terms(terms, reduction, terms.numel())
