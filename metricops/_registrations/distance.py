"""Fake (meta) kernels and autograd formulas for the native operators.

Registered from Python with torch.library so that every op traces under
torch.compile(fullgraph=True). Fake kernels repeat the C++ checks' messages.
"""

from __future__ import annotations

import torch

from .._ops import ops
from .._reduction import accumulation_dtype
from ._autograd import register_autograd, register_backward_op

_LIB = "metricops::"


def _check_embeddings(t, name):
    """The fake-kernel twin of _validation.check_embeddings / C++ check_embeddings: same wording."""
    torch._check(
        t.dim() == 2,
        lambda: f"{name} must be a 2-D tensor of shape (B, D), got {t.dim()}-D tensor of shape {tuple(t.shape)}",
    )
    allowed = (torch.float32, torch.float64)
    if t.device.type == "cuda":
        allowed = allowed + (torch.float16, torch.bfloat16)
    torch._check(
        t.dtype in allowed,
        lambda: f"{name} must be float32 or float64 (float16/bfloat16 on CUDA), got {t.dtype} on {t.device}",
    )


def _check_same_device_dtype(a, a_name, b, b_name):
    torch._check(
        a.device == b.device, lambda: f"{b_name} must be on the same device as {a_name} ({a.device}), got {b.device}"
    )
    torch._check(
        a.dtype == b.dtype, lambda: f"{b_name} must have the same dtype as {a_name} ({a.dtype}), got {b.dtype}"
    )


def _contiguous_like(t):
    """A fake output of t's shape, contiguous: the kernels return that whatever t's strides (transposed, sliced...)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _check_labels(labels, embeddings, name="labels"):
    b = embeddings.shape[0]
    torch._check(
        labels.dim() == 1 and labels.shape[0] == b,
        lambda: f"{name} must be a 1-D tensor of length B={b} (one label per embedding), got shape {tuple(labels.shape)}",
    )
    torch._check(
        labels.dtype in (torch.int32, torch.int64), lambda: f"{name} must be int32 or int64, got {labels.dtype}"
    )
    torch._check(
        labels.device == embeddings.device,
        lambda: f"{name} must be on the embeddings' device ({embeddings.device}), got {labels.device}",
    )


# --------------------------------------------------------------------------
# pairwise_distance
# --------------------------------------------------------------------------


@torch.library.register_fake(_LIB + "pairwise_distance")
def _pairwise_distance_fake(x, y, metric):
    other = x if y is None else y
    _check_embeddings(x, "x")
    _check_embeddings(other, "y")
    if y is not None:
        _check_same_device_dtype(x, "x", y, "y")
    torch._check(
        x.shape[1] == other.shape[1],
        lambda: f"y must have the same embedding size D as x ({x.shape[1]}), got shape {tuple(other.shape)}",
    )
    return x.new_empty((x.shape[0], other.shape[0]))


@torch.library.register_fake(_LIB + "pairwise_distance_backward")
def _pairwise_distance_backward_fake(grad, x, y, dist, metric):
    grad_y = x.new_empty((0, x.shape[1])) if y is None else _contiguous_like(y)
    return _contiguous_like(x), grad_y


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
register_backward_op("pairwise_distance_backward", "pairwise_distance")


# --------------------------------------------------------------------------
# l2_normalize
# --------------------------------------------------------------------------


@torch.library.register_fake(_LIB + "l2_normalize")
def _l2_normalize_fake(x, eps):
    _check_embeddings(x, "embeddings")
    return _contiguous_like(x), x.new_empty((x.shape[0],), dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake(_LIB + "l2_normalize_backward")
def _l2_normalize_backward_fake(grad, x, norm, eps):
    return _contiguous_like(x)


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
register_backward_op("l2_normalize_backward", "l2_normalize")
