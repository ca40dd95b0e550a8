"""Metric-learning losses over a batch split across ``torch.distributed`` ranks.

In data-parallel training each process holds a shard ``(B_r, D)`` of the
global batch. Metric-learning losses compare every embedding with every other,
so a rank that only sees its shard misses most pairs. :func:`all_gather_embeddings`
builds the global batch on every rank (gradient flowing back to the local
shard), and :class:`DistributedLoss` scores the local anchors against it, as
pytorch-metric-learning's ``DistributedLossWrapper`` does, but exactly: the
per-rank losses add up to the single-process loss on the concatenated batch.

Works with any backend that implements ``all_gather`` and ``all_reduce``
(gloo on CPU, NCCL on GPU). Without an initialized process group, or with a
world size of 1, everything reduces to the single-process computation.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _validation as v
from .contrastive import _contrastive_rows_sum
from ._reduction import accumulation_dtype, loss_dtype, mean_of_sum
from .nn import BatchHardTripletLoss, ContrastiveLoss, SemiHardTripletLoss
from .triplet import _semihard_anchor_sums, batch_hard_triplet_loss

__all__ = ["all_gather_embeddings", "DistributedLoss"]


def _active_world(group) -> Tuple[int, int]:
    """(rank, world_size) in ``group``, or (0, 1) when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_padded(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenation over ranks of ``x`` (rank r holds ``sizes[r]`` rows).

    all_gather needs equal shapes, so every shard is padded to the largest
    and the padding is trimmed after.
    """
    max_b = max(sizes)
    if max_b == 0:  # nothing to send; some backends dislike empty collectives
        return x.new_empty((0,) + tuple(x.shape[1:]))
    x = x.contiguous()
    if x.shape[0] < max_b:
        pad = x.new_zeros((max_b - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    chunks = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(chunks, x, group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gathered gradient.

    Every rank's loss may depend on every shard, so the gradient of the sum of
    all ranks' losses w.r.t. rank r's shard is the sum over ranks of their
    gradient w.r.t. the gathered tensor, restricted to rank r's rows.
    all_reduce (rather than reduce_scatter) because gloo lacks reduce_scatter
    and shards may have different sizes; it moves ``B_total·D`` values.
    """

    @staticmethod
    def forward(x, sizes, rank, group):
        return _all_gather_padded(x, sizes, group)

    # setup_context (not ctx in forward) so that torch.func transforms can run it.
    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.sizes, ctx.rank, ctx.group = inputs

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "metricops.distributed: forward-mode AD (torch.func.jvp/jacfwd, torch.autograd.forward_ad) is not "
            "supported through all_gather_embeddings; use reverse mode (torch.autograd.grad, torch.func.grad/jacrev)"
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # clone: all_reduce works in place and `grad` may be shared with other nodes.
        grad = grad.clone(memory_format=torch.contiguous_format)
        if grad.numel() > 0:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


_DTYPE_LIST = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)
_DTYPE_CODES = {dt: k for k, dt in enumerate(_DTYPE_LIST)}
_DTYPES_BY_CODE = {k: str(dt) for k, dt in enumerate(_DTYPE_LIST)}


