"""Pairwise distances."""

from __future__ import annotations

from typing import Optional

import torch

from . import _validation as v
from ._ops import ops


def _l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, p=2, dim=1, eps=eps)`` as one native op per direction.

    ``(B, D) -> (B, D)``: ``x / max(||x||, eps)``, with F.normalize's gradient.
    """
    return ops.l2_normalize(x, eps)[0]


def pairwise_distance(
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    metric: str = "euclidean",
    normalize: bool = False,
) -> torch.Tensor:
    """Distance between every row of ``x`` and every row of ``y``.

    Args:
        x: ``(M, D)`` floating tensor (float32/float64; also float16/bfloat16 on CUDA).
        y: ``(N, D)`` tensor on the same device with the same dtype, or ``None``
            for ``y = x``; then the diagonal is exactly 0 for the euclidean metrics.
        metric: ``"euclidean"`` (‖x − y‖₂), ``"sqeuclidean"`` (‖x − y‖₂²) or
            ``"cosine"`` (1 − cos(x, y), where cos with a zero vector is 0).
        normalize: L2-normalize the rows first (differentiably), as
            pytorch-metric-learning's ``LpDistance`` does by default.

    Returns:
        ``(M, N)`` tensor of ``x``'s dtype. Differentiable in ``x`` and ``y``; the
        gradient of a zero euclidean distance is 0, never NaN. float16/bfloat16
        accumulate in float32.

    One native GEMM (BLAS / cuBLAS) plus a fused epilogue; the backward is one
    more GEMM per input (one in all when ``y`` is None).
    """
    v.check_embeddings(x, "x")
    if y is not None:
        v.check_embeddings(y, "y")
        v.check_same_device_dtype(x, "x", y, "y")
        v.check_same_dim(x, "x", y, "y")
    v.check_metric(metric)
    v.check_flag(normalize, "normalize")
    if normalize:
        x = _l2_normalize(x)
        y = None if y is None else _l2_normalize(y)
    return ops.pairwise_distance(x, y, metric)
