"""pytorch-metric-learning 2.9's ArcFaceLoss, CosFaceLoss and ProxyAnchorLoss on metricops' chunked native ops.

Parameters keep PML's names, shapes and initialisation (``W`` (D, C) ~ N(0, 1); ``proxies`` (C, D),
kaiming_normal_ fan_out), so a state_dict saved from either library loads into the other. As in PML, each
forward casts the parameter to the embeddings' dtype and device.

Per-row (ArcFace/CosFace) or per-class (ProxyAnchor) terms come from the native ops and go to the reducer as
PML's loss dict, so every metricops.pml reducer works. Two cases PML computes on the full (B, C) matrix are
computed that way here too, in plain torch, because they are outside what the native op does: ProxyAnchorLoss
with a distance other than CosineSimilarity, and ProxyAnchorLoss with ``indices_tuple`` (PML adds the miner
weights inside the exponentials).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validation as v
from .. import class_losses as _class_losses
from . import reducers as _reducers
from ._common import refuse_unsupported
from .distances import BaseDistance, CosineSimilarity


def _labels_required(labels):
    if labels is None:
        raise ValueError("labels cannot be None for this loss function")  # PML's c_f.labels_required


def _ref_not_supported(ref_emb, ref_labels):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError("ref_emb is not supported for this loss function")  # PML's c_f.ref_not_supported


def _miner_weights(indices_tuple, labels, dtype):
    """PML's lmu.convert_to_weights: each element's count in indices_tuple over the largest count (1 without)."""
    weights = torch.zeros(labels.shape[0], device=labels.device, dtype=dtype)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return weights + 1
    indices, counts = torch.unique(torch.cat(tuple(indices_tuple), dim=0), return_counts=True)
    weights[indices] = counts.to(dtype) / torch.max(counts)
    return weights


def _check_distance(distance, cls_name, cosine_only: bool) -> BaseDistance:
    if distance is None:
        return CosineSimilarity()
    if not isinstance(distance, BaseDistance):
        raise NotImplementedError(
            f"metricops.pml: {cls_name}(distance=...) must be a metricops.pml.distances distance, "
            f"got {type(distance).__module__}.{type(distance).__name__}"
        )
    if cosine_only and not isinstance(distance, CosineSimilarity):
        raise ValueError(f"{cls_name} requires the distance to be CosineSimilarity, got {type(distance).__name__}")
    return distance


def _similarity(distance, embeddings, ref):
    """``distance(embeddings, ref)``; PML's CosineSimilarity as PML computes it (normalized rows' matmul: our
    distance's 1 − cosine distance rounds small cosines to float32's resolution of 1)."""
    if isinstance(distance, CosineSimilarity):
        return F.normalize(embeddings, dim=1) @ F.normalize(ref, dim=1).T
    return distance(embeddings, ref)


def _cast_parameter(param: torch.nn.Parameter, embeddings: torch.Tensor) -> None:
    """PML's cast_types: the parameter's data follows the embeddings' dtype and device."""
    if param.dtype != embeddings.dtype or param.device != embeddings.device:
        param.data = param.data.to(device=embeddings.device, dtype=embeddings.dtype)


class _MarginSoftmaxLoss(torch.nn.Module):
    """ArcFace/CosFace plumbing; ``self.margin`` is what the functional takes (ArcFace: radians, as PML keeps it)."""

    _kind = ""

    def __init__(self, num_classes, embedding_size, margin, scale, distance, reducer, weight_init_func, kwargs):
        super().__init__()
        name = f"losses.{type(self).__name__}"
        refuse_unsupported(name, kwargs)
        v.check_int(num_classes, "num_classes", min_value=1)
        v.check_int(embedding_size, "embedding_size", min_value=1)
        v.check_number(margin, "margin", finite=True)  # here, not at the first forward (any finite value, as PML)
        v.check_number(scale, "scale", finite=True)
        self.num_classes = num_classes
        self.scale = scale
        self.distance = _check_distance(distance, name, cosine_only=True)
        self.reducer = _reducers.resolve(reducer, ["loss"], _reducers.MeanReducer, name)
        self.W = torch.nn.Parameter(torch.Tensor(embedding_size, num_classes))
        self.weight_init_func = weight_init_func or torch.nn.init.normal_
        self.weight_init_func(self.W)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        v.check_tensor(embeddings, "embeddings")
        _labels_required(labels)
        _ref_not_supported(ref_emb, ref_labels)
        labels = labels.to(embeddings.device)
        _cast_parameter(self.W, embeddings)
        rows = _class_losses._margin_softmax(
            embeddings, labels, self.W.t(), self._kind, self.margin, self.scale, "none"
        )
        if indices_tuple is not None:
            rows = rows * _miner_weights(indices_tuple, labels, rows.dtype)
        indices = torch.arange(embeddings.shape[0], device=embeddings.device)
        loss_dict = {"loss": {"losses": rows, "indices": indices, "reduction_type": "element"}}
        return self.reducer(loss_dict, embeddings, labels)

    def get_logits(self, embeddings):
        """``scale`` · cos(embeddings, W's columns): (B, C), held whole (as PML's)."""
        _cast_parameter(self.W, embeddings)
        return _similarity(self.distance, embeddings, self.W.t()) * self.scale


class ArcFaceLoss(_MarginSoftmaxLoss):
    """``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64, distance=None, reducer=None,
    weight_init_func=None)``, as pytorch-metric-learning 2.9: ``margin`` in degrees (kept in radians in
    ``self.margin``, as PML does), ``W`` (D, C). Default reducer MeanReducer over the rows' cross-entropies."""

    _kind = "arcface"

    def __init__(
        self,
        num_classes,
        embedding_size,
        margin=28.6,
        scale=64,
        distance=None,
        reducer=None,
        weight_init_func=None,
        **kwargs,
    ):
        degrees = v.check_number(margin, "margin", finite=True)  # in degrees, as given
        super().__init__(num_classes, embedding_size, margin, scale, distance, reducer, weight_init_func, kwargs)
        self.margin = math.radians(degrees)  # PML's init_margin: np.radians