def _gather(embeddings, labels, group) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(all_embeddings, all_labels, offset of the local shard, world_size)."""
    v.check_tensor(embeddings, "embeddings")
    v.check_tensor(labels, "labels")
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be a 2-D tensor of shape (B, D), got {embeddings.dim()}-D tensor "
            f"of shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating tensor, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be a 1-D tensor of length B={embeddings.shape[0]} (one label per embedding), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.device != embeddings.device:
        raise ValueError(f"labels must be on the embeddings' device ({embeddings.device}), got {labels.device}")
    rank, world = _active_world(group)
    if world == 1:
        return embeddings, labels, 0, 1
    # Shapes first: shards may differ in B; D must agree. Every rank sees the
    # same table, so every rank raises together (no rank left hanging).
    # The dtypes too: a collective between shards of different dtypes aborts one rank (gloo) and hands another
    # reinterpreted bytes.
    codes = [_DTYPE_CODES.get(embeddings.dtype, -1), _DTYPE_CODES.get(labels.dtype, -1)]
    shape = torch.tensor(
        [embeddings.shape[0], embeddings.shape[1], *codes], dtype=torch.int64, device=embeddings.device
    )
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    table = [tuple(int(s) for s in t.tolist()) for t in shapes]
    shapes = [(b, d) for b, d, _, _ in table]
    dims = {d for _, d in shapes}
    if len(dims) != 1:
        raise ValueError(f"embeddings must have the same size D on every rank, got (B, D) per rank = {shapes}")
    for name, k in (("embeddings", 2), ("labels", 3)):
        if len({row[k] for row in table}) != 1:
            dtypes = [_DTYPES_BY_CODE.get(row[k], "another dtype") for row in table]
            raise TypeError(f"{name} must have the same dtype on every rank, got per rank {dtypes}")
    sizes = [b for b, _ in shapes]
    all_labels = _all_gather_padded(labels, sizes, group)
    all_embeddings = _GatherWithGrad.apply(embeddings, sizes, rank, group)
    return all_embeddings, all_labels, sum(sizes[:rank]), world


def all_gather_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, *, group: Optional[object] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's ``(embeddings, labels)``, in rank order.

    Args:
        embeddings: ``(B_r, D)`` floating tensor, this rank's shard. ``B_r`` may
            differ across ranks (shards are padded for the collective and
            trimmed after); ``D`` must not (``ValueError`` on every rank).
        labels: ``(B_r,)`` tensor on the embeddings' device.
        group: process group (default: the world).

    Returns:
        ``(all_embeddings (B, D), all_labels (B,))`` with ``B = sum_r B_r``;
        rank r's shard occupies rows ``sum_{s<r} B_s`` to ``sum_{s<=r} B_s``.
        Without an initialized process group, or with world size 1, the inputs
        are returned unchanged.

    Gradient: the backward all-reduces (sums over ranks) the gradient of the
    gathered tensor and returns this rank's rows, i.e. the local shard receives
    ``d(sum over ranks of each rank's loss) / d(local shard)``. Labels carry no
    gradient. The backward is a collective: every rank must backpropagate
    through its gathered tensor, the same number of times, in the same order.
    Not twice differentiable. Tensors must be on a device the backend supports
    (CPU for gloo, CUDA for NCCL).
    """
    all_embeddings, all_labels, _, _ = _gather(embeddings, labels, group)
    return all_embeddings, all_labels


