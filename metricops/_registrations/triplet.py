"""Fake kernels and autograd for the triplet ops."""

from __future__ import annotations

import torch

from .._ops import ops
from .._reduction import accumulation_dtype  # the summed outputs' dtype
from ._autograd import register_autograd, register_not_differentiable
from ._common import LIB, check_embeddings, check_finite_arg, check_labels, check_metric, contiguous_like


def _check_batch(embeddings, labels, margin, metric):
    """csrc/common/triplet_impl.h prepare_labelled_batch's checks, in its order: metric, inputs, margin."""
    check_metric(metric)
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings)
    check_finite_arg(margin, "margin")


# ------------------------------------------------------------------ batch-hard


@torch.library.register_fake(LIB + "batch_hard_triplet")
def _batch_hard_fake(embeddings, labels, margin, metric, soft, block_rows, normalize=False):
    _check_batch(embeddings, labels, margin, metric)
    B = embeddings.shape[0]
    index = embeddings.new_empty((B,), dtype=torch.int64)
    return (
        embeddings.new_empty((B,)),
        index,
        torch.empty_like(index),
        embeddings.new_empty((B,)),
        embeddings.new_empty((B,)),
    )


@torch.library.register_fake(LIB + "batch_hard_triplet_backward")
def _batch_hard_backward_fake(
    grad_losses,
    grad_dist_ap,
    grad_dist_an,
    embeddings,
    positive,
    negative,
    dist_ap,
    dist_an,
    margin,
    metric,
    soft,
    normalize=False,
):
    return contiguous_like(embeddings)


def _batch_hard_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    embeddings, labels, margin, metric, soft, block_rows, normalize = inputs  # defaults filled in
    _, positive, negative, dist_ap, dist_an = output
    ctx.margin, ctx.metric, ctx.soft, ctx.normalize = margin, metric, soft, normalize
    ctx.mark_non_differentiable(positive, negative)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(embeddings, positive, negative, dist_ap, dist_an)


def _batch_hard_backward(ctx, grad_losses, grad_positive, grad_negative, grad_dist_ap, grad_dist_an):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    embeddings, positive, negative, dist_ap, dist_an = ctx.saved_tensors
    zeros = torch.zeros_like(dist_ap)
    grad = ops.batch_hard_triplet_backward(
        zeros if grad_losses is None else grad_losses,
        zeros if grad_dist_ap is None else grad_dist_ap,
        zeros if grad_dist_an is None else grad_dist_an,
        embeddings,
        positive,
        negative,
        dist_ap,
        dist_an,
        ctx.margin,
        ctx.metric,
        ctx.soft,
        ctx.normalize,
    )
    return grad, None, None, None, None, None, None


register_autograd("batch_hard_triplet", _batch_hard_backward, _batch_hard_setup_context)

# ------------------------------------------------------------------ semi-hard


@torch.library.register_fake(LIB + "semihard_triplet")
def _semihard_fake(embeddings, labels, margin, metric):
    _check_batch(embeddings, labels, margin, metric)
    B = embeddings.shape[0]
    return embeddings.new_empty((B, B)), embeddings.new_empty((B, B), dtype=torch.int64), embeddings.new_empty((B, B))


def _semihard_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    embeddings, labels, margin, metric = inputs
    losses, negative, dist = output
    ctx.metric = metric
    ctx.mark_non_differentiable(negative)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(embeddings, losses, negative, dist)


def _semihard_backward(ctx, grad_losses, grad_negative, grad_dist):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    embeddings, losses, negative, dist = ctx.saved_tensors
    if grad_losses is None:
        grad_losses = torch.zeros_like(losses)
    grad = ops.semihard_triplet_backward(grad_losses, grad_dist, embeddings, losses, negative, dist, ctx.metric)
    return grad, None, None, None


@torch.library.register_fake(LIB + "semihard_triplet_backward")
def _semihard_backward_fake(grad_losses, grad_dist, embeddings, losses, negative, dist, metric):
    check_metric(metric)
    return contiguous_like(embeddings)


register_autograd("semihard_triplet", _semihard_backward, _semihard_setup_context)

# ------------------------------------------------------------------ batch-all


@torch.library.register_fake(LIB + "batch_all_triplet")
def _batch_all_fake(embeddings, labels, margin, metric):
    _check_batch(embeddings, labels, margin, metric)
    B = embeddings.shape[0]
    count = embeddings.new_empty((), dtype=torch.int64)
    return (
        embeddings.new_empty((), dtype=accumulation_dtype(embeddings.dtype)),
        count,
        torch.empty_like(count),
        embeddings.new_empty((B, B)),
        embeddings.new_empty((B, B)),
    )


