"""Autograd kernels for the native ops that also work under torch.func, and refuse forward mode loudly.

Why not ``torch.library.register_autograd`` (read in torch 2.14):

- its kernel wraps the formula in a legacy ``autograd.Function`` and calls
  ``.apply``; under any torch.func transform, ``Function.apply`` reroutes to
  functorch's ``custom_function_call``, which needs ``setup_context`` and is
  meant for Functions called from Python, above the dispatcher. So
  ``torch.func.grad``/``vjp``/``jacrev`` raised "must override the
  setup_context staticmethod", naming nothing the user wrote;
- it records the node only if an input ``requires_grad``. A forward-mode
  dual tensor does not, so ``jvp``/``jacfwd``/``forward_ad`` ran the op
  untracked and silently got zero tangents.

Here the Autograd kernel applies a ``_SingleLevelFunction`` (the autograd.Function
base without the functorch rerouting; functorch itself builds its per-level
Functions from it). The kernel sits where ATen's autograd kernels do: under a
torch.func transform the dispatcher hands it the tensors of the transform's
level, so recording the node on them is what a built-in op does, and the
backward ops dispatch through the lower levels (vmap's per-sample fallback
included). Forward mode reaches the ``jvp`` staticmethod, which raises a
``NotImplementedError`` naming the op.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch._functorch.utils import enable_single_level_autograd_function

from .._ops import ops
from ._common import IMPL


def _needs_autograd(args) -> bool:
    """Whether the op must record an autograd node (else it runs below autograd, as torch's kernel does)."""
    return (
        (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
        # Dual tensors do not require grad: inside a dual level, apply() looks for tangents (and calls jvp).
        or forward_ad._current_level >= 0
        # torch.func.grad/vjp/jvp wrap the inputs per level; apply() sees their grads and tangents.
        or torch._C._are_functorch_transforms_active()
    )


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """Register ``metricops::name``'s autograd formula; same contract as torch.library.register_autograd.

    ``setup_context(ctx, inputs, output)`` gets every schema argument, defaults
    filled in; ``backward(ctx, *grads)`` returns one gradient (or None) per
    schema argument.
    """
    op = getattr(ops, name).default
    defaults = tuple(a.default_value for a in op._schema.arguments)

    def forward(*args_and_modes):
        *args, (grad_mode, forward_grad_mode) = args_and_modes
        # apply() turned both grad modes off; restore the caller's, so that under nested torch.func
        # transforms the levels below this one still record their nodes (else grad(grad(f)) silently gives 0).
        with torch.set_grad_enabled(grad_mode), forward_ad._set_fwd_grad_enabled(forward_grad_mode):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

    def setup_context_without_modes(ctx, inputs, output):
        setup_context(ctx, inputs[:-1], output)

    def backward_without_modes(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = needs_input_grad[:-1]
            grad_inputs = backward(ctx, *grads)
            return (grad_inputs if isinstance(grad_inputs, tuple) else (grad_inputs,)) + (None,)
        finally:
            ctx.needs_input_grad = needs_input_grad

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"metricops::{name}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) "
            "is not supported; use reverse mode (torch.func.jacrev, torch.func.vjp, torch.func.grad, "
            "torch.autograd.grad)"
        )

    function = type(
        f"metricops_{name}",
        (torch.autograd.function._SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context_without_modes),
            "backward": staticmethod(backward_without_modes),
            "jvp": staticmethod(jvp),
        },
    )

    def autograd_kernel(keyset, *args):
        if not _needs_autograd(args):
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        args = args + defaults[len(args) :]  # the dispatcher drops trailing arguments equal to their defaults
        modes = (torch.is_grad_enabled(), torch._C._is_fwd_grad_enabled())
        with enable_single_level_autograd_function():  # else apply() refuses to run under a torch.func transform
            return function.apply(*args, modes)

    IMPL.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def register_backward_op(name: str, forward_name: str) -> None:
    """``metricops::name`` computes ``forward_name``'s gradient: differentiating it again is refused."""

    def backward(ctx, *grads):
        raise RuntimeError(f"metricops: double backward of {forward_name} is not supported")

    register_autograd(name, backward, lambda ctx, inputs, output: None)


def register_not_differentiable(name: str) -> None:
    """``metricops::name``'s outputs carry no gradient (integer results, or detached by design).

    Its Autograd kernel runs the op below autograd, so the outputs never
    require grad, even for inputs that do. (Without one, the dispatcher's
    fallback ran the CPU kernel with autograd still on, and its internal
    ``out=`` GEMMs refused inputs that require grad.)
    """
    op = getattr(ops, name).default

    def autograd_kernel(keyset, *args):
        # Detached: the kernels' internal out= GEMMs refuse inputs that require grad, even below autograd.
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    IMPL.impl(name, autograd_kernel, "Autograd", with_keyset=True)