def _anchor_has_positive_and_negative(labels: torch.Tensor):
    """Per anchor: (has a positive, has a negative) in ``labels``."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    count = counts[inverse]
    return count >= 2, count < labels.shape[0]


def _share(local_sum: torch.Tensor, reduction: str, count, dtype: torch.dtype) -> torch.Tensor:
    """This rank's summed terms divided by what the single-process loss divides
    by (``count``; nothing for "sum"), returned in ``dtype``. ``local_sum`` is
    kept in float32 for float16/bfloat16 terms, whose range the sums and counts
    of a global batch exceed."""
    if reduction == "sum":
        return local_sum.to(dtype)
    return mean_of_sum(local_sum, torch.as_tensor(count, device=local_sum.device), dtype)


def _local_anchors_sum(module, kw, reduction, all_emb, all_labels, local, world, group):
    """(sum of the terms whose anchor is in ``local``, the single-process loss's
    denominator for ``reduction``) for a batch-hard, semi-hard or contrastive module."""
    if isinstance(module, BatchHardTripletLoss):
        terms = batch_hard_triplet_loss(all_emb, all_labels, reduction="none", **kw)  # (B,), any memory mode
        if reduction == "mean":
            has_pos, has_neg = _anchor_has_positive_and_negative(all_labels)
            count = (has_pos & has_neg).sum()
        else:
            count = (terms > 0).sum()
        return terms[local].sum(dtype=accumulation_dtype(terms.dtype)), count
    if isinstance(module, SemiHardTripletLoss):
        # Per-anchor sums over the whole batch (streamed when `memory` streams) give the global counts too.
        row_sum, row_valid, row_active = _semihard_anchor_sums(all_emb, all_labels, **kw)
        return row_sum[local].sum(), (row_valid if reduction == "mean" else row_active).sum()
    # Contrastive: only the local anchors' rows (B_r × B distances; in row blocks when `memory` streams).
    local_sum, num_nonzero = _contrastive_rows_sum(all_emb, all_labels, local, **kw)
    if reduction == "mean":
        b = all_labels.shape[0]
        return local_sum, b * (b - 1)  # ordered pairs i != j
    if world > 1:  # mean_nonzero: the ranks' rows partition the pairs, so their counts add up
        dist.all_reduce(num_nonzero, op=dist.ReduceOp.SUM, group=group)
    return local_sum, num_nonzero


class DistributedLoss(torch.nn.Module):
    """Scores this rank's anchors against the global batch gathered from all ranks.

    ``forward(embeddings (B_r, D), labels (B_r,)) -> scalar``. The batch is
    gathered with :func:`all_gather_embeddings` (shards may differ in size).

    **Normalization.** Let ``L`` be ``loss_module(E, Y)`` computed by one process
    on the concatenated batch ``(E, Y)``, with the module's own reduction. Rank
    r returns ``loss_r`` such that ``sum_r loss_r == L`` exactly: its share is
    the sum of the terms whose anchor is one of its rows, divided by the
    global denominator of ``L`` (valid anchors or pairs for ``"mean"``, global
    count of non-zero terms for ``"mean_nonzero"``, 1 for ``"sum"``). Because
    the gather's backward sums gradients over ranks, the gradients summed over
    ranks (of the embeddings, hence of replicated parameters) equal those of
    the single process on the concatenated batch.

    ``DistributedDataParallel`` *averages* gradients over ranks, which gives
    ``grad(L) / world_size``. ``scale_by_world_size=True`` multiplies each
    rank's loss by ``world_size`` so that DDP's averaged gradient equals the
    single-process gradient exactly (then ``sum_r loss_r == world_size · L``;
    to log ``L``, all-reduce ``loss / world_size``).

    **Per module.** The module's attributes are read at every forward.
    ``BatchHardTripletLoss``: its ``(B,)`` per-anchor terms on the global batch
    (any ``memory``), the local anchors' kept. ``SemiHardTripletLoss``: the
    per-anchor sums of its terms on the global batch, from the streaming op
    when the module's ``memory`` streams (no ``B × B`` matrix). ``ContrastiveLoss``:
    only the local anchors' rows are computed (``B_r × B`` distances; in row
    blocks, recomputed in the backward, when ``memory`` streams); for
    ``"mean_nonzero"`` the ranks' counts of non-zero terms are all-reduced.
    With ``reduction="none"`` the local rows are returned (``(B_r,)`` or
    ``(B_r, B)``) without any scaling; as in the module itself, semi-hard and
    contrastive refuse it with ``memory="streaming"``.
    ``BatchAllTripletLoss`` has no per-anchor form here, so each rank
    computes ``L`` on the global batch and returns ``L / world_size``: the
    same sum, but every rank spends the full compute. Any other module taking
    ``(embeddings, labels)`` and returning a scalar is handled the same way.

    Except for contrastive, every rank computes the distances of the whole
    ``B × B`` global batch (the kernels work on one batch), so the compute per
    rank is that of the single-process loss; the gain is in the model's
    forward and backward.
    """

    def __init__(self, loss_module: torch.nn.Module, *, scale_by_world_size: bool = False, group=None):
        super().__init__()
        if not isinstance(loss_module, torch.nn.Module):
            raise TypeError(f"loss_module must be a torch.nn.Module, got {type(loss_module).__name__}")
        v.check_flag(scale_by_world_size, "scale_by_world_size")
        self.loss_module = loss_module
        self.scale_by_world_size = scale_by_world_size
        self.group = group

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        all_emb, all_labels, start, world = _gather(embeddings, labels, self.group)
        local = slice(start, start + embeddings.shape[0])
        module = self.loss_module
        if isinstance(module, (BatchHardTripletLoss, SemiHardTripletLoss, ContrastiveLoss)):
            kw = module._loss_kwargs()
            reduction = kw.pop("reduction")
            if reduction == "none":
                # The local anchors' rows of the module's own output ((B,) or (B, B)); with
                # memory="streaming" semi-hard and contrastive refuse it, as the module does.
                return type(module)._fn(all_emb, all_labels, reduction="none", **kw)[local]
            local_sum, count = _local_anchors_sum(module, kw, reduction, all_emb, all_labels, local, world, self.group)
            share = _share(local_sum, reduction, count, loss_dtype(all_emb))
        else:
            # BatchAllTripletLoss and any other scalar loss: the whole loss, split evenly.
            loss = module(all_emb, all_labels)
            if loss.dim() != 0:
                raise ValueError(
                    f"loss_module must return a scalar for DistributedLoss (got shape {tuple(loss.shape)}); "
                    "only BatchHard/SemiHard/Contrastive losses support reduction='none' here"
                )
            share = loss / world
        return share * world if self.scale_by_world_size else share

    def extra_repr(self) -> str:
        return f"scale_by_world_size={self.scale_by_world_size}"
