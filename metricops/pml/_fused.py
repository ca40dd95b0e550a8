"""TripletMarginLoss with PML's default AvgNonZeroReducer over a miner's selection, without listing the triplets.

With m = d(a, n) − d(a, p) and loss margin M, a selected triplet's term is
relu(M − m), so the loss is the mean of (M − m) over the selected triplets
with m < M. For TripletMarginMiner (margin μ) the selection is an interval of
m (``"all"``: m <= μ, ``"hard"``: m <= min(μ, 0), ``"semihard"``:
0 < m <= μ, ``"easy"``: m > μ). Two exact ways to sum over it:

* Per positive (``_slot_loss``, B < 4096): the native
  ``triplet_interval_weights`` tests m for every (anchor, positive, negative)
  on one distance matrix, compared with the bounds exactly as PML compares (so
  ties at a bound fall as they do in the listed triplets); the counts weight
  the distance matrix, whose gradient flows through ``pairwise_distance``.
  O(B² · positives per anchor) work, O(B²) memory: the fast path for
  class-balanced batches.
* Native batch-all sums (many positives per anchor, or streaming sizes): the
  op gives Σ relu(t − m) and #{m < t} for any t in O(B² log B), and

      Σ_{m < t} (M − m) = S(t) + (M − t)·N(t),  S(t) = Σ_{m < t} (t − m),  N(t) = #{m < t},

  so an interval is a difference of two such sums. The op counts m < t where
  PML's bound may be m <= t; they differ on triplets with m exactly at the
  bound. At a bound of 0 (hard, semihard; "all"/"easy" with margin 0) those
  are d(a, p) == d(a, n) exactly (duplicated or collapsed embeddings, and a
  few per million float32 triplets by rounding alone): they are found on the
  op's own distances and added or removed with their value and gradient. Below
  the streaming sizes a miner's bound always takes the per-slot path, which
  compares as PML does (integer-valued embeddings tie exactly at any bound); at
  streaming sizes an exact tie at another bound than 0 is left as the op counts it.

BatchHardMiner + TripletMarginLoss is the native batch-hard loss averaged
over its nonzero terms; it mines with the very op the miner materializes with.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _memory
from .._ops import ops
from .._reduction import mean_of_sum
from ..distance import _normalized
from ..triplet import _reduce
from ._common import nonfinite_below_streaming
from ._mined import TripletSelection
from .reducers import zero_loss


def _below(x: torch.Tensor, labels: torch.Tensor, t: float, metric: str):
    """(S(t), N(t), dist): Σ relu(t − m) over every valid triplet (differentiable in x), #{m < t}, and the
    distance matrix the op used (None when it streamed row blocks)."""
    block_rows = _memory.block_rows("auto", x, _memory.SORTING_BYTES_PER_ENTRY)
    if block_rows > 0:
        total, _, count = ops.batch_all_triplet_streaming(x, labels, t, metric, block_rows)
        return total, count, None
    total, _, count, dist, _ = ops.batch_all_triplet(x, labels, t, metric)
    return total, count, dist


def selected_interval(selection: Optional[TripletSelection], loss_margin: float):
    """The selected triplets with a nonzero term, as an interval of m.

    Returns None if there are none, else ``(lower, upper, upper_inclusive)``:
    lower < m (no lower bound: None) and m <= upper (``upper_inclusive``) or
    m < upper. ``selection`` None: every valid triplet.
    """
    kind = "all_triplets" if selection is None else selection.type_of_triplets
    mu = 0.0 if selection is None else float(selection.margin)
    upper = {"all": mu, "semihard": mu, "hard": min(mu, 0.0)}.get(kind)
    lower = {"semihard": 0.0, "easy": mu}.get(kind)
    inclusive = upper is not None and upper < loss_margin  # else the hinge's m < M bounds it
    if not inclusive:
        upper = float(loss_margin)
    if lower is not None and lower >= upper:
        return None
    return lower, upper, inclusive


def positives_per_anchor(labels: torch.Tensor):
    """(B, P) indices of each anchor's positives (same label, not itself), padded, and a (B, P) mask of the
    real ones; P is the most any anchor has. O(B · P), from the labels sorted once."""
    batch = labels.shape[0]
    if batch == 0:
        return labels.new_empty((0, 0), dtype=torch.int64), labels.new_empty((0, 0), dtype=torch.bool)
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    size = counts.repeat_interleave(counts)  # class size, in sorted order
    start = torch.cumsum(counts, 0).repeat_interleave(counts) - size
    slots = int(counts.max())
    offsets = torch.arange(slots, device=labels.device)
    members = order[(start[:, None] + offsets).clamp_(max=batch - 1)]  # (B, slots), sorted order
    real = (offsets < size[:, None]) & (members != order[:, None])
    # Each row holds its anchor once among its members: drop that slot.
    keep = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)[:, : slots - 1]
    positives = torch.empty_like(members[:, : slots - 1])
    mask = torch.empty_like(real[:, : slots - 1])
    positives[order] = members.gather(1, keep)
    mask[order] = real.gather(1, keep)
    return positives, mask


def ties_at_zero(x: torch.Tensor, labels: torch.Tensor, metric: str, dist: Optional[torch.Tensor]):
    """Every valid triplet (a, p, n) with d(a, n) == d(a, p) exactly, on the distances the batch-all op uses
    (``dist``, or the same rows recomputed block by block when it streamed), and that distance.

    One (rows, B) comparison per positive slot (the k-th positive of each anchor): O(B² · max positives)
    comparisons; only slots with a tie are listed.
    """
    batch = labels.shape[0]
    positives, real = positives_per_anchor(labels)
    found = []
    if positives.shape[1] > 0:
        stream_rows = _memory.block_rows("auto", x, _memory.SORTING_BYTES_PER_ENTRY) if dist is None else batch
        for r0 in range(0, batch, stream_rows):
            # Streaming: the op's row blocks, the same GEMM shapes, so the same values.
            rows = (
                dist[r0 : r0 + stream_rows]
                if dist is not None
                else ops.pairwise_distance(x[r0 : r0 + stream_rows], x, metric)
            )
            r1 = r0 + len(rows)
            same = labels[r0:r1, None] == labels[None, :]
            negatives = rows.masked_fill(same, float("nan"))  # NaN equals nothing
            d_ap = rows.gather(1, positives[r0:r1]).masked_fill(~real[r0:r1], float("nan"))
            equal = torch.empty_like(same)
            for k in range(positives.shape[1]):
                torch.eq(negatives, d_ap[:, k : k + 1], out=equal)
                if bool(equal.any()):
                    a, n = torch.where(equal)
                    found.append((a + r0, positives[a + r0, k], n, d_ap[a, k]))
    if not found:
        empty = torch.empty(0, dtype=torch.int64, device=labels.device)
        return empty, empty, empty, x.new_empty(0)
    return tuple(torch.cat(parts) for parts in zip(*found))


def pair_distance(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, metric: str) -> torch.Tensor:
    """d(x[i], x[j]) for listed pairs, differentiable: the math of ``pairwise_distance`` (cosine with a zero
    vector is 1)."""
    if metric == "cosine":
        xi, xj = x[i], x[j]
        norms = xi.norm(dim=1) * xj.norm(dim=1)
        return 1 - (xi * xj).sum(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    diff = x[i] - x[j]
    squared = (diff * diff).sum(dim=1)
    if metric == "sqeuclidean":
        return squared
    return torch.where(squared > 0, squared, torch.ones_like(squared)).sqrt() * (squared > 0)


def use_slots(batch: int, max_positives: int, exact_bound: bool) -> bool:
    """Whether the per-positive-slot path (O(B² · positives per anchor) work, O(B²) memory) runs rather than
    the batch-all op (O(B² log B)): with few positives per anchor, or a miner's bound (whose ties the op path
    would have to search in O(B² · positives) anyway), below the size where the ops stream row blocks."""
    few = 2 * max(1, math.ceil(math.log2(max(batch, 2))))  # the native kernels' "few positives" rule
    return batch < _memory.AUTO_STREAM_MIN_B and (exact_bound or max_positives <= few)


def _slot_loss(x, labels, interval, loss_margin: float, metric: str, embeddings):
    """PML's loss over the interval's triplets from one distance matrix, without listing them.

    The native ``triplet_interval_weights`` tests every (a, p, n) against the interval, comparing
    m = d(a, n) − d(a, p) with the bounds exactly as PML compares its margins, and returns each pair's weight
    in Σ (M − m) = M · count + Σ weight · d; the gradient flows through the distance matrix.
    """
    lower, upper, inclusive = interval
    dist = ops.pairwise_distance(x, None, metric)
    with torch.no_grad():
        weight, row_count = ops.triplet_interval_weights(
            dist.detach(), labels, 0.0 if lower is None else float(lower), lower is not None, float(upper), inclusive
        )
        count = row_count.sum()
        divisor = count.clamp_min(1)
    # summed in float64 below: Σ weight · d without a B² cast. Unselected pairs (weight 0) are left out, not
    # multiplied: 0 · inf (a row with an infinite coordinate) would be NaN where PML never reads the pair.
    rows = torch.where(weight != 0, weight * dist, 0).sum(dim=1)
    total = float(loss_margin) * count.double() + rows.detach().double().sum()
    slope = rows.sum() / divisor.to(rows.dtype)  # its gradient: weight / count
    # the value from the float64 total, the gradient from slope (inf − inf is NaN: then only the value counts)
    straight_through = torch.nan_to_num(slope - slope.detach(), nan=0.0)
    loss = (total / divisor.double()).to(embeddings.dtype) + straight_through.to(embeddings.dtype)
    return torch.where(count > 0, loss, zero_loss(embeddings))


def triplet_margin_loss(
    embeddings, labels, selection: Optional[TripletSelection], loss_margin: float, metric: str, normalize: bool
) -> torch.Tensor:
    """PML's TripletMarginLoss(margin=loss_margin) value over ``selection``'s triplets (None: every one)."""
    interval = selected_interval(selection, loss_margin)
    if interval is None:
        return zero_loss(embeddings)
    lower, upper, inclusive = interval
    x = _normalized(embeddings, normalize)
    zero_bound = lower == 0.0 or (inclusive and upper == 0.0)
    positives, real = positives_per_anchor(labels)
    # A bound of the miner's (lower, or an inclusive upper) must be compared as PML does: the slot path does,
    # the op's sums count m < t (exact ties at t: integer-valued embeddings make them, at any t).
    # So must a batch with a NaN or inf coordinate (looked at only when the op path would run): PML's reducer
    # drops NaN terms, the op's sums turn NaN.
    if use_slots(x.shape[0], positives.shape[1], lower is not None or inclusive) or nonfinite_below_streaming(
        embeddings
    ):
        return _slot_loss(x, labels, interval, loss_margin, metric, embeddings)
    m_margin = float(loss_margin)
    sum_u, count_u, dist = _below(x, labels, upper, metric)
    total = sum_u.double() + (m_margin - upper) * count_u.double()
    count = count_u
    if lower is not None:
        sum_l, count_l, _ = _below(x, labels, lower, metric)
        total = total - (sum_l.double() + (m_margin - lower) * count_l.double())
        count = count_u - count_l
    if zero_bound:
        # Triplets with m exactly 0: PML's bound keeps them (m <= 0) where the
        # op's drops them (m < 0), and drops them (0 < m) where the difference
        # of two op sums keeps them. Each has the term M − 0 = M.
        a, p, n, d = ties_at_zero(x.detach(), labels, metric, dist)
        if lower == 0.0:  # those in {m < upper}: upper + d(a, p) − d(a, n) > 0 as the op rounds it
            keep = (torch.tensor(upper, dtype=d.dtype, device=d.device) + d) - d > 0
            a, p, n = a[keep], p[keep], n[keep]
        if len(a) > 0:
            term = pair_distance(x, a, p, metric) - pair_distance(x, a, n, metric)  # 0 up to rounding
            ties = (m_margin + term - term.detach()).sum(dtype=torch.float64)  # value M each, d(a,p) − d(a,n)'s slope
            sign = 1 if lower != 0.0 else -1
            total = total + sign * ties
            count = count + sign * len(a)
    loss = mean_of_sum(total, count, embeddings.dtype)
    return torch.where(count > 0, loss, zero_loss(embeddings))


def batch_hard_indices(x: torch.Tensor, labels: torch.Tensor, metric: str, normalize: bool):
    """BatchHardMiner's (a, p, n) from the op ``batch_hard_loss`` computes with (the same choices on ties)."""
    block_rows = _memory.block_rows("auto", x)
    _, positive, negative, _, _ = ops.batch_hard_triplet(x, labels, 0.0, metric, False, block_rows, normalize)
    anchors = torch.nonzero(positive >= 0).squeeze(1)
    return anchors, positive[anchors], negative[anchors]


def batch_hard_loss(embeddings, labels, loss_margin: float, metric: str, normalize: bool) -> torch.Tensor:
    """TripletMarginLoss(margin=loss_margin) over BatchHardMiner's triplets: per anchor with a triplet
    relu(M + max d(a, p) − min d(a, n)), averaged over the nonzero terms."""
    block_rows = _memory.block_rows("auto", embeddings)
    losses, positive, _, _, _ = ops.batch_hard_triplet(
        embeddings, labels, float(loss_margin), metric, False, block_rows, normalize
    )
    return _reduce(losses, positive >= 0, "mean_nonzero")
