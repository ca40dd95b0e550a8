"""Reductions of loss terms that stay accurate in float16/bfloat16.

A batch's summed terms and its term counts exceed float16's range (65504)
long before memory runs out (a batch-all count at B=128), so sums and
divisions run in float32 for the low-precision dtypes and only the result is
rounded to the terms' dtype.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values are kept in, as the kernels
    accumulate: float32 for float16/bfloat16, ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def mean_of_sum(total: torch.Tensor, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total / max(count, 1)`` in ``total``'s dtype, returned in ``dtype``.

    With count 0 this is ``total`` (0 for no term), still attached to the graph.
    """
    return (total / count.clamp_min(1).to(total.dtype)).to(dtype)


def loss_dtype(embeddings: torch.Tensor) -> torch.dtype:
    """The dtype a loss on ``embeddings`` is returned in: theirs, or float32
    inside ``torch.autocast`` on their device, which runs the ops in float32
    (``_registrations/autocast.py``)."""
    if embeddings.dtype != torch.float64 and torch.is_autocast_enabled(embeddings.device.type):
        return torch.float32
    return embeddings.dtype