class CosFaceLoss(_MarginSoftmaxLoss):
    """``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64, distance=None, reducer=None,
    weight_init_func=None)``, as pytorch-metric-learning 2.9 (``W`` (D, C); the label's cosine minus margin)."""

    _kind = "cosface"

    def __init__(
        self,
        num_classes,
        embedding_size,
        margin=0.35,
        scale=64,
        distance=None,
        reducer=None,
        weight_init_func=None,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, margin, scale, distance, reducer, weight_init_func, kwargs)
        self.margin = margin


def _kaiming_fan_out(t):
    torch.nn.init.kaiming_normal_(t, mode="fan_out")


class ProxyAnchorLoss(torch.nn.Module):
    """``ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32, distance=None, reducer=None,
    weight_init_func=None)``, as pytorch-metric-learning 2.9: ``proxies`` (C, D); sub-losses ``pos_loss``
    (per class, divided by the number of classes in the batch) and ``neg_loss`` (divided by C) under the
    default DivisorReducer."""

    def __init__(
        self,
        num_classes,
        embedding_size,
        margin=0.1,
        alpha=32,
        distance=None,
        reducer=None,
        weight_init_func=None,
        **kwargs,
    ):
        super().__init__()
        refuse_unsupported("losses.ProxyAnchorLoss", kwargs)
        v.check_int(num_classes, "num_classes", min_value=1)
        v.check_int(embedding_size, "embedding_size", min_value=1)
        _class_losses._check_proxy_anchor_args(margin, alpha)
        self.proxies = torch.nn.Parameter(torch.Tensor(num_classes, embedding_size))
        self.weight_init_func = weight_init_func or _kaiming_fan_out
        self.weight_init_func(self.proxies)
        self.num_classes = num_classes
        self.margin = margin
        self.alpha = alpha
        self.distance = _check_distance(distance, "losses.ProxyAnchorLoss", cosine_only=False)
        self.reducer = _reducers.resolve(
            reducer, ["pos_loss", "neg_loss"], _reducers.DivisorReducer, "losses.ProxyAnchorLoss"
        )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        v.check_tensor(embeddings, "embeddings")
        _labels_required(labels)
        _ref_not_supported(ref_emb, ref_labels)
        labels = labels.to(embeddings.device)
        _cast_parameter(self.proxies, embeddings)
        if isinstance(self.distance, CosineSimilarity) and indices_tuple is None and self._reduces_as_pml_default():
            # Σ pos / |C⁺| + Σ neg / C: the loss with its gradient from the forward's pass (no per-class outputs)
            loss = _class_losses.proxy_anchor_loss(
                embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha
            )
            return loss.to(embeddings.dtype)
        if isinstance(self.distance, CosineSimilarity) and indices_tuple is None:
            pos, neg, present = _class_losses._proxy_anchor_terms(
                embeddings, labels, self.proxies, self.margin, self.alpha
            )
            pos, neg = pos.to(embeddings.dtype), neg.to(embeddings.dtype)
        else:
            pos, neg, present = self._terms_on_the_matrix(embeddings, labels, indices_tuple)
        indices = torch.arange(self.num_classes, device=embeddings.device)
        loss_dict = {
            "pos_loss": {"losses": pos, "indices": indices, "reduction_type": "element", "divisor": present.sum()},
            "neg_loss": {"losses": neg, "indices": indices, "reduction_type": "element", "divisor": self.num_classes},
        }
        return self.reducer(loss_dict, embeddings, labels)

    def _reduces_as_pml_default(self):
        """Whether the reducer is PML's default for this loss, DivisorReducer on each term (read at each call:
        the attribute may be replaced after construction)."""
        reducer = self.reducer
        return (
            type(reducer) is _reducers.MultipleReducers
            and set(reducer.reducers) == {"pos_loss", "neg_loss"}
            and all(type(r) is _reducers.DivisorReducer for r in reducer.reducers.values())
        )

    def _terms_on_the_matrix(self, embeddings, labels, indices_tuple):
        """PML's compute_loss on the (B, C) matrix, for what the native op does not cover (see module doc)."""
        _class_losses._check_proxy_anchor_args(self.margin, self.alpha)  # as the native path (attributes may change)
        miner_weights = _miner_weights(indices_tuple, labels, embeddings.dtype).unsqueeze(1) - 1
        mat = self.distance(embeddings, self.proxies)
        is_pos = torch.nn.functional.one_hot(labels.long(), self.num_classes).bool()
        pos_exp = self.distance.margin(mat, self.margin)
        neg_exp = self.distance.margin(-self.margin, mat)

        def log1p_sum_exp(z, keep):
            z = torch.cat([z.masked_fill(~keep, float("-inf")), torch.zeros_like(z[:1])], dim=0)
            return torch.logsumexp(z, dim=0).masked_fill(~keep.any(0), 0)

        pos = log1p_sum_exp(self.alpha * pos_exp + miner_weights, is_pos)
        neg = log1p_sum_exp(self.alpha * neg_exp + miner_weights, ~is_pos)
        return pos, neg, is_pos.any(0)

    def get_logits(self, embeddings):
        """The (B, C) similarity (or distance) of the embeddings to the proxies, held whole (as PML's)."""
        _cast_parameter(self.proxies, embeddings)
        return _similarity(self.distance, embeddings, self.proxies)
