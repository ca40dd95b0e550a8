"""torch.nn.Module wrappers of metricops' losses."""

from __future__ import annotations

import math

import torch

from . import _memory
from . import _validation as v
from . import similarity as _similarity
from . import triplet as _triplet
from . import class_losses as _class_losses
from .contrastive import contrastive_loss, pair_contrastive_loss, triplet_margin_loss
from .distance import pairwise_distance


def _check_module_args(kwargs: dict, reductions=v.REDUCTIONS, loss_margin: bool = True) -> None:
    """Refuse bad constructor arguments at construction, with the functionals' wording.

    (forward validates again, as the attributes can be reassigned.)
    """
    for name, value in kwargs.items():
        if name == "metric":
            v.check_metric(value)
        elif name == "reduction":
            v.check_reduction(value, reductions)
        elif name == "memory":
            v.check_memory(value)
        elif name in ("soft", "normalize", "squared", "swap"):
            v.check_flag(value, name)
        elif name == "margin":
            v.check_number(value, name, min_value=0.0 if loss_margin else None, finite=True)
        elif name in ("pos_margin", "neg_margin"):
            v.check_number(value, name)
        elif name == "eps":
            v.check_number(value, name, finite=True)
        elif name == "p":
            v.check_positive_finite(value, name)


def _format_args(module: torch.nn.Module, names) -> str:
    """``name=value, ...`` of the module's current attributes (strings quoted), for extra_repr."""
    values = ((name, getattr(module, name)) for name in names)
    return ", ".join(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}" for name, value in values)


class _FunctionalModule(torch.nn.Module):
    """A module that calls the functional ``_fn`` with its constructor arguments as keywords.

    Each constructor argument is an attribute of the same name (as in torch.nn),
    read at every forward, so reassigning one (a margin schedule) takes effect;
    the functional validates the current values on each call. They are plain
    attributes, not buffers: ``state_dict()`` is empty, as torch.nn's losses'.
    """

    _fn = None
    _arg_names: tuple = ()  # the functional's keywords, in constructor order
    _reductions = v.REDUCTIONS
    _loss_margin = True  # whether margin must be >= 0

    def __init__(self, **kwargs):
        super().__init__()
        _check_module_args(kwargs, type(self)._reductions, loss_margin=self._loss_margin)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def _loss_kwargs(self) -> dict:
        """The functional's keyword arguments: the attributes' current values."""
        return {name: getattr(self, name) for name in self._arg_names}

    def _call(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        return type(self)._fn(*inputs, **self._loss_kwargs())

    def extra_repr(self) -> str:
        return _format_args(self, self._arg_names)


class PairwiseDistance(_FunctionalModule):
    """Module form of :func:`metricops.pairwise_distance`."""

    _fn = staticmethod(pairwise_distance)
    _arg_names = ("metric", "normalize")

    def __init__(self, metric: str = "euclidean", normalize: bool = False):
        super().__init__(metric=metric, normalize=normalize)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(x, y)


class _LabelledBatchLoss(_FunctionalModule):
    """The ``forward(embeddings, labels)`` losses (those with a ``memory=`` argument)."""

    _streams_reduction_none = False  # whether memory="streaming" allows reduction="none"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self._streams_reduction_none:
            _memory.check_streaming_reduction(kwargs["memory"], kwargs["reduction"])

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._call(embeddings, labels)


class BatchHardTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.batch_hard_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.batch_hard_triplet_loss)
    _arg_names = ("margin", "metric", "soft", "normalize", "reduction", "memory")
    _streams_reduction_none = True  # (B,) terms

    def __init__(self, margin=0.2, metric="euclidean", soft=False, normalize=False, reduction="mean", memory="auto"):
        super().__init__(
            margin=margin, metric=metric, soft=soft, normalize=normalize, reduction=reduction, memory=memory
        )


class SemiHardTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.semihard_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.semihard_triplet_loss)
    _arg_names = ("margin", "metric", "normalize", "reduction", "memory")

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean", memory="auto"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction, memory=memory)


class BatchAllTripletLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.batch_all_triplet_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_triplet.batch_all_triplet_loss)
    _arg_names = ("margin", "metric", "normalize", "reduction", "memory")
    _reductions = ("mean", "sum", "mean_nonzero")

    def __init__(self, margin=0.2, metric="euclidean", normalize=False, reduction="mean_nonzero", memory="auto"):
        super().__init__(margin=margin, metric=metric, normalize=normalize, reduction=reduction, memory=memory)


