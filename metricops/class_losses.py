"""Losses with learnable class parameters: ArcFace, CosFace, ProxyAnchor.

Each runs on the native ops ``metricops::margin_softmax_loss`` / ``metricops::proxy_anchor_loss``, which compute
the cosine matrix S = normalize(embeddings) · normalize(weight)ᵀ class chunk by class chunk (one GEMM tile and a
fused epilogue each, with an online log-sum-exp across chunks) and never hold the B×C matrix: C = 10⁶ classes
run in O(B·chunk + (B + C)·D) extra memory. The backward ops recompute each tile (ProxyAnchor keeps its tile
instead when C·B is small) and give exact gradients to the embeddings and to the class parameters.
"""

from __future__ import annotations


import torch

from . import _validation as v
from ._ops import ops
from ._reduction import accumulation_dtype, loss_dtype
from .distance import _l2_normalize

# Classes per chunk; 0 lets the op choose per device. Tests set it small to cross chunk boundaries.
_CLASS_CHUNK = 0
# ProxyAnchor keeps its (C, B) dot products for the backward (one GEMM of four saved) up to this many entries
# (16 MiB in float32); beyond, the backward recomputes them chunk by chunk.
_PROXY_SAVED_TILE_ENTRIES = 1 << 22

_MARGIN_REDUCTIONS = ("mean", "sum", "none")


def _check_class_inputs(embeddings, labels, weight, weight_name):
    """Shapes, dtypes and devices; labels in [0, C) (a host sync, so eager mode only: under torch.compile the
    kernels check on CPU, and on CUDA a row with an out-of-range label gets a NaN loss)."""
    v.check_embeddings(embeddings, "embeddings")
    v.check_labels(labels, embeddings)
    v.check_tensor(weight, weight_name)
    if weight.dim() != 2:
        raise ValueError(
            f"{weight_name} must be a 2-D tensor of shape (C, D), got {weight.dim()}-D tensor of shape "
            f"{tuple(weight.shape)}"
        )
    v.check_same_device_dtype(embeddings, "embeddings", weight, weight_name)
    v.check_same_dim(embeddings, "embeddings", weight, weight_name)
    num_classes = weight.shape[0]
    if num_classes < 1:
        raise ValueError(f"{weight_name} must hold at least one class (C >= 1), got shape {tuple(weight.shape)}")
    # Reading the labels syncs with the device: not while compiling or capturing a CUDA graph, where the
    # kernels' own handling stands (CPU: the same check; CUDA: labels are never used as an index); nor under
    # torch.func transforms (vmap's batched labels cannot be read; each sample reaches the kernel's check).
    capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
    readable = not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
    if readable and not capturing and labels.device.type != "meta" and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"labels must be class indices in [0, C) with C={num_classes} (the rows of {weight_name}), got {bad}"
            )


def _check_margin_softmax_args(margin, scale):
    """(margin, scale) as floats: any finite values, as PML takes them (ArcFace's margin in radians)."""
    return v.check_number(margin, "margin", finite=True), v.check_number(scale, "scale", finite=True)


def _check_proxy_anchor_args(margin, alpha):
    return v.check_number(margin, "margin", finite=True), v.check_number(alpha, "alpha", finite=True)


def _margin_softmax(embeddings, labels, weight, kind, margin, scale, reduction):
    _check_class_inputs(embeddings, labels, weight, "weight")
    margin, scale = _check_margin_softmax_args(margin, scale)
    v.check_reduction(reduction, _MARGIN_REDUCTIONS)
    x = _l2_normalize(embeddings)
    rows, _ = ops.margin_softmax_loss(x, labels, weight, kind, margin, scale, _CLASS_CHUNK)
    out_dtype = loss_dtype(embeddings)
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum(dtype=accumulation_dtype(rows.dtype))
    if reduction == "mean":
        total = total / max(rows.shape[0], 1)  # B = 0: 0, attached to the graph
    return total.to(out_dtype)


