"""Plain-torch contenders: each loss as one would batch it in torch without metricops (cdist + masks).

Each computes exactly what the metricops function it is timed against computes
(tests/test_benchmark_contenders.py checks values and gradients against
metricops and metricops.reference), so a benchmark row compares the same work.
All hold a few B×B tensors, never B×B×B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _distances_and_masks(embeddings: torch.Tensor, labels: torch.Tensor, normalize: bool):
    """Euclidean distance matrix (of the L2-normalized rows if ``normalize``), positive and negative masks."""
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return d, same & ~eye, ~same


def plain_torch_batch_hard(embeddings, labels, margin=0.2, normalize=True):
    """``metricops.batch_hard_triplet_loss(..., reduction="mean_nonzero")``: cdist + masked max/min."""
    d, pos, neg = _distances_and_masks(embeddings, labels, normalize)
    hardest_pos = torch.where(pos, d, torch.zeros_like(d)).max(1).values
    hardest_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
    valid = pos.any(1) & neg.any(1)
    terms = torch.relu(margin + hardest_pos - hardest_neg)[valid]
    return terms.sum() / (terms > 0).sum().clamp_min(1)


def plain_torch_semihard(embeddings, labels, margin=0.2, normalize=True):
    """``metricops.semihard_triplet_loss(..., reduction="mean")``: FaceNet semi-hard, TensorFlow-Addons' rule.

    For each positive pair (a, p) whose anchor has a negative, n* is the
    nearest negative strictly farther than p, or the farthest negative if none
    is; the loss is the mean of relu(margin + d[a, p] - d[a, n*]) over those
    pairs. TF-Addons' ``triplet_semihard_loss`` finds n* with a B²×B tiled
    mask; here each anchor's negative distances are sorted once and every
    d[a, p] is binary-searched (``searchsorted``), so memory stays O(B²)
    (TF-Addons divides by all positive pairs; they are the same pairs when
    every anchor has a negative, as in the benchmarks).
    """
    d, pos, neg = _distances_and_masks(embeddings, labels, normalize)
    b = d.shape[0]
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    # Non-negatives sort last as +inf; stable, so equal distances keep index order.
    negatives_sorted = torch.where(neg, d, inf).sort(dim=1, stable=True).values
    # right=True: the first negative with d[a, n] > d[a, p] (an equal one is not farther).
    first_farther = torch.searchsorted(negatives_sorted.detach(), d.detach(), right=True)
    has_farther = first_farther < neg.sum(1, keepdim=True)
    nearest_farther = negatives_sorted.gather(1, first_farther.clamp_max(max(b - 1, 0)))
    farthest = torch.where(neg, d, -inf).max(1, keepdim=True).values  # .max, not amax: one tie gets the gradient
    negative_distance = torch.where(has_farther, nearest_farther, farthest)
    valid = pos & neg.any(1, keepdim=True)
    terms = torch.where(valid, F.relu(margin + d - negative_distance), torch.zeros_like(d))
    return terms.sum() / valid.sum().clamp_min(1)


def plain_torch_contrastive(embeddings, labels, pos_margin=0.0, neg_margin=1.0, normalize=False):
    """``metricops.contrastive_loss(..., reduction="mean_nonzero")``: cdist + masks over the pairs i != j."""
    d, pos, neg = _distances_and_masks(embeddings, labels, normalize)
    terms = torch.where(pos, F.relu(d - pos_margin), torch.where(neg, F.relu(neg_margin - d), torch.zeros_like(d)))
    return terms.sum() / (terms > 0).sum().clamp_min(1)
