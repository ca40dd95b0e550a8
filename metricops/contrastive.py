"""Contrastive losses (labelled batch and explicit pairs) and the explicit triplet margin loss."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from . import _memory
from . import _validation as v
from ._ops import ops
from ._reduction import mean_of_sum, accumulation_dtype
from .distance import _normalized

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
    pos_margin, neg_margin = _check_contrastive_args(
        embeddings, labels, pos_margin, neg_margin, metric, squared, normalize
    )
    v.check_reduction(reduction)
    block_rows = _memory.block_rows(memory, embeddings)
    _memory.check_streaming_reduction(memory, reduction)
    x = _normalized(embeddings, normalize)
    if block_rows > 0 and reduction != "none":
        loss, _ = ops.contrastive_loss_streaming(
            x, labels, pos_margin, neg_margin, metric, squared, reduction, block_rows
        )
        return loss
    loss, _, _, _ = ops.contrastive_loss(x, labels, pos_margin, neg_margin, metric, squared, reduction)
    return loss


def _check_contrastive_args(embeddings, labels, pos_margin, neg_margin, metric, squared, normalize):
    """Validates contrastive_loss's arguments; returns the margins as floats."""
    v.check_embeddings(embeddings, "embeddings")
    v.check_labels(labels, embeddings)
    # An infinite margin is allowed: it switches one group of pairs off
    # (metricops.pml.losses.ContrastiveLoss relies on it). NaN is refused.
    pos_margin = v.check_number(pos_margin, "pos_margin")
    neg_margin = v.check_number(neg_margin, "neg_margin")
    v.check_metric(metric)
    v.check_flag(squared, "squared")
    v.check_flag(normalize, "normalize")
    return pos_margin, neg_margin


def _contrastive_rows_sum(
    embeddings, labels, rows: slice, *, pos_margin, neg_margin, metric, squared, normalize, memory
):
    """The terms of :func:`contrastive_loss` whose anchor (row) is in ``rows``, summed.

    Returns ``(total, num_nonzero)``: the 0-dim sum of the terms ``(i, j)``,
    ``i`` in ``rows``, ``j != i`` (differentiable; float32 for float16/bfloat16),
    and how many of them are > 0. ``metricops.distributed`` scores a rank's
    anchors with it: the work is ``len(rows) × B`` distances, not ``B × B``.

    When ``memory`` streams at this B, the rows go in blocks of the streaming
    op's size, each under activation checkpointing (its distances are
    recomputed in the backward), so at most ``block × B`` distances are held;
    otherwise one block holds them all, as the matrix op does.
    """
    pos_margin, neg_margin = _check_contrastive_args(
        embeddings, labels, pos_margin, neg_margin, metric, squared, normalize
    )
    _memory.check_memory(memory)
    x = _normalized(embeddings, normalize)
    x = x.to(accumulation_dtype(x.dtype))  # distances and sums in float32 for float16/bfloat16, as the op's
    # A block holds about 8 (rows, B) temporaries of x's dtype (distances, hinge, masks, autograd's saved ones).
    block_rows = _memory.block_rows(memory, embeddings, bytes_per_entry=8 * x.element_size())
    start, stop = rows.indices(x.shape[0])[:2]
    total = x[:0].sum()  # 0, attached to the graph even with no row (an empty shard still backpropagates)
    num_nonzero = torch.zeros((), dtype=torch.int64, device=x.device)
    step = _memory.rows_per_block(block_rows, stop - start)
    args = (pos_margin, neg_margin, metric, squared)
    for r0 in range(start, stop, step):
        r1 = min(r0 + step, stop)
        if block_rows > 0:
            block_sum, block_nonzero = checkpoint(
                _contrastive_block, x, labels, r0, r1, *args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            block_sum, block_nonzero = _contrastive_block(x, labels, r0, r1, *args)
        total = total + block_sum
        num_nonzero = num_nonzero + block_nonzero
    return total, num_nonzero


def _contrastive_block(x, labels, r0, r1, pos_margin, neg_margin, metric, squared):
    """(sum of the contrastive terms of anchors r0..r1-1, number of them > 0)."""
    d = ops.pairwise_distance(x[r0:r1], x, metric)
    same = labels[r0:r1, None] == labels[None, :]
    hinge = torch.where(same, d - pos_margin, neg_margin - d).clamp_min(0)
    terms = hinge * hinge if squared else hinge
    rows = torch.arange(r0, r1, device=x.device)
    # where, not a product: the self pair's term and gradient are 0 even when its hinge is inf.
    terms = torch.where(rows[:, None] != torch.arange(x.shape[0], device=x.device), terms, 0.0)
    return terms.sum(), (terms > 0).sum()


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

    Shapes as torch's: the three inputs have the same number of dimensions
    (``(N, D)``, unbatched ``(D,)``, or more leading dimensions) and broadcast
    against each other, e.g. one ``(1, D)`` anchor against ``(N, D)``; the last
    dimension is the embedding. ``reduction``: ``"mean"``, ``"sum"``, ``"none"``
    (the broadcast shape without its last dimension, as torch's) or
    ``"mean_nonzero"``. One deviation from torch, by the project's convention:
    with no triplet, ``"mean"`` gives 0 instead of NaN.
    """
    names = ("anchor", "positive", "negative")
    inputs = (anchor, positive, negative)
    for t, name in zip(inputs, names):
        v.check_tensor(t, name)
    if not anchor.dim() == positive.dim() == negative.dim():
        raise ValueError(
            "anchor, positive and negative must have the same number of dimensions, got "
            + ", ".join(f"{name} {t.dim()}-D {tuple(t.shape)}" for t, name in zip(inputs, names))
        )
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
    except RuntimeError:
        raise ValueError(
            "anchor, positive and negative must broadcast to one shape, got "
            + ", ".join(f"{name} {tuple(t.shape)}" for t, name in zip(inputs, names))
        ) from None
    # The op takes (N, D) rows: broadcast by expand (stride-0 views, no copy here)
    # and fold the leading dimensions into N; a 0-D input is one 1-element row.
    out_shape = shape[:-1]
    rows_shape = (math.prod(out_shape), shape[-1] if shape else 1)
    anchor, positive, negative = (t.expand(shape).reshape(rows_shape) for t in inputs)
    for t, name in zip((anchor, positive, negative), names):
        v.check_embeddings(t, name)
    v.check_same_device_dtype(anchor, "anchor", positive, "positive")
    v.check_same_device_dtype(anchor, "anchor", negative, "negative")
    margin = v.check_number(margin, "margin", finite=True)
    p = v.check_positive_finite(p, "p")
    eps = v.check_number(eps, "eps", finite=True)
    v.check_flag(swap, "swap")
    v.check_flag(squared, "squared")
    v.check_reduction(reduction, _TRIPLET_REDUCTIONS)
    if squared and p != 2.0:
        raise ValueError(f"squared=True requires p=2 (squared L2 distances), got p={p}")
    terms, _ = ops.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, squared)
    if reduction == "none":
        return terms.reshape(out_shape)
    return _reduce(terms, reduction)
