"""Contrastive losses (labelled batch and explicit pairs) and the explicit triplet margin loss."""

from __future__ import annotations

import torch

from . import _validation as v
from . import triplet as _triplet
from ._ops import ops
from ._reduction import mean_of_sum, accumulation_dtype
from .distance import _l2_normalize

_TRIPLET_REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-item terms; with no term every reduction gives 0, still attached to the graph."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean() if terms.numel() > 0 else terms.sum()
    # mean_nonzero: the count is piecewise constant, so it carries no gradient;
    # sum and count in float32 for float16/bfloat16 (past 65504 terms).
    total = terms.sum(dtype=accumulation_dtype(terms.dtype))
    return mean_of_sum(total, (terms > 0).sum(), terms.dtype)


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
    memory: str = "auto",
) -> torch.Tensor:
    """Contrastive loss over the ordered pairs ``(i, j)``, ``i != j``, of a labelled batch.

    A same-label pair gives ``relu(d - pos_margin)^q``, a different-label pair
    ``relu(neg_margin - d)^q``, with ``q = 2`` if ``squared`` else 1 and ``d`` the
    ``metric`` distance (after L2 normalization if ``normalize``).

    ``reduction``: ``"mean"`` (over the B(B−1) ordered pairs), ``"sum"``,
    ``"mean_nonzero"`` (over the terms > 0; 0 when none) or ``"none"`` ((B, B),
    zero diagonal). With no valid term the loss is 0 with a zero gradient.

    ``memory``: ``"matrix"`` holds the B×B matrix (one Gram GEMM, a fused
    epilogue computing distance, hinge and gradient weight, and one GEMM in the
    backward). ``"streaming"`` never holds it: the forward sums the terms row
    block by row block and the backward recomputes each block (O(block·B + B·D)
    extra memory); it needs a scalar reduction. ``"auto"`` streams from
    B = 4096 for the scalar reductions.
    """
    v.check_embeddings(embeddings, "embeddings")
    v.check_labels(labels, embeddings)
    # An infinite margin is allowed: it switches one group of pairs off
    # (metricops.pml.losses.ContrastiveLoss relies on it). NaN is refused.
    pos_margin = v.check_number(pos_margin, "pos_margin")
    neg_margin = v.check_number(neg_margin, "neg_margin")
    v.check_metric(metric)
    v.check_flag(squared, "squared")
    v.check_flag(normalize, "normalize")
    v.check_reduction(reduction)
    v.check_memory(memory)
    block_rows = _triplet._block_rows(memory, embeddings)
    if memory == "streaming" and reduction == "none":
        raise ValueError("reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming', got 'none'")
    if block_rows > 0 and reduction != "none":
        x = _l2_normalize(embeddings) if normalize else embeddings
        loss, _ = ops.contrastive_loss_streaming(x, labels, pos_margin, neg_margin, metric, squared, reduction, block_rows)
        return loss
    x = _l2_normalize(embeddings) if normalize else embeddings
    loss, _, _, _ = ops.contrastive_loss(x, labels, pos_margin, neg_margin, metric, squared, reduction)
    return loss


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
    """Contrastive loss on explicit pairs: ``y·d^q + (1−y)·relu(margin − d)^q``.

    ``x0``, ``x1``: ``(N, D)``; ``y``: ``(N,)`` with 1 for similar and 0 for
    dissimilar (bool, int or float; other values are refused in eager mode).
    ``d`` is the ``metric`` distance between ``x0[i]`` and ``x1[i]`` (explicit
    differences for the euclidean metrics). One fused native pass per row,
    forward and backward.
    """
    v.check_embeddings(x0, "x0")
    v.check_embeddings(x1, "x1")
    v.check_same_device_dtype(x0, "x0", x1, "x1")
    v.check_same_shape(x0, "x0", x1, "x1")
    y = v.check_pair_labels(y, x0)
    margin = v.check_number(margin, "margin", finite=True)
    v.check_metric(metric)
    v.check_flag(squared, "squared")
    v.check_reduction(reduction)
    terms, _ = ops.pair_contrastive_loss(x0, x1, y, margin, metric, squared)
    return _reduce(terms, reduction)


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
    """``torch.nn.functional.triplet_margin_loss`` as one fused native pass per row.

    ``squared=False`` gives torch's values and gradients (distances
    ``‖x − y + eps‖_p``, the swap rule, ``clamp_min`` at 0), for any finite
    ``p > 0``. ``squared=True`` (requires ``p=2``) gives
    ``relu(‖a−p‖² − min(‖a−n‖², swap: ‖p−n‖²) + margin)`` without eps.
    Inputs are ``(N, D)`` or ``(D,)``. ``reduction``: ``"mean"``, ``"sum"``,
    ``"none"`` (torch's) or ``"mean_nonzero"``. One deviation from torch, by
    the project's convention: with N = 0, ``"mean"`` gives 0 instead of NaN.
    """
    names = ("anchor", "positive", "negative")
    for t, name in zip((anchor, positive, negative), names):
        v.check_tensor(t, name)
    unbatched = anchor.dim() == 1
    if unbatched and positive.dim() == 1 and negative.dim() == 1:
        anchor, positive, negative = anchor.unsqueeze(0), positive.unsqueeze(0), negative.unsqueeze(0)
    for t, name in zip((anchor, positive, negative), names):
        v.check_embeddings(t, name)
    v.check_same_device_dtype(anchor, "anchor", positive, "positive")
    v.check_same_device_dtype(anchor, "anchor", negative, "negative")
    v.check_same_shape(anchor, "anchor", positive, "positive")
    v.check_same_shape(anchor, "anchor", negative, "negative")
    margin = v.check_number(margin, "margin", finite=True)
    p = v.check_positive_finite(p, "p")
    eps = v.check_number(eps, "eps", finite=True)
    v.check_flag(swap, "swap")
    v.check_flag(squared, "squared")
    v.check_reduction(reduction, _TRIPLET_REDUCTIONS)
    if squared and p != 2.0:
        raise ValueError(f"squared=True requires p=2 (squared L2 distances), got p={p}")
    terms, _ = ops.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, squared)
    if unbatched and reduction == "none":
        terms = terms.squeeze(0)
    return _reduce(terms, reduction)
