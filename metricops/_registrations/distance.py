"""Fake (meta) kernels and autograd formulas for the native operators.

Registered from Python with torch.library so that every op traces under
torch.compile(fullgraph=True). Fake kernels repeat the C++ checks' messages.
"""

from __future__ import annotations

import torch

from .._ops import ops

_LIB = "metricops::"


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"metricops: double backward of {name} is not supported")

    return backward


# --------------------------------------------------------------------------
# pairwise_distance
# --------------------------------------------------------------------------


@torch.library.register_fake(_LIB + "pairwise_distance")
def _pairwise_distance_fake(x, y, metric):
    other = x if y is None else y
    torch._check(x.dim() == 2, lambda: f"x must be a 2-D tensor of shape (B, D), got {x.dim()}-D")
    torch._check(other.dim() == 2, lambda: f"y must be a 2-D tensor of shape (B, D), got {other.dim()}-D")
    torch._check(
        x.shape[1] == other.shape[1],
        lambda: f"y must have the same embedding size D as x ({x.shape[1]}), got shape {tuple(other.shape)}",
    )
    return x.new_empty((x.shape[0], other.shape[0]))


@torch.library.register_fake(_LIB + "pairwise_distance_backward")
def _pairwise_distance_backward_fake(grad, x, y, dist, metric):
    grad_y = x.new_empty((0, x.shape[1])) if y is None else torch.empty_like(y)
    return torch.empty_like(x), grad_y


def _pairwise_distance_setup_context(ctx, inputs, output):
    x, y, metric = inputs
    ctx.metric = metric
    ctx.y_is_none = y is None
    ctx.save_for_backward(x, y, output)


def _pairwise_distance_backward(ctx, grad):
    x, y, dist = ctx.saved_tensors
    grad_x, grad_y = ops.pairwise_distance_backward(grad, x, None if ctx.y_is_none else y, dist, ctx.metric)
    return grad_x, (None if ctx.y_is_none else grad_y), None


torch.library.register_autograd(
    _LIB + "pairwise_distance", _pairwise_distance_backward, setup_context=_pairwise_distance_setup_context
)
torch.library.register_autograd(
    _LIB + "pairwise_distance_backward",
    _no_double_backward("pairwise_distance"),
    setup_context=lambda ctx, inputs, output: None,
)