class ContrastiveLoss(_LabelledBatchLoss):
    """Module form of :func:`metricops.contrastive_loss`; ``forward(embeddings, labels)``."""

    _fn = staticmethod(contrastive_loss)
    _arg_names = ("pos_margin", "neg_margin", "metric", "squared", "normalize", "reduction", "memory")

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        metric: str = "euclidean",
        squared: bool = False,
        normalize: bool = False,
        reduction: str = "mean",
        memory: str = "auto",
    ):
        super().__init__(
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            metric=metric,
            squared=squared,
            normalize=normalize,
            reduction=reduction,
            memory=memory,
        )


class TripletMarginLoss(_FunctionalModule):
    """Drop-in for :class:`torch.nn.TripletMarginLoss`, on :func:`metricops.triplet_margin_loss`."""

    _fn = staticmethod(triplet_margin_loss)
    _arg_names = ("margin", "p", "eps", "swap", "reduction")
    _loss_margin = False

    def __init__(
        self,
        margin: float = 1.0,
        p: float = 2.0,
        eps: float = 1e-6,
        swap: bool = False,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
    ):
        if size_average is not None or reduce is not None:
            # torch.nn's deprecated pair, as torch.nn's own losses map it (with its deprecation warning)
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        super().__init__(margin=margin, p=p, eps=eps, swap=swap, reduction=reduction)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return self._call(anchor, positive, negative)


class PairContrastiveLoss(_FunctionalModule):
    """Module form of :func:`metricops.pair_contrastive_loss`; ``forward(x0, x1, y)``."""

    _fn = staticmethod(pair_contrastive_loss)
    _arg_names = ("margin", "metric", "squared", "reduction")
    _loss_margin = False

    def __init__(self, margin: float = 1.0, metric: str = "euclidean", squared: bool = False, reduction: str = "mean"):
        super().__init__(margin=margin, metric=metric, squared=squared, reduction=reduction)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call(x0, x1, y)


# ----------------------------------------------------------------------------- similarity losses

MarginRankingLoss = torch.nn.MarginRankingLoss  # torch.nn's, so `nn.MarginRankingLoss` survives the import swap


class _SimilarityLoss(_LabelledBatchLoss):
    """``forward(embeddings, labels)`` on a metricops similarity loss; each argument an attribute read at every
    call (the functional validates it)."""

    _streams_reduction_none = True  # (B,) terms

    def __init__(self, **kwargs):
        for name in ("temperature", "alpha", "beta", "gamma"):
            if name in kwargs:
                v.check_positive_finite(kwargs[name], name)
        for name in ("base", "m", "pos_margin", "neg_margin"):
            if name in kwargs:
                v.check_number(kwargs[name], name, finite=True)
        if kwargs.get("mining_epsilon") is not None:
            v.check_number(kwargs["mining_epsilon"], "mining_epsilon", finite=True)
        super().__init__(**kwargs)


class SupConLoss(_SimilarityLoss):
    """Module form of :func:`metricops.supcon_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.supcon_loss)
    _arg_names = ("temperature", "reduction", "memory")

    def __init__(self, temperature: float = 0.1, reduction: str = "mean_nonzero", memory: str = "auto"):
        super().__init__(temperature=temperature, reduction=reduction, memory=memory)


class NTXentLoss(_SimilarityLoss):
    """Module form of :func:`metricops.ntxent_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.ntxent_loss)
    _arg_names = ("temperature", "reduction", "memory")

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", memory: str = "auto"):
        super().__init__(temperature=temperature, reduction=reduction, memory=memory)


class MultiSimilarityLoss(_SimilarityLoss):
    """Module form of :func:`metricops.multi_similarity_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.multi_similarity_loss)
    _arg_names = ("alpha", "beta", "base", "mining_epsilon", "reduction", "memory")

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        mining_epsilon: float | None = None,
        reduction: str = "mean",
        memory: str = "auto",
    ):
        super().__init__(
            alpha=alpha, beta=beta, base=base, mining_epsilon=mining_epsilon, reduction=reduction, memory=memory
        )


