"""Fake kernels and autograd formulas for pairwise_distance and l2_normalize."""

from __future__ import annotations

import torch

from .._ops import ops
from .._reduction import accumulation_dtype
from ._autograd import register_autograd
from ._common import LIB, check_embeddings, check_metric, check_positive_eps, check_same_device_dtype, contiguous_like


# --------------------------------------------------------------------------
# pairwise_distance
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "pairwise_distance")
def _pairwise_distance_fake(x, y, metric):
    other = x if y is None else y
    check_metric(metric)
    check_embeddings(x, "x")
    check_embeddings(other, "y")
    if y is not None:
        check_same_device_dtype(x, "x", y, "y")
    torch._check_value(
        x.shape[1] == other.shape[1],
        lambda: f"y must have the same embedding size D as x ({x.shape[1]}), got shape {tuple(other.shape)}",
    )
    return x.new_empty((x.shape[0], other.shape[0]))


@torch.library.register_fake(LIB + "pairwise_distance_backward")
def _pairwise_distance_backward_fake(grad, x, y, dist, metric):
    check_metric(metric)
    grad_y = x.new_empty((0, x.shape[1])) if y is None else contiguous_like(y)
    return contiguous_like(x), grad_y


def _pairwise_distance_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    x, y, metric = inputs
    ctx.metric = metric
    ctx.y_is_none = y is None
    ctx.save_for_backward(x, y, output)


def _pairwise_distance_backward(ctx, grad):
    if grad is None:
        return None, None, None
    x, y, dist = ctx.saved_tensors
    grad_x, grad_y = ops.pairwise_distance_backward(grad, x, None if ctx.y_is_none else y, dist, ctx.metric)
    return grad_x, (None if ctx.y_is_none else grad_y), None


register_autograd("pairwise_distance", _pairwise_distance_backward, _pairwise_distance_setup_context)


# --------------------------------------------------------------------------
# l2_normalize
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "l2_normalize")
def _l2_normalize_fake(x, eps):
    check_embeddings(x, "embeddings")
    check_positive_eps(eps)
    return contiguous_like(x), x.new_empty((x.shape[0],), dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake(LIB + "l2_normalize_backward")
def _l2_normalize_backward_fake(grad, x, norm, eps):
    check_positive_eps(eps)
    return contiguous_like(x)


def _l2_normalize_setup_context(ctx, inputs, output):
    x, eps = inputs
    _, norm = output
    ctx.eps = eps
    ctx.mark_non_differentiable(norm)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(x, norm)


def _l2_normalize_backward(ctx, grad_y, grad_norm):
    if grad_y is None or not ctx.needs_input_grad[0]:
        return None, None
    x, norm = ctx.saved_tensors
    return ops.l2_normalize_backward(grad_y, x, norm, ctx.eps), None


register_autograd("l2_normalize", _l2_normalize_backward, _l2_normalize_setup_context)