def _batch_all_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    embeddings, labels, margin, metric = inputs
    _, num_valid, num_active, dist, multiplicity = output
    ctx.metric = metric
    ctx.mark_non_differentiable(num_valid, num_active, multiplicity)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(embeddings, dist, multiplicity)


def _batch_all_backward(ctx, grad_sum, grad_valid, grad_active, grad_dist, grad_multiplicity):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    embeddings, dist, multiplicity = ctx.saved_tensors
    coef = torch.zeros_like(dist) if grad_dist is None else grad_dist.clone()
    if grad_sum is not None:
        coef = coef + grad_sum * multiplicity
    grad, _ = ops.pairwise_distance_backward(coef, embeddings, None, dist, ctx.metric)
    return grad, None, None, None


register_autograd("batch_all_triplet", _batch_all_backward, _batch_all_setup_context)

# ------------------------------------------------------------------ streaming semi-hard and batch-all
# The backwards recompute (and re-mine) the distances block by block, so
# only the embeddings and labels are saved.


@torch.library.register_fake(LIB + "semihard_triplet_streaming")
def _semihard_streaming_fake(embeddings, labels, margin, metric, block_rows):
    _check_batch(embeddings, labels, margin, metric)
    B = embeddings.shape[0]
    count = embeddings.new_empty((B,), dtype=torch.int64)
    return embeddings.new_empty((B,), dtype=accumulation_dtype(embeddings.dtype)), count, torch.empty_like(count)


@torch.library.register_fake(LIB + "batch_all_triplet_streaming")
def _batch_all_streaming_fake(embeddings, labels, margin, metric, block_rows):
    _check_batch(embeddings, labels, margin, metric)
    count = embeddings.new_empty((), dtype=torch.int64)
    return embeddings.new_empty((), dtype=accumulation_dtype(embeddings.dtype)), count, torch.empty_like(count)


@torch.library.register_fake(LIB + "semihard_triplet_streaming_backward")
@torch.library.register_fake(LIB + "batch_all_triplet_streaming_backward")
def _streaming_backward_fake(grad, embeddings, labels, margin, metric, block_rows):
    check_metric(metric)
    return contiguous_like(embeddings)


def _streaming_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    embeddings, labels, margin, metric, block_rows = inputs
    ctx.margin, ctx.metric, ctx.block_rows = margin, metric, block_rows
    ctx.mark_non_differentiable(output[1], output[2])
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(embeddings, labels)


def _streaming_backward(backward_op):
    def backward(ctx, grad_sum, grad_valid, grad_active):
        if grad_sum is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        embeddings, labels = ctx.saved_tensors
        grad = backward_op(grad_sum, embeddings, labels, ctx.margin, ctx.metric, ctx.block_rows)
        return grad, None, None, None, None

    return backward


for _name in ("semihard_triplet_streaming", "batch_all_triplet_streaming"):
    register_autograd(_name, _streaming_backward(getattr(ops, _name + "_backward")), _streaming_setup_context)

# ------------------------------------------------------------------ statistics and miner


@torch.library.register_fake(LIB + "triplet_statistics")
def _statistics_fake(embeddings, labels, margin, metric):
    _check_batch(embeddings, labels, margin, metric)
    return embeddings.new_empty((4,), dtype=torch.int64)


register_not_differentiable("triplet_statistics")  # integer counts


@torch.library.register_fake(LIB + "mine_triplets")
def _mine_fake(embeddings, labels, strategy, margin, metric):
    check_metric(metric)  # the kernel's order: metric, strategy, inputs
    torch._check_value(
        strategy in ("all", "violating", "semihard", "hard", "easy", "batch_hard"),
        lambda: "strategy must be one of 'all', 'violating', 'semihard', 'hard', 'easy', 'batch_hard', "
        f"got '{strategy}'",
    )
    _check_batch(embeddings, labels, margin, metric)
    n = torch.library.get_ctx().new_dynamic_size()
    index = embeddings.new_empty((n,), dtype=torch.int64)
    return index, torch.empty_like(index), torch.empty_like(index)


register_not_differentiable("mine_triplets")  # integer indices


@torch.library.register_fake(LIB + "triplet_interval_weights")
def _interval_weights_fake(dist, labels, lower, has_lower, upper, upper_inclusive):
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square (B, B) distance matrix, got shape {tuple(dist.shape)}")
    check_embeddings(dist, "dist")
    check_labels(labels, dist)
    weight_dtype = torch.float64 if dist.dtype == torch.float64 else torch.float32
    B = dist.shape[0]
    return dist.new_empty((B, B), dtype=weight_dtype), dist.new_empty((B,), dtype=torch.int64)


register_not_differentiable("triplet_interval_weights")  # integer counts
