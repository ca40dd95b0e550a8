"""Pairwise distances, and the ``normalize=True`` rule of every op.

``normalize=True`` means: the distances are those of ``F.normalize(x, p=2, dim=1,
eps=1e-12)``, with F.normalize's gradient. Where it is done, today:

- batch-hard triplet (``batch_hard_triplet_loss`` and the pml drop-ins on its
  op): the op takes ``normalize`` and, on CPU, fuses it in C++ (no normalised
  copy; its gradient is applied in the backward's single pass over the rows);
  the CUDA op composes it in C++ (``l2_normalize`` then the kernel, and their
  backwards in reverse).
- everything else (pairwise_distance, semi-hard, batch-all, statistics,
  miner, contrastive): composed in Python by ``_normalized`` below, one native
  ``l2_normalize`` op per direction, before the op runs on the unit rows.

Both give the same values up to rounding (tests/test_triplet.py checks the
fused path against normalizing first).
"""

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


def _normalized(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``x``'s rows L2-normalized when ``normalize`` (the Python-composed path of the rule above), else ``x``."""
    return _l2_normalize(x) if normalize else x


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
    v.check_embeddings_pair(x, "x", y, "y")
    v.check_metric(metric)
    v.check_flag(normalize, "normalize")
    x = _normalized(x, normalize)
    y = None if y is None else _normalized(y, normalize)
    return ops.pairwise_distance(x, y, metric)
