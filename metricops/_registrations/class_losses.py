"""Fake kernels and autograd formulas for the class-parameter losses (ArcFace/CosFace, ProxyAnchor)."""

from __future__ import annotations

import torch

from .._ops import ops
from .._reduction import accumulation_dtype
from ._autograd import register_autograd
from ._common import LIB, check_embeddings, check_finite_arg, check_labels, check_same_device_dtype, contiguous_like


def _check_class_inputs(x, labels, weight, weight_name):
    """The fake-kernel twin of common/class_losses.h's check_class_loss_inputs: same wording."""
    check_embeddings(x, "embeddings")
    check_labels(labels, x)
    torch._check_value(
        weight.dim() == 2,
        lambda: f"{weight_name} must be a 2-D tensor of shape (C, D), got {weight.dim()}-D tensor of shape "
        f"{tuple(weight.shape)}",
    )
    check_same_device_dtype(x, "embeddings", weight, weight_name)
    torch._check_value(
        weight.shape[1] == x.shape[1],
        lambda: f"{weight_name} must have the same embedding size D as embeddings ({x.shape[1]}), got shape "
        f"{tuple(weight.shape)}",
    )
    torch._check_value(
        weight.shape[0] >= 1,
        lambda: f"{weight_name} must hold at least one class (C >= 1), got shape {tuple(weight.shape)}",
    )


def _weight_grad_like(weight):
    """The kernels return the class gradient as a contiguous (C, D) tensor, whatever weight's strides."""
    return contiguous_like(weight)


# --------------------------------------------------------------------------
# margin_softmax_loss (ArcFace, CosFace)
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "margin_softmax_loss")
def _margin_softmax_loss_fake(x, labels, weight, kind, margin, scale, class_chunk=0):
    _check_class_inputs(x, labels, weight, "weight")
    torch._check_value(kind in ("arcface", "cosface"), lambda: f"kind must be 'arcface' or 'cosface', got '{kind}'")
    check_finite_arg(scale, "scale")
    check_finite_arg(margin, "margin")
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)


@torch.library.register_fake(LIB + "margin_softmax_loss_backward")
def _margin_softmax_loss_backward_fake(grad, x, labels, weight, lse, kind, margin, scale, class_chunk=0):
    return contiguous_like(x), _weight_grad_like(weight)


def _margin_softmax_setup_context(ctx, inputs, output):
    x, labels, weight, kind, margin, scale, class_chunk = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (kind, margin, scale, class_chunk)
    ctx.save_for_backward(x, labels, weight, lse)


def _margin_softmax_backward(ctx, grad_loss, _grad_lse):
    x, labels, weight, lse = ctx.saved_tensors
    grad_x, grad_w = ops.margin_softmax_loss_backward(grad_loss, x, labels, weight, lse, *ctx.args)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None), None, (grad_w if needs[2] else None), None, None, None, None


register_autograd("margin_softmax_loss", _margin_softmax_backward, _margin_softmax_setup_context)


# --------------------------------------------------------------------------
# proxy_anchor_loss
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "proxy_anchor_loss")
def _proxy_anchor_loss_fake(x, labels, proxies, margin, alpha, class_chunk=0, save_tile=False, normalize=False):
    _check_class_inputs(x, labels, proxies, "proxies")
    check_finite_arg(alpha, "alpha")
    check_finite_arg(margin, "margin")
    acc = accumulation_dtype(x.dtype)
    C = proxies.shape[0]
    tile = x.new_empty((C if save_tile else 0, x.shape[0]), dtype=acc)
    return x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc), tile


@torch.library.register_fake(LIB + "proxy_anchor_loss_backward")
def _proxy_anchor_loss_backward_fake(
    grad_pos, grad_neg, x, labels, proxies, pos, neg, tile, margin, alpha, class_chunk=0, normalize=False
):
    return contiguous_like(x), _weight_grad_like(proxies)


def _proxy_anchor_setup_context(ctx, inputs, output):
    x, labels, proxies, margin, alpha, class_chunk, save_tile, normalize = inputs
    pos, neg, tile = output
    ctx.mark_non_differentiable(tile)  # the dot products, saved for the backward only
    ctx.set_materialize_grads(False)  # else autograd fills a (C, B) zero gradient for the tile on every backward
    ctx.args = (margin, alpha, class_chunk, normalize)
    ctx.save_for_backward(x, labels, proxies, pos, neg, tile)


