"""Input validation shared by every public function.

Each check raises with a message that names the argument and what was
expected; the C++ TORCH_CHECKs repeat the same wording as the last line of
defence for direct ``torch.ops.metricops`` calls.
"""

from __future__ import annotations

import numbers

import torch

from ._memory import check_memory  # noqa: F401  (the memory= rule lives in _memory.py)

METRICS = ("euclidean", "sqeuclidean", "cosine")
REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
_CPU_FLOATS = (torch.float32, torch.float64)
_CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def type_name(value) -> str:
    """value's type for an error message: qualified unless a builtin (numpy 2's bool scalar is named "bool")."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")


def _autocast_upcasts(t) -> bool:
    """Whether autocast is on for t's device: the ops then receive t cast to float32
    (metricops/_registrations/autocast.py), so half-precision inputs are fine."""
    return (
        t.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and torch.amp.is_autocast_available(t.device.type)
        and torch.is_autocast_enabled(t.device.type)
    )


def check_embeddings(t, name: str = "embeddings") -> None:
    """A (B, D) floating matrix of a dtype the kernels support on its device (or that autocast upcasts)."""
    check_tensor(t, name)
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (B, D), got {t.dim()}-D tensor of shape {tuple(t.shape)}"
        )
    allowed = _CUDA_FLOATS if t.device.type == "cuda" else _CPU_FLOATS
    if t.dtype not in allowed and not _autocast_upcasts(t):
        raise TypeError(f"{name} must be float32 or float64 (float16/bfloat16 on CUDA), got {t.dtype} on {t.device}")


def check_same_device_dtype(a, a_name: str, b, b_name: str) -> None:
    # torch.device equality includes the index: cuda:0 and cuda:1 are refused.
    if a.device != b.device:
        raise ValueError(f"{b_name} must be on the same device as {a_name} ({a.device}), got {b.device}")
    if a.dtype != b.dtype and not (_autocast_upcasts(a) and _autocast_upcasts(b)):
        raise TypeError(f"{b_name} must have the same dtype as {a_name} ({a.dtype}), got {b.dtype}")


def check_same_dim(a, a_name: str, b, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{b_name} must have the same embedding size D as {a_name} ({a.shape[1]}), got shape {tuple(b.shape)}"
        )


def check_embeddings_pair(x, x_name: str, y, y_name: str) -> None:
    """``x`` (M, D) embeddings, and ``y`` None or (N, D) embeddings on x's device with x's dtype and D."""
    check_embeddings(x, x_name)
    if y is not None:
        check_embeddings(y, y_name)
        check_same_device_dtype(x, x_name, y, y_name)
        check_same_dim(x, x_name, y, y_name)


def check_metric(metric) -> str:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")
    return metric


def check_reduction(reduction, allowed=REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in allowed)}, got {reduction!r}")
    return reduction


def check_labels(labels, embeddings, name: str = "labels", embeddings_name: str = "embeddings") -> None:
    check_tensor(labels, name)
    b = embeddings.shape[0]
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(
            f"{name} must be a 1-D tensor of length B={b} (one label per embedding), got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {labels.dtype}")
    if labels.device != embeddings.device:
        if embeddings_name == "embeddings":  # the C++ check's wording
            raise ValueError(f"{name} must be on the embeddings' device ({embeddings.device}), got {labels.device}")
        raise ValueError(
            f"{name} must be on the same device as {embeddings_name} ({embeddings.device}), got {labels.device}"
        )


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return value


def _scalar_value(value, name: str, *, integral: bool):
    """``value`` as a Python int/float, or raise naming ``name``.

    Accepted, as torch's own int/float arguments accept them: ``numbers.Integral``
    (``integral``) or ``numbers.Real`` values (numpy scalars included) and 0-dim
    tensors that do not require grad (taken by value: the ops get a float, so a
    tensor's gradient would be lost silently). bool, np.bool_ and bool tensors are refused.
    """
    kind = "an int" if integral else "a number"
    if isinstance(value, torch.Tensor):
        ok_dtype = not value.is_complex() and value.dtype != torch.bool
        ok_dtype = ok_dtype and (not integral or not value.is_floating_point())
        if value.dim() != 0 or not ok_dtype:
            raise TypeError(
                f"{name} must be {kind}, got a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.requires_grad:
            raise TypeError(
                f"{name} must be {kind}, got a Tensor that requires grad "
                f"({name} is taken by value and gets no gradient)"
            )
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type_name(value)}")
    return int(value) if integral else float(value)


def check_number(value, name: str, *, min_value=None, allow_equal=True, finite=False) -> float:
    """A real number (see ``_scalar_value``) as a float; NaN is always refused, +-inf too when ``finite``."""
    value = _scalar_value(value, name, integral=False)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if finite and value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if min_value is not None and (value < min_value or (not allow_equal and value == min_value)):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    return value


def check_int(value, name: str, *, min_value=None) -> int:
    """An integer (``numbers.Integral``, numpy integers, 0-dim integer tensors; bool refused) as an int."""
    value = _scalar_value(value, name, integral=True)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {name}={value}")
    return value


def check_same_shape(a, a_name: str, b, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the same shape as {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_pair_labels(y, x0, name: str = "y"):
    """(N,) pair labels, 1 = similar, 0 = dissimilar (bool, integer or float); returns them as bool."""
    check_tensor(y, name)
    n = x0.shape[0]
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"{name} must be a 1-D tensor of length N={n} (one label per pair), got shape {tuple(y.shape)}"
        )
    if y.device != x0.device:
        raise ValueError(f"{name} must be on x0's device ({x0.device}), got {y.device}")
    if y.dtype == torch.bool:
        return y
    if y.is_complex() or not (
        y.is_floating_point() or y.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {y.dtype}")
    # A value check needs a host sync: done in eager mode only (under
    # torch.compile the values are taken as given, nonzero meaning similar).
    # (nor under torch.func transforms, whose batched values cannot be read)
    readable = not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
    if readable and y.device.type != "meta" and y.numel() > 0:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"{name} must hold only 0 (dissimilar) and 1 (similar)")
    return y != 0


def check_positive_finite(value, name: str) -> float:
    value = check_number(value, name)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
