"""Triplet mining and triplet losses on a labelled batch.

A valid triplet (a, p, n) has a != p, labels[a] == labels[p] and
labels[a] != labels[n]; d is the pairwise distance matrix and
m = d[a, n] - d[a, p]. Every loss here is one native op that computes the
distances and mines them in the same pass; none builds a B×B×B tensor.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from . import _memory
from . import _validation as v
from ._ops import ops
from ._reduction import loss_dtype, mean_of_sum, accumulation_dtype
from .distance import _normalized

STRATEGIES = ("all", "violating", "semihard", "hard", "easy", "batch_hard")


def _prepare(embeddings, labels, margin, metric, normalize, *, loss: bool):
    v.check_embeddings(embeddings, "embeddings")
    v.check_labels(labels, embeddings)
    v.check_metric(metric)
    v.check_flag(normalize, "normalize")
    margin = v.check_number(margin, "margin", min_value=0.0 if loss else None, finite=True)
    return _normalized(embeddings, normalize), margin


def _reduce(terms: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-term losses (0 where not valid) without a host sync.

    With no valid term every branch returns a 0 that stays attached to the
    graph (a sum of zeros), so its gradient is zero.
    """
    if reduction == "none":
        return terms
    total = terms.sum(dtype=accumulation_dtype(terms.dtype))
    if reduction == "sum":
        return total.to(terms.dtype)
    count = valid.sum() if reduction == "mean" else (terms > 0).sum()  # else: mean_nonzero
    return mean_of_sum(total, count, terms.dtype)


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    soft: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017).

    Each anchor with at least one positive and one negative contributes
    ``relu(margin + max_p d[a, p] - min_n d[a, n])`` (``softplus(max_p d - min_n d)``
    with ``soft=True``).

    Args:
        embeddings: ``(B, D)`` float tensor. labels: ``(B,)`` int32/int64.
        normalize: distances of ``F.normalize(embeddings, dim=1)``, passed to
            the op, which fuses it on CPU (no normalised copy; its gradient is
            applied in the backward's single pass over the rows) and composes
            it on CUDA (see metricops/distance.py for the rule of every op).
        reduction: ``"mean"`` over anchors with a triplet, ``"sum"``,
            ``"mean_nonzero"``, or ``"none"`` for ``(B,)`` with 0 for anchors
            without a triplet.
        memory: ``"matrix"`` holds the B×B distance matrix; ``"streaming"``
            computes it in row blocks (O(block·B + B·D) extra memory: 256
            rows on CPU, at most 256 MiB on CUDA); ``"auto"`` streams from
            B >= 4096. Results are the same up to GEMM rounding. (The CPU
            kernel streams 128-row Gram blocks in both modes.)

    The forward mines and scores in one pass over the distances and saves the
    chosen indices; the backward is an O(B·D) gather/scatter. Ties pick one
    maximiser, which alone gets the gradient; NaN embeddings give NaN.
    """
    embeddings, margin = _prepare(embeddings, labels, margin, metric, False, loss=True)
    v.check_flag(normalize, "normalize")
    v.check_flag(soft, "soft")
    v.check_reduction(reduction)
    block_rows = _memory.block_rows(memory, embeddings)
    losses, positive, _, _, _ = ops.batch_hard_triplet(embeddings, labels, margin, metric, soft, block_rows, normalize)
    return _reduce(losses, positive >= 0, reduction)


def semihard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    normalize: bool = False,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """FaceNet semi-hard triplet loss, with the TensorFlow-Addons selection rule.

    Each positive pair (a, p) whose anchor has a negative uses ``n*``: the
    negative with the smallest ``d[a, n]`` among those with ``d[a, n] > d[a, p]``,
    or, if there is none, the negative with the largest ``d[a, n]``. The term is
    ``relu(margin + d[a, p] - d[a, n*])``.

    Returns the mean over those positive pairs (``"mean"``), ``"sum"``,
    ``"mean_nonzero"``, or ``(B, B)`` terms with 0 off those pairs (``"none"``).

    Per anchor, the negative distances are sorted once and each positive's
    distance is binary-searched: O(B² log B) work, O(B²) memory.

    memory: ``"matrix"`` holds the B×B distances (and, for the backward, the
        chosen negatives); ``"streaming"`` mines row blocks as they are
        computed and keeps per-anchor sums, and its backward recomputes and
        re-mines each block (O(block·B + B·D) extra memory; scalar reductions
        only); ``"auto"`` streams from B=4096 unless ``reduction="none"``.
    """
    v.check_reduction(reduction)
    _memory.check_memory(memory)
    _memory.check_streaming_reduction(memory, reduction)
    if reduction != "none":
        row_sum, row_valid, row_active = _semihard_anchor_sums(
            embeddings, labels, margin=margin, metric=metric, normalize=normalize, memory=memory
        )
        total = row_sum.sum()  # float32 for float16/bfloat16 embeddings
        if reduction == "sum":
            return total.to(loss_dtype(embeddings))
        count = row_valid if reduction == "mean" else row_active
        return mean_of_sum(total, count.sum(), loss_dtype(embeddings))
    embeddings, margin = _prepare(embeddings, labels, margin, metric, normalize, loss=True)
    losses, _, _ = ops.semihard_triplet(embeddings, labels, margin, metric)
    return losses


def _semihard_anchor_sums(embeddings, labels, *, margin, metric, normalize, memory):
    """Per anchor a, each ``(B,)``: the sum of a's semi-hard terms (differentiable; float32
    for float16/bfloat16), their number, and the number of them > 0.

    From the streaming op when ``memory`` streams at this B (no B×B matrix),
    else from the matrix op's terms. The scalar reductions of
    :func:`semihard_triplet_loss` reduce these; ``metricops.distributed`` keeps
    its local anchors' sums.
    """
    embeddings, margin = _prepare(embeddings, labels, margin, metric, normalize, loss=True)
    block_rows = _memory.block_rows(memory, embeddings, _memory.SORTING_BYTES_PER_ENTRY)
    if block_rows > 0:
        return ops.semihard_triplet_streaming(embeddings, labels, margin, metric, block_rows)
    losses, negative, _ = ops.semihard_triplet(embeddings, labels, margin, metric)
    row_sum = losses.sum(dim=1, dtype=accumulation_dtype(losses.dtype))
    return row_sum, (negative >= 0).sum(dim=1), (losses > 0).sum(dim=1)


def batch_all_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    normalize: bool = False,
    reduction: str = "mean_nonzero",
    memory: str = "auto",
) -> torch.Tensor:
    """Batch-all triplet loss: ``relu(margin + d[a, p] - d[a, n])`` over every valid triplet.

    ``"mean_nonzero"`` (default) averages over the terms > 0, ``"mean"`` over
    all valid triplets, ``"sum"`` sums; ``"none"`` is refused (there are O(B³)
    terms). Never materialises the triplets: per anchor, sorted negative
    distances and prefix sums give every positive's active count and term sum
    by binary search, so work is O(B² log B) and memory O(B²).

    memory: ``"matrix"`` keeps the B×B distances and each pair's multiplicity
        for the backward; ``"streaming"`` keeps neither (O(block·B + B·D)
        extra memory): its backward recomputes them block by block;
        ``"auto"`` streams from B=4096.
    """
    embeddings, margin = _prepare(embeddings, labels, margin, metric, normalize, loss=True)
    v.check_reduction(reduction, ("mean", "sum", "mean_nonzero"))
    block_rows = _memory.block_rows(memory, embeddings, _memory.SORTING_BYTES_PER_ENTRY)
    if block_rows > 0:
        loss_sum, num_valid, num_active = ops.batch_all_triplet_streaming(
            embeddings, labels, margin, metric, block_rows
        )
    else:
        loss_sum, num_valid, num_active, _, _ = ops.batch_all_triplet(embeddings, labels, margin, metric)
    # loss_sum is float32 for float16/bfloat16 embeddings: B³ terms overflow float16.
    if reduction == "sum":
        return loss_sum.to(loss_dtype(embeddings))
    count = num_valid if reduction == "mean" else num_active
    return mean_of_sum(loss_sum, count, loss_dtype(embeddings))


def triplet_statistics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: str = "euclidean",
    normalize: bool = False,
) -> Dict[str, torch.Tensor]:
    """Exact counts of valid triplets, as 0-dim int64 tensors.

    Keys: ``"total"``, ``"easy"`` (m > margin), ``"semihard"`` (0 < m <= margin)
    and ``"hard"`` (m <= 0), with m = d[a, n] - d[a, p]. O(B² log B), no B³ memory.
    """
    with torch.no_grad():
        embeddings, margin = _prepare(embeddings, labels, margin, metric, normalize, loss=False)
        counts = ops.triplet_statistics(embeddings, labels, margin, metric)
    return {"total": counts[0], "easy": counts[1], "semihard": counts[2], "hard": counts[3]}


def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str,
    margin: float = 0.2,
    metric: str = "euclidean",
    normalize: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices ``(a, p, n)`` (int64, sorted lexicographically) of the selected triplets.

    ``strategy``: ``"all"`` (every valid triplet), ``"violating"`` (m <= margin),
    ``"semihard"`` (0 < m <= margin), ``"hard"`` (m <= 0), ``"easy"`` (m > margin),
    or ``"batch_hard"`` (per anchor with a triplet: farthest positive, nearest
    negative). With no ties this matches pytorch-metric-learning 2.9's
    ``TripletMarginMiner`` (whose ``"all"`` is our ``"violating"``) and ``BatchHardMiner``.

    The output size depends on the data, so under ``torch.compile`` this
    op breaks the graph (or needs dynamic shapes); the losses do not.
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of 'all', 'violating', 'semihard', 'hard', 'easy', 'batch_hard', got {strategy!r}"
        )
    with torch.no_grad():
        embeddings, margin = _prepare(embeddings, labels, margin, metric, normalize, loss=False)
        return ops.mine_triplets(embeddings, labels, strategy, margin, metric)
