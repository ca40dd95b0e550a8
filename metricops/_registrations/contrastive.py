"""Fake kernels and autograd formulas for the contrastive and triplet-margin ops."""

from __future__ import annotations

import math

import torch

from .._ops import ops
from .._reduction import accumulation_dtype
from ._autograd import register_autograd
from ._common import (
    LIB,
    check_embeddings,
    check_labels,
    check_metric,
    check_not_nan_arg,
    check_reduction,
    check_same_device_dtype,
    check_same_shape,
    contiguous_like,
)


# --------------------------------------------------------------------------
# contrastive_loss
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "contrastive_loss")
def _contrastive_loss_fake(x, labels, pos_margin, neg_margin, metric, squared, reduction):
    check_metric(metric)  # csrc/common/contrastive_impl.h's order: metric, reduction, inputs, margins
    check_reduction(reduction)
    check_embeddings(x, "embeddings")
    check_labels(labels, x)
    check_not_nan_arg(pos_margin, "pos_margin")
    check_not_nan_arg(neg_margin, "neg_margin")
    B = x.shape[0]
    none = reduction == "none"
    loss = x.new_empty((B, B)) if none else x.new_empty(())
    mat = (
        x.new_empty((B, B)) if none else x.new_empty((B, B), dtype=accumulation_dtype(x.dtype))
    )  # W: float32 for halves
    row_coef = x.new_empty((0,) if none else (B,), dtype=accumulation_dtype(x.dtype))
    denom = x.new_empty((), dtype=accumulation_dtype(x.dtype))
    return loss, mat, row_coef, denom


@torch.library.register_fake(LIB + "contrastive_loss_backward")
def _contrastive_loss_backward_fake(
    grad, x, labels, mat, row_coef, denom, pos_margin, neg_margin, metric, squared, reduction
):
    check_metric(metric)
    check_reduction(reduction)
    return contiguous_like(x)


def _contrastive_loss_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    x, labels, pos_margin, neg_margin, metric, squared, reduction = inputs
    _, mat, row_coef, denom = output
    ctx.args = (pos_margin, neg_margin, metric, squared, reduction)
    ctx.mark_non_differentiable(mat, row_coef, denom)
    ctx.save_for_backward(x, labels, mat, row_coef, denom)


def _contrastive_loss_backward(ctx, grad, *_unused):
    x, labels, mat, row_coef, denom = ctx.saved_tensors
    grad_x = None
    if grad is not None and ctx.needs_input_grad[0]:
        grad_x = ops.contrastive_loss_backward(grad, x, labels, mat, row_coef, denom, *ctx.args)
    return grad_x, None, None, None, None, None, None


register_autograd("contrastive_loss", _contrastive_loss_backward, _contrastive_loss_setup_context)


# --------------------------------------------------------------------------
# pair_contrastive_loss
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "pair_contrastive_loss")
def _pair_contrastive_loss_fake(x0, x1, y, margin, metric, squared):
    check_metric(metric)
    check_embeddings(x0, "x0")
    check_embeddings(x1, "x1")
    check_same_device_dtype(x0, "x0", x1, "x1")
    check_same_shape(x0, "x0", x1, "x1")
    torch._check_value(
        y.dim() == 1 and y.shape[0] == x0.shape[0],
        lambda: f"y must be a 1-D tensor of length N={x0.shape[0]} (one label per pair), got shape {tuple(y.shape)}",
    )
    torch._check_type(
        y.dtype == torch.bool,
        lambda: f"y must be a bool tensor here (the Python wrapper converts it), got {y.dtype}",
    )
    torch._check_value(y.device == x0.device, lambda: f"y must be on x0's device ({x0.device}), got {y.device}")
    check_not_nan_arg(margin, "margin")
    n = x0.shape[0]
    return x0.new_empty((n,)), x0.new_empty((n,), dtype=accumulation_dtype(x0.dtype))


@torch.library.register_fake(LIB + "pair_contrastive_loss_backward")
def _pair_contrastive_loss_backward_fake(grad, x0, x1, y, dist, margin, metric, squared):
    check_metric(metric)
    return contiguous_like(x0), contiguous_like(x1)


def _pair_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    x0, x1, y, margin, metric, squared = inputs
    _, dist = output
    ctx.args = (margin, metric, squared)
    ctx.mark_non_differentiable(dist)
    ctx.save_for_backward(x0, x1, y, dist)


def _pair_backward(ctx, grad, *_unused):
    x0, x1, y, dist = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None
    g0, g1 = ops.pair_contrastive_loss_backward(grad, x0, x1, y, dist, *ctx.args)
    return g0, g1, None, None, None, None