def _proxy_anchor_backward(ctx, grad_pos, grad_neg, _grad_tile):
    x, labels, proxies, pos, neg, tile = ctx.saved_tensors
    if grad_pos is None and grad_neg is None:
        return (None,) * 8
    grad_pos = torch.zeros_like(pos) if grad_pos is None else grad_pos
    grad_neg = torch.zeros_like(neg) if grad_neg is None else grad_neg
    grad_x, grad_p = ops.proxy_anchor_loss_backward(grad_pos, grad_neg, x, labels, proxies, pos, neg, tile, *ctx.args)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None), None, (grad_p if needs[2] else None), None, None, None, None, None


register_autograd("proxy_anchor_loss", _proxy_anchor_backward, _proxy_anchor_setup_context)


# --------------------------------------------------------------------------
# proxy_anchor_loss_and_grad (the reduced loss, its gradient from the same pass)
# --------------------------------------------------------------------------


@torch.library.register_fake(LIB + "proxy_anchor_loss_and_grad")
def _proxy_anchor_loss_and_grad_fake(
    x, labels, proxies, margin, alpha, class_chunk=0, normalize=False, grad_embeddings=False, grad_proxies=False
):
    _check_class_inputs(x, labels, proxies, "proxies")
    check_finite_arg(alpha, "alpha")
    check_finite_arg(margin, "margin")
    acc = accumulation_dtype(x.dtype)
    C, D = proxies.shape
    grad_x = x.new_empty((x.shape[0] if grad_embeddings else 0, D))
    grad_p = x.new_empty((C if grad_proxies else 0, D))
    return x.new_empty((), dtype=acc), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc), grad_x, grad_p


def _proxy_anchor_and_grad_setup_context(ctx, inputs, output):
    x, labels, proxies, margin, alpha, class_chunk, normalize, want_grad_x, want_grad_p = inputs
    _loss, pos, neg, grad_x, grad_p = output
    ctx.mark_non_differentiable(grad_x, grad_p)  # the loss's gradient, for this backward only
    ctx.set_materialize_grads(False)  # else autograd fills zero gradients for the outputs not used
    ctx.args = (margin, alpha, class_chunk, normalize)
    # Held on ctx, not saved: the first backward scales them in place and hands them over (no second (C, D)
    # copy at C = 10⁶), then drops them; a retained graph's later backward recomputes. Non-differentiable, they
    # have no grad_fn, so ctx holding them makes no reference cycle.
    ctx.forward_grads = (grad_x if want_grad_x else None, grad_p if want_grad_p else None)
    ctx.save_for_backward(x, labels, proxies, pos, neg)


def _proxy_anchor_and_grad_backward(ctx, grad_loss, grad_pos, grad_neg, _grad_x, _grad_p):
    x, labels, proxies, pos, neg = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_loss is None and grad_pos is None and grad_neg is None:
        return (None,) * 9
    # The forward's gradients, scaled, when they are the ones needed, only the loss is differentiated and this
    # backward is not itself differentiated (create_graph, nested torch.func.grad): scaling constants would
    # silently give a zero second derivative, where the backward op below refuses it.
    forward_x, forward_p = ctx.forward_grads
    have_all = (forward_x is not None or not needs[0]) and (forward_p is not None or not needs[2])
    if have_all and grad_pos is None and grad_neg is None and not torch.is_grad_enabled():
        ctx.forward_grads = (None, None)  # handed over: a retained graph's next backward recomputes
        traced = torch.compiler.is_compiling()  # traced: out of place (AOTAutograd would copy a mutated input back)
        grad_x, grad_p = (
            None if g is None else (g * grad_loss.to(g.dtype) if traced else g.mul_(grad_loss.to(g.dtype)))
            for g in (forward_x, forward_p)
        )
    else:  # one backward pass recomputing the dot products, with every class's two upstream gradients
        C = proxies.shape[0]
        grad_pos = torch.zeros_like(pos) if grad_pos is None else grad_pos
        grad_neg = torch.zeros_like(neg) if grad_neg is None else grad_neg
        if grad_loss is not None:
            present = torch.zeros(C, dtype=torch.bool, device=labels.device).index_fill(0, labels.long(), True)
            grad_pos = grad_pos + grad_loss / present.sum().clamp_min(1).to(grad_loss.dtype)
            grad_neg = grad_neg + grad_loss / C
        no_tile = pos.new_empty((0, x.shape[0]))
        grad_x, grad_p = ops.proxy_anchor_loss_backward(
            grad_pos, grad_neg, x, labels, proxies, pos, neg, no_tile, *ctx.args
        )
    return (grad_x if needs[0] else None), None, (grad_p if needs[2] else None), *(None,) * 6


register_autograd("proxy_anchor_loss_and_grad", _proxy_anchor_and_grad_backward, _proxy_anchor_and_grad_setup_context)