class CircleLoss(_SimilarityLoss):
    """Module form of :func:`metricops.circle_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.circle_loss)
    _arg_names = ("m", "gamma", "reduction", "memory")

    def __init__(self, m: float = 0.4, gamma: float = 80.0, reduction: str = "mean_nonzero", memory: str = "auto"):
        super().__init__(m=m, gamma=gamma, reduction=reduction, memory=memory)


class _LiftedLoss(_SimilarityLoss):
    _arg_names = ("pos_margin", "neg_margin", "reduction", "memory")

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, reduction: str = "mean", memory: str = "auto"):
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, reduction=reduction, memory=memory)


class GeneralizedLiftedStructureLoss(_LiftedLoss):
    """Module form of :func:`metricops.generalized_lifted_structure_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.generalized_lifted_structure_loss)


class LiftedStructureLoss(_LiftedLoss):
    """Module form of :func:`metricops.lifted_structure_loss`. ``forward(embeddings, labels)``."""

    _fn = staticmethod(_similarity.lifted_structure_loss)


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`metricops.info_nce_loss`. ``forward(queries, keys)``.

    ``learn_temperature=True`` holds the logit scale log(1/τ) as the parameter ``logit_scale`` (CLIP's
    parametrization, initialized from ``temperature``); each call uses τ = exp(−logit_scale), with its exact
    gradient. CLIP training also clamps the scale (``logit_scale.data.clamp_(0, math.log(100))`` after the
    optimizer step); that is left to the training loop. ``temperature`` reads (and sets) the current τ.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        normalize: bool = True,
        learn_temperature: bool = False,
        reduction: str = "mean",
    ):
        super().__init__()
        if isinstance(temperature, torch.Tensor):  # as forward takes it
            _similarity._check_temperature(temperature, temperature.new_empty(0, dtype=torch.float32))
        else:
            v.check_positive_finite(temperature, "temperature")
        v.check_flag(symmetric, "symmetric")
        v.check_flag(normalize, "normalize")
        v.check_flag(learn_temperature, "learn_temperature")
        v.check_reduction(reduction, ("mean", "sum", "none"))
        self.symmetric = symmetric
        self.normalize = normalize
        self.reduction = reduction
        self.learn_temperature = learn_temperature
        if learn_temperature:
            self.logit_scale = torch.nn.Parameter(torch.tensor(-math.log(float(temperature))))
            tau = torch.exp(-self.logit_scale.detach())  # as forward computes it, in float32
            if not (tau > 0 and torch.isfinite(tau) and torch.isfinite(1 / tau)):
                raise ValueError(
                    f"temperature must be within float32's range (its logit scale is a float32 parameter), got {temperature}"
                )
        else:
            self._temperature = temperature

    @property
    def temperature(self):
        if self.learn_temperature:
            return math.exp(-self.logit_scale.item())
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        if self.learn_temperature:
            with torch.no_grad():
                self.logit_scale.fill_(-math.log(v.check_positive_finite(value, "temperature")))
        else:
            self._temperature = value

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        temperature = torch.exp(-self.logit_scale) if self.learn_temperature else self._temperature
        return _similarity.info_nce_loss(
            queries,
            keys,
            temperature=temperature,
            symmetric=self.symmetric,
            normalize=self.normalize,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return _format_args(self, ("temperature", "symmetric", "normalize", "learn_temperature", "reduction"))


class _ClassParameterLoss(torch.nn.Module):
    """Shared plumbing of the losses holding (C, D) class parameters: ``forward(embeddings, labels)``.

    The hyper-parameters are plain attributes read at every forward (the functional validates them);
    the class parameters are the module's only state (``state_dict``).
    """

    _arg_names: tuple = ()

    def _check_sizes(self, num_classes, embedding_size):
        v.check_int(num_classes, "num_classes", min_value=1)
        v.check_int(embedding_size, "embedding_size", min_value=1)

    def extra_repr(self) -> str:
        c, d = self._class_parameter().shape
        return f"num_classes={c}, embedding_size={d}, " + _format_args(self, self._arg_names)


class ArcFaceLoss(_ClassParameterLoss):
    """Module form of :func:`metricops.arcface_loss`, holding ``weight`` (C, D) (``nn.Linear``'s layout),
    initialised N(0, 1) as pytorch-metric-learning's ``W``. ``margin`` in radians."""

    _arg_names = ("margin", "scale")
    _kind = "arcface"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.5, scale: float = 64.0):
        super().__init__()
        self._check_sizes(num_classes, embedding_size)
        _class_losses._check_margin_softmax_args(margin, scale)
        self.margin = margin
        self.scale = scale
        self.weight = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        torch.nn.init.normal_(self.weight)

    def _class_parameter(self):
        return self.weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _class_losses.arcface_loss(embeddings, labels, self.weight, margin=self.margin, scale=self.scale)


class CosFaceLoss(ArcFaceLoss):
    """Module form of :func:`metricops.cosface_loss`, holding ``weight`` (C, D), initialised N(0, 1)."""

    _kind = "cosface"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _class_losses.cosface_loss(embeddings, labels, self.weight, margin=self.margin, scale=self.scale)


class ProxyAnchorLoss(_ClassParameterLoss):
    """Module form of :func:`metricops.proxy_anchor_loss`, holding ``proxies`` (C, D), initialised as
    pytorch-metric-learning's (kaiming_normal_, mode="fan_out")."""

    _arg_names = ("margin", "alpha")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self._check_sizes(num_classes, embedding_size)
        _class_losses._check_proxy_anchor_args(margin, alpha)
        self.margin = margin
        self.alpha = alpha
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def _class_parameter(self):
        return self.proxies

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _class_losses.proxy_anchor_loss(embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha)
