"""Reference losses with learnable class parameters: ArcFace, CosFace, ProxyAnchor.

Plain PyTorch on the full (B, C) cosine matrix, for clarity: the ground truth the chunked native ops are checked
against (and itself checked against pytorch-metric-learning 2.9 in tests/test_class_losses_reference.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# sin θ is taken as at least this in the slope of cos(θ + m) (never in its value): at exactly parallel
# vectors (sin θ = 0) the slope is otherwise infinite and the gradient NaN. The native kernels use the same
# floor (csrc/common/class_losses.h, kArcFaceMinSine).
ARCFACE_MIN_SINE = 1e-6


def cosine_matrix(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C): cos(embeddings[i], weight[c]), both rows L2-normalized as F.normalize (eps 1e-12)."""
    return F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T


def _sine_with_floored_slope(cos_theta: torch.Tensor) -> torch.Tensor:
    """sqrt(1 − cos²θ) for cos θ in [−1, 1], whose derivative uses max(sin θ, ARCFACE_MIN_SINE)."""
    one_minus_sq = (1 - cos_theta * cos_theta).clamp_min(0)
    exact = one_minus_sq.sqrt()
    floored = one_minus_sq.clamp_min(ARCFACE_MIN_SINE**2).sqrt()
    return floored + (exact - floored).detach()  # the value of `exact`, the gradient of `floored`


def arcface_target_logit(cos_theta: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(θ + m) where θ ≤ π − m, else cos θ − m·sin m (cos θ clamped to [−1, 1] first, as PML does).

    θ = acos(cos θ) is in [0, π], so θ ≤ π − m holds for every θ when m ≤ 0, for none when m > π, and is
    cos θ ≥ −cos m between; cos(θ + m) = cos θ·cos m − sin θ·sin m.
    """
    c = cos_theta.clamp(-1, 1)
    plus_margin = c * math.cos(margin) - _sine_with_floored_slope(c) * math.sin(margin)
    if margin <= 0:
        inside = torch.ones_like(c, dtype=torch.bool)
    elif margin > math.pi:
        inside = torch.zeros_like(c, dtype=torch.bool)
    else:
        inside = c >= -math.cos(margin)
    return torch.where(inside, plus_margin, c - margin * math.sin(margin))


def cosface_target_logit(cos_theta: torch.Tensor, margin: float) -> torch.Tensor:
    """cos θ − m."""
    return cos_theta - margin


def _margin_softmax_rows(embeddings, labels, weight, margin, scale, target_logit) -> torch.Tensor:
    """(B,): cross-entropy of scale·logits per row, the label's logit replaced by target_logit(cos, margin)."""
    cos = cosine_matrix(embeddings, weight)
    labels = labels.long()
    target = cos.gather(1, labels[:, None])
    logits = cos.scatter(1, labels[:, None], target_logit(target, margin))
    return F.cross_entropy(scale * logits, labels, reduction="none")


def _reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(rows.shape[0], 1)  # mean; 0 (attached) for B = 0


def arcface_loss(embeddings, labels, weight, *, margin=0.5, scale=64.0, reduction="mean") -> torch.Tensor:
    """Reference for :func:`metricops.arcface_loss` (margin in radians, weight (C, D))."""
    return _reduce_rows(
        _margin_softmax_rows(embeddings, labels, weight, margin, scale, arcface_target_logit), reduction
    )


def cosface_loss(embeddings, labels, weight, *, margin=0.35, scale=64.0, reduction="mean") -> torch.Tensor:
    """Reference for :func:`metricops.cosface_loss`."""
    return _reduce_rows(
        _margin_softmax_rows(embeddings, labels, weight, margin, scale, cosface_target_logit), reduction
    )


def _log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + Σ_{keep} e^z) along dim, stably (0 where nothing is kept)."""
    z = z.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(z, dim=dim)
    # log(1 + e^lse), exactly (F.softplus is lse itself above 20, as PML's logsumexp(add_one=True) is not)
    return torch.logaddexp(lse, torch.zeros_like(lse)).where(keep.any(dim), torch.zeros_like(lse))


def proxy_anchor_terms(embeddings, labels, proxies, *, margin=0.1, alpha=32.0):
    """Per-class terms of ProxyAnchor: ``(pos (C,), neg (C,), present (C,) bool)``.

    ``pos[c] = log(1 + Σ_{i: y_i = c} e^{−α(S_ic − δ)})`` (0 for a class absent from the batch),
    ``neg[c] = log(1 + Σ_{i: y_i ≠ c} e^{α(S_ic + δ)})``, S the cosine matrix.
    """
    cos = cosine_matrix(embeddings, proxies)
    num_classes = proxies.shape[0]
    is_pos = labels.long()[:, None] == torch.arange(num_classes, device=labels.device)
    pos = _log1p_sum_exp(-alpha * (cos - margin), is_pos, dim=0)
    neg = _log1p_sum_exp(alpha * (cos + margin), ~is_pos, dim=0)
    return pos, neg, is_pos.any(0)


def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32.0) -> torch.Tensor:
    """Reference for :func:`metricops.proxy_anchor_loss`: mean of ``pos`` over the classes present in the
    batch (0 when none is) plus the mean of ``neg`` over all C classes."""
    pos, neg, present = proxy_anchor_terms(embeddings, labels, proxies, margin=margin, alpha=alpha)
    num_present = present.sum().clamp_min(1).to(pos.dtype)
    return pos.sum() / num_present + neg.sum() / max(proxies.shape[0], 1)