register_autograd("pair_contrastive_loss", _pair_backward, _pair_setup_context)


# --------------------------------------------------------------------------
# triplet_margin_loss
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "triplet_margin_loss")
def _triplet_margin_loss_fake(a, p, n, margin, norm_p, eps, swap, squared):
    for t, name in ((a, "anchor"), (p, "positive"), (n, "negative")):
        check_embeddings(t, name)
    check_same_device_dtype(a, "anchor", p, "positive")
    check_same_device_dtype(a, "anchor", n, "negative")
    check_same_shape(a, "anchor", p, "positive")
    check_same_shape(a, "anchor", n, "negative")
    check_not_nan_arg(margin, "margin")
    check_not_nan_arg(eps, "eps")
    torch._check_value(math.isfinite(norm_p) and norm_p > 0, lambda: f"p must be a finite number > 0, got {norm_p:g}")
    torch._check_value(
        not squared or norm_p == 2.0, lambda: f"squared=True requires p=2 (squared L2 distances), got p={norm_p:g}"
    )
    rows = a.shape[0]
    return a.new_empty((rows,)), a.new_empty((rows, 3), dtype=accumulation_dtype(a.dtype))


@torch.library.register_fake(LIB + "triplet_margin_loss_backward")
def _triplet_margin_loss_backward_fake(grad, a, p, n, dists, margin, norm_p, eps, swap, squared):
    return contiguous_like(a), contiguous_like(p), contiguous_like(n)


def _triplet_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    a, p, n, margin, norm_p, eps, swap, squared = inputs
    _, dists = output
    ctx.args = (margin, norm_p, eps, swap, squared)
    ctx.mark_non_differentiable(dists)
    ctx.save_for_backward(a, p, n, dists)


def _triplet_backward(ctx, grad, *_unused):
    a, p, n, dists = ctx.saved_tensors
    if grad is None:
        return (None,) * 8
    ga, gp, gn = ops.triplet_margin_loss_backward(grad, a, p, n, dists, *ctx.args)
    return ga, gp, gn, None, None, None, None, None


register_autograd("triplet_margin_loss", _triplet_backward, _triplet_setup_context)


# ------------------------------------------------------------------ streaming contrastive


@torch.library.register_fake(LIB + "contrastive_loss_streaming")
def _contrastive_streaming_fake(embeddings, labels, pos_margin, neg_margin, metric, squared, reduction, block_rows):
    check_metric(metric)
    check_embeddings(embeddings, "embeddings")  # dtypes too, as the kernel (and the matrix op's fake) does
    check_labels(labels, embeddings)
    torch._check_value(
        reduction in ("mean", "sum", "mean_nonzero"),
        lambda: "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming' "
        f"('none' returns the B×B matrix), got '{reduction}'",
    )
    return embeddings.new_empty(()), embeddings.new_empty((), dtype=torch.float64)


@torch.library.register_fake(LIB + "contrastive_loss_streaming_backward")
def _contrastive_streaming_backward_fake(
    grad, embeddings, labels, denom, pos_margin, neg_margin, metric, squared, block_rows
):
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings)
    # csrc/common/contrastive_streaming.h prepare_contrastive_streaming_backward
    torch._check_value(
        grad.dim() == 0, lambda: f"grad must be a 0-dim tensor (the loss's gradient), got shape {list(grad.shape)}"
    )
    torch._check_value(
        denom.dim() == 0, lambda: f"denom must be a 0-dim tensor (the forward's), got shape {list(denom.shape)}"
    )
    return contiguous_like(embeddings)


def _contrastive_streaming_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no B×B zero tensors
    embeddings, labels, pos_margin, neg_margin, metric, squared, reduction, block_rows = inputs
    _, denom = output
    ctx.mark_non_differentiable(denom)
    ctx.args = (pos_margin, neg_margin, metric, squared, block_rows)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(embeddings, labels, denom)


def _contrastive_streaming_backward(ctx, grad_loss, grad_denom):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 8
    embeddings, labels, denom = ctx.saved_tensors
    pos_margin, neg_margin, metric, squared, block_rows = ctx.args
    grad = torch.ops.metricops.contrastive_loss_streaming_backward(
        grad_loss, embeddings, labels, denom, pos_margin, neg_margin, metric, squared, block_rows
    )
    return (grad,) + (None,) * 7


register_autograd("contrastive_loss_streaming", _contrastive_streaming_backward, _contrastive_streaming_setup_context)