def arcface_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """ArcFace (additive angular margin, Deng et al. 2019): cross-entropy of ``scale·logits``.

    Args:
        embeddings: ``(B, D)``; L2-normalized inside (F.normalize, differentiably).
        labels: ``(B,)`` int32/int64 class indices in ``[0, C)``.
        weight: ``(C, D)``, the ``nn.Linear`` layout (pytorch-metric-learning's ``W`` is its transpose);
            its rows are L2-normalized inside.
        margin: ``m`` in radians (0.5 rad is PML's default of 28.6°); any finite number, as PML takes it
            (m ≤ 0: every target takes cos(θ + m); m > π: none does).
        scale: ``s``, any finite number (PML's default 64).
        reduction: ``"mean"`` (over the B rows; 0 for B = 0), ``"sum"`` or ``"none"`` (``(B,)``).

    With cos θ_ic = cos(x_i, w_c), the logits of row i are cos θ_ic, except the label's, which becomes
    cos(θ + m) where θ ≤ π − m and cos θ − m·sin m beyond (monotone, as PML). The slope of cos(θ + m) uses
    max(sin θ, 1e-6), so exactly parallel targets get a finite gradient. Gradients reach ``embeddings`` and
    ``weight``. Never holds the B×C matrix (classes in chunks, online log-sum-exp).
    """
    return _margin_softmax(embeddings, labels, weight, "arcface", margin, scale, reduction)


def cosface_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """CosFace (large margin cosine loss, Wang et al. 2018): as :func:`arcface_loss`, with the label's logit
    cos θ − m (``margin`` any finite number)."""
    return _margin_softmax(embeddings, labels, weight, "cosface", margin, scale, reduction)


def _proxy_anchor_terms(embeddings, labels, proxies, margin, alpha):
    """Validated per-class terms ``(pos (C,), neg (C,), present (C,) bool)``, in the accumulation dtype."""
    _check_class_inputs(embeddings, labels, proxies, "proxies")
    margin, alpha = _check_proxy_anchor_args(margin, alpha)
    x = embeddings  # normalized inside the op (each tile entry scaled by its rows' inverse norms, no copy)
    save_tile = (
        _CLASS_CHUNK == 0
        and proxies.shape[0] * x.shape[0] <= _PROXY_SAVED_TILE_ENTRIES
        and torch.is_grad_enabled()
        and (x.requires_grad or proxies.requires_grad)
    )
    pos, neg, _ = ops.proxy_anchor_loss(x, labels, proxies, margin, alpha, _CLASS_CHUNK, save_tile, True)
    present = torch.zeros(proxies.shape[0], dtype=torch.bool, device=proxies.device)
    present = present.index_fill(0, labels.long(), True)
    return pos, neg, present


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> torch.Tensor:
    """Proxy-Anchor loss (Kim et al. 2020; PML ``ProxyAnchorLoss``).

    Args:
        embeddings: ``(B, D)``; labels ``(B,)`` class indices in ``[0, C)``; proxies ``(C, D)``.
        margin: δ; alpha: α; any finite numbers, as PML takes them.

    With S = cos(embeddings, proxies) (both L2-normalized inside), returns
    ``(1/|C⁺|)·Σ_{c∈C⁺} log(1 + Σ_{i: y_i = c} e^{−α(S_ic − δ)}) + (1/C)·Σ_c log(1 + Σ_{i: y_i ≠ c} e^{α(S_ic + δ)})``,
    C⁺ the classes present in the batch (the first mean is 0 when none is). A 0-dim tensor; gradients reach
    ``embeddings`` and ``proxies``. Classes are processed in chunks, each with all B rows, never B×C at once.
    When a gradient will be needed, each chunk's derivatives are computed as soon as its rows are reduced, in the
    forward's pass (the backward only scales them by the upstream gradient): three GEMMs in all, no tile kept.
    """
    _check_class_inputs(embeddings, labels, proxies, "proxies")
    margin, alpha = _check_proxy_anchor_args(margin, alpha)
    # The gradient is computed in the forward's pass, when one will be asked for (the op records its node in
    # the same cases; if it ever records one without, its backward recomputes the gradient instead).
    grad_mode = torch.is_grad_enabled()
    grads = (grad_mode and embeddings.requires_grad, grad_mode and proxies.requires_grad)
    loss = ops.proxy_anchor_loss_and_grad(embeddings, labels, proxies, margin, alpha, _CLASS_CHUNK, True, *grads)[0]
    return loss.to(loss_dtype(embeddings))
