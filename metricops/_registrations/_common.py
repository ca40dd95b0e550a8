"""What every registration module shares: the library handle, the op list, and the fake kernels' checks.

The op list is the dispatcher's (every schema of csrc/metricops.cpp), so the
rules that hold for all ops (no double backward for ``*_backward`` ops,
autocast for the forward ops: see ``__init__.py`` and ``autocast.py``) are
registered by iterating it, never from a hand-written list.

The checks are the fake-kernel twins of csrc/common/checks.h and
metricops/_validation.py: same wording and same exception type (ValueError
for shapes and devices, TypeError for dtypes, as TORCH_CHECK_VALUE and
TORCH_CHECK_TYPE raise), so that an error under torch.compile reads as it does
in eager mode.
"""

from __future__ import annotations

import math

import torch

from .._ops import ops  # noqa: F401  (the native library must be loaded before its ops are listed)
from .._validation import check_metric, check_reduction  # noqa: F401  (the wrappers' checks, the kernels' wording)

LIB = "metricops::"  # qualified-name prefix for torch.library.register_fake / register_autocast
IMPL = torch.library.Library("metricops", "IMPL")  # Python kernels live as long as this handle

BACKWARD_SUFFIX = "_backward"


def native_op_names() -> list[str]:
    """Every op of the native library, sorted (``_build_info`` and other ``_``-prefixed helpers left out)."""
    return sorted(
        name[len(LIB) :]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(LIB) and not name.startswith(LIB + "_")
    )


def backward_op_names() -> list[str]:
    """The ops that compute another op's gradient (``<forward>_backward``)."""
    return [name for name in native_op_names() if name.endswith(BACKWARD_SUFFIX)]


def forward_op_names() -> list[str]:
    """The ops users reach through the public API (every op that is not a ``*_backward``)."""
    return [name for name in native_op_names() if not name.endswith(BACKWARD_SUFFIX)]


def forward_of(backward_name: str) -> str:
    return backward_name.removesuffix(BACKWARD_SUFFIX)


def contiguous_like(t):
    """A fake output of t's shape, contiguous: the kernels return that whatever t's strides (transposed, sliced...)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def check_embeddings(t, name):
    """The fake-kernel twin of _validation.check_embeddings / C++ check_embeddings: same wording, same type."""
    torch._check_value(
        t.dim() == 2,
        lambda: f"{name} must be a 2-D tensor of shape (B, D), got {t.dim()}-D tensor of shape {tuple(t.shape)}",
    )
    allowed = (torch.float32, torch.float64)
    if t.device.type == "cuda":
        allowed = allowed + (torch.float16, torch.bfloat16)
    torch._check_type(
        t.dtype in allowed,
        lambda: f"{name} must be float32 or float64 (float16/bfloat16 on CUDA), got {t.dtype} on {t.device}",
    )


def check_same_device_dtype(a, a_name, b, b_name):
    torch._check_value(
        a.device == b.device, lambda: f"{b_name} must be on the same device as {a_name} ({a.device}), got {b.device}"
    )
    torch._check_type(
        a.dtype == b.dtype, lambda: f"{b_name} must have the same dtype as {a_name} ({a.dtype}), got {b.dtype}"
    )


def check_same_shape(a, a_name, b, b_name):
    torch._check_value(
        b.shape == a.shape,
        lambda: f"{b_name} must have the same shape as {a_name} {tuple(a.shape)}, got {tuple(b.shape)}",
    )


def check_labels(labels, embeddings, name="labels"):
    b = embeddings.shape[0]
    torch._check_value(
        labels.dim() == 1 and labels.shape[0] == b,
        lambda: f"{name} must be a 1-D tensor of length B={b} (one label per embedding), got shape {tuple(labels.shape)}",
    )
    torch._check_type(
        labels.dtype in (torch.int32, torch.int64), lambda: f"{name} must be int32 or int64, got {labels.dtype}"
    )
    torch._check_value(
        labels.device == embeddings.device,
        lambda: f"{name} must be on the embeddings' device ({embeddings.device}), got {labels.device}",
    )


# The scalar arguments' checks of the C++ ops (csrc/common/checks.h, triplet_impl.h, ...), same wording
# (numbers as C++ streams print them: %g), beside check_metric and check_reduction above: a direct op call under
# FakeTensorMode or torch.compile raises what the kernel would.
def check_finite_arg(value, name):
    torch._check_value(math.isfinite(value), lambda: f"{name} must be a finite number, got {value:g}")


def check_not_nan_arg(value, name):
    torch._check_value(not math.isnan(value), lambda: f"{name} must not be NaN")


def check_positive_eps(eps):
    torch._check_value(math.isfinite(eps) and eps > 0, lambda: f"eps must be a positive finite number, got {eps:g}")
