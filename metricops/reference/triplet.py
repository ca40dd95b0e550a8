"""Reference triplet losses, miners and statistics on a labelled batch (O(B³) memory in places)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distance import pairwise_distance


def _triplet_masks(labels: torch.Tensor):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive (a != p, same label), negative


def _reduce(terms: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(int(valid.sum()), 1)
    if reduction == "mean_nonzero":
        return terms.sum() / max(int((terms > 0).sum()), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def batch_hard_triplet_loss(
    embeddings, labels, *, margin=0.2, metric="euclidean", soft=False, normalize=False, reduction="mean", memory="auto"
):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos.any(1) & neg.any(1)
    if d.shape[0] == 0:  # max over an empty dim is undefined
        return _reduce(d.sum(1), valid, reduction)
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    hardest_pos = torch.where(pos, d, -inf).max(1).values
    hardest_neg = torch.where(neg, d, inf).min(1).values
    if soft:
        terms = F.softplus(hardest_pos - hardest_neg)
    else:
        terms = F.relu(margin + hardest_pos - hardest_neg)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def _semihard_negative_distances(d, pos, neg):
    """(B, B) distance d[a, n*(a, p)] under the TensorFlow-Addons rule."""
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    d_an = d[:, None, :]  # (a, ., n)
    d_ap = d[:, :, None]  # (a, p, .)
    candidate = neg[:, None, :] & (d_an > d_ap)  # farther than the positive
    nearest_farther = torch.where(candidate, d_an, inf).min(-1).values
    farthest = torch.where(neg, d, -inf).max(-1).values[:, None].expand_as(d)
    return torch.where(candidate.any(-1), nearest_farther, farthest)


def semihard_triplet_loss(embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False, reduction="mean"):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos & neg.any(1)[:, None]
    if d.shape[0] == 0:
        return _reduce(d, valid, reduction)
    d_an_star = _semihard_negative_distances(d, pos, neg)
    terms = F.relu(margin + d - d_an_star)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def semihard_negatives(embeddings, labels, *, metric="euclidean", normalize=False):
    """(B, B) int64 index n*(a, p) (-1 off valid pairs), ties to the lowest index."""
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    B = d.shape[0]
    out = torch.full((B, B), -1, dtype=torch.int64, device=d.device)
    for a in range(B):
        negs = [n for n in range(B) if neg[a, n]]
        if not negs:
            continue
        for p in range(B):
            if not pos[a, p]:
                continue
            farther = [n for n in negs if d[a, n] > d[a, p]]
            if farther:
                out[a, p] = min(farther, key=lambda n: (float(d[a, n]), n))
            else:
                out[a, p] = min(negs, key=lambda n: (-float(d[a, n]), n))
    return out


def _all_triplets(embeddings, labels, metric, normalize):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # (a, p, n)
    return d, valid


def batch_all_triplet_loss(
    embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False, reduction="mean_nonzero"
):
    if reduction == "none":
        raise ValueError("reduction must be one of 'mean', 'sum', 'mean_nonzero', got 'none'")
    d, valid = _all_triplets(embeddings, labels, metric, normalize)
    terms = F.relu(margin + d[:, :, None] - d[:, None, :])
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def triplet_statistics(embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False):
    with torch.no_grad():
        d, valid = _all_triplets(embeddings, labels, metric, normalize)
        m = d[:, None, :] - d[:, :, None]  # d[a, n] - d[a, p]
        count = lambda mask: (valid & mask).sum().to(torch.int64)  # noqa: E731
        return {
            "total": valid.sum().to(torch.int64),
            "easy": count(m > margin),
            "semihard": count((m > 0) & (m <= margin)),
            "hard": count(m <= 0),
        }


def mine_triplets(embeddings, labels, *, strategy, margin=0.2, metric="euclidean", normalize=False):
    with torch.no_grad():
        d, valid = _all_triplets(embeddings, labels, metric, normalize)
        if strategy == "batch_hard":
            pos, neg = _triplet_masks(labels)
            inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
            anchors = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
            if d.shape[0] == 0:
                return anchors, anchors.clone(), anchors.clone()
            p = torch.where(pos, d, -inf).argmax(1)[anchors]
            n = torch.where(neg, d, inf).argmin(1)[anchors]
            return anchors, p, n
        m = d[:, None, :] - d[:, :, None]
        select = {
            "all": torch.ones_like(valid),
            "violating": m <= margin,
            "semihard": (m > 0) & (m <= margin),
            "hard": m <= 0,
            "easy": m > margin,
        }[strategy]
        a, p, n = torch.nonzero(valid & select, as_tuple=True)
        return a, p, n
