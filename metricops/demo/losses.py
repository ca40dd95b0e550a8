"""The demo's losses: one ``LossSpec`` per loss, each naming the implementations that compute the same value."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

import metricops
from metricops import reference


MARGIN = 0.2

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _class_sizes(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels, return_counts=True)[1].to(torch.float64)


def _bbd_bytes(labels: torch.Tensor, dim: int) -> float:
    """metricops.reference's distances: (B, B, D) float32 differences, about 3 alive with their gradients."""
    return 3.0 * 4 * len(labels) ** 2 * dim


def _cube_bytes(labels: torch.Tensor, dim: int) -> float:
    """A (B, B, B) float32 tensor and its masks (reference semi-hard and batch-all), on top of the distances."""
    return 3.0 * 4 * len(labels) ** 3 + _bbd_bytes(labels, dim)


def _triplet_list_bytes(labels: torch.Tensor, dim: int) -> float:
    """Every valid triplet as three int64 indices plus two gathered distances (PML's all-triplet paths)."""
    sizes = _class_sizes(labels)
    triplets = float((sizes * (sizes - 1) * (len(labels) - sizes)).sum())
    return triplets * (3 * 8 + 2 * 4)


def _pairs_bytes(labels: torch.Tensor, dim: int) -> float:
    """B x B pair tensors: PML's distance matrix and masks, and for its contrastive loss the pairs' int64 indices."""
    return 4.0 * len(labels) ** 2 * (2 * 8 + 4)


def _no_limit(labels: torch.Tensor, dim: int) -> float:
    return 0.0


@dataclass(frozen=True)
class Contender:
    """One implementation of a loss.

    ``build()`` returns the loss function ``(embeddings (B, D), labels (B,)) -> scalar``
    (an ``nn.Module`` with parameters is trained along with the network);
    ``bytes_needed(labels, D)`` estimates its memory, so that sizes it cannot run
    are reported instead of attempted; ``recipe`` says what exactly is called.
    """

    library: str  # the timing table's column: "metricops", "metricops.reference", "pytorch-metric-learning"
    build: Callable[[], LossFn]
    recipe: str
    bytes_needed: Callable[[torch.Tensor, int], float] = _no_limit


@dataclass(frozen=True)
class LossSpec:
    """A ``--loss`` choice: the metricops loss the network trains with, and the same loss elsewhere.

    ``others`` compute the same value as ``trained`` (the demo checks it before
    timing); ``missing`` names a library without a like-for-like version, and why.
    ``lr`` is Adam's peak learning rate (one-cycle schedule) that works on this data.
    """

    summary: str
    lr: float
    trained: Contender
    others: Tuple[Contender, ...] = ()
    missing: Tuple[Tuple[str, str], ...] = ()


def _pml():
    """pytorch-metric-learning's modules (a dev dependency, not a runtime one); None if not installed."""
    try:
        from pytorch_metric_learning import losses, miners, reducers
    except ImportError:
        return None
    return losses, miners, reducers


def _pml_mined(loss, miner) -> LossFn:
    return lambda e, y: loss(e, y, miner(e, y))


def _pml_batch_hard_mean() -> LossFn:
    losses, miners, reducers = _pml()
    # One mined triplet per anchor; MeanReducer averages over them, as metricops' "mean" over anchors.
    return _pml_mined(losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer()), miners.BatchHardMiner())


def _pml_contrastive_mean() -> LossFn:
    losses, _, reducers = _pml()
    loss = losses.ContrastiveLoss(
        pos_margin=CONTRASTIVE_POS_MARGIN, neg_margin=CONTRASTIVE_NEG_MARGIN, reducer=reducers.SumReducer()
    )
    # PML sums the positive and the negative ordered pairs; metricops' "mean" divides by all B(B-1) of them.
    return lambda e, y: loss(e, y) / (len(y) * (len(y) - 1))


def _pml_dropin_batch_hard(pml_losses, pml_miners) -> LossFn:
    return _pml_mined(pml_losses.TripletMarginLoss(margin=MARGIN), pml_miners.BatchHardMiner())


def _metricops_pml():
    from metricops.pml import losses, miners

    return losses, miners


def _pml_semihard(pml_losses, pml_miners) -> LossFn:
    miner = pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")
    return _pml_mined(pml_losses.TripletMarginLoss(margin=MARGIN), miner)


def _reference_split_contrastive(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # PML's ContrastiveLoss: positive and negative pairs each averaged over their non-zero terms, then summed;
    # an infinite margin switches the other group off.
    kw = dict(normalize=True, reduction="mean_nonzero")
    inf = float("inf")
    return reference.contrastive_loss(e, y, pos_margin=0.0, neg_margin=-inf, **kw) + reference.contrastive_loss(
        e, y, pos_margin=inf, neg_margin=PML_CONTRASTIVE_NEG_MARGIN, **kw
    )


# Margins on unit vectors (at most 2 apart), chosen on this data (seeds 0-2). For the mean over all pairs,
# positives within 0.5 cost nothing: pulling every positive pair to 0 (pos_margin 0) overfit the five training
# digits and transferred below raw pixels. PML's split average trains best with negatives pushed past 0.5.
CONTRASTIVE_POS_MARGIN, CONTRASTIVE_NEG_MARGIN = 0.5, 1.2
PML_CONTRASTIVE_NEG_MARGIN = 0.5
_PML = "pytorch-metric-learning"
_REF = "metricops.reference"
_NO_PML_SEMIHARD = (
    "PML's TripletMarginMiner('semihard') keeps every semi-hard triplet: another loss (see --loss pml_semihard)"
)


def _metricops_loss(
    name: str,
    summary: str,
    *,
    lr: float,
    kwargs: Dict[str, object],
    reference_note: str,
    reference_bytes: Callable[[torch.Tensor, int], float],
    others: Tuple[Contender, ...] = (),
    missing: Tuple[Tuple[str, str], ...] = (),
) -> LossSpec:
    """The spec of ``metricops.<name>(**kwargs)``, timed first against ``metricops.reference.<name>(**kwargs)``."""
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    trained = Contender(
        "metricops", lambda: functools.partial(getattr(metricops, name), **kwargs), f"metricops.{name}({args})"
    )
    ref = Contender(
        _REF,
        lambda: functools.partial(getattr(reference, name), **kwargs),
        f"metricops.reference.{name} ({reference_note})",
        reference_bytes,
    )
    return LossSpec(summary, lr=lr, trained=trained, others=(ref, *others), missing=missing)


LOSSES: Dict[str, LossSpec] = {
    "batch_hard": _metricops_loss(
        "batch_hard_triplet_loss",
        "batch-hard triplet (Hermans et al. 2017): per anchor, farthest positive vs nearest negative",
        lr=3e-3,
        kwargs=dict(margin=MARGIN, normalize=True),
        reference_note="explicit (B, B, D) differences",
        reference_bytes=_bbd_bytes,
        others=(
            Contender(
                _PML,
                _pml_batch_hard_mean,
                f"miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN}, reducer=reducers.MeanReducer())",
                _pairs_bytes,
            ),
        ),
    ),
    "semihard": _metricops_loss(
        "semihard_triplet_loss",
        "semi-hard triplet (FaceNet, TensorFlow-Addons rule): per positive pair, the nearest farther negative",
        lr=3e-3,
        kwargs=dict(margin=MARGIN, normalize=True),
        reference_note="a (B, B, B) search",
        reference_bytes=_cube_bytes,
        missing=((_PML, _NO_PML_SEMIHARD),),
    ),
    "batch_all": _metricops_loss(
        "batch_all_triplet_loss",
        "batch-all triplet: every valid triplet, averaged over the non-zero terms",
        lr=1e-3,
        kwargs=dict(margin=MARGIN, normalize=True),
        reference_note="(B, B, B) terms",
        reference_bytes=_cube_bytes,
        others=(
            Contender(
                _PML,
                lambda: _pml()[0].TripletMarginLoss(margin=MARGIN),
                f"losses.TripletMarginLoss(margin={MARGIN}) (all triplets, AvgNonZeroReducer)",
                _triplet_list_bytes,
            ),
        ),
    ),
    "contrastive": _metricops_loss(
        "contrastive_loss",
        f"contrastive: relu(d - {CONTRASTIVE_POS_MARGIN}) for positive pairs, relu({CONTRASTIVE_NEG_MARGIN} - d) "
        "for negative pairs, mean over all ordered pairs",
        lr=3e-3,
        kwargs=dict(pos_margin=CONTRASTIVE_POS_MARGIN, neg_margin=CONTRASTIVE_NEG_MARGIN, normalize=True),
        reference_note="explicit (B, B, D) differences",
        reference_bytes=_bbd_bytes,
        others=(
            Contender(
                _PML,
                _pml_contrastive_mean,
                f"losses.ContrastiveLoss(pos_margin={CONTRASTIVE_POS_MARGIN}, neg_margin={CONTRASTIVE_NEG_MARGIN}, "
                "reducer=reducers.SumReducer()) / (B(B-1))",
                _pairs_bytes,
            ),
        ),
    ),
    "pml_batch_hard": LossSpec(
        "the pytorch-metric-learning drop-in: BatchHardMiner + TripletMarginLoss (mean over non-zero terms)",
        lr=3e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _pml_dropin_batch_hard(*_metricops_pml()),
            f"metricops.pml: miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN})",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(
                    reference.batch_hard_triplet_loss, margin=MARGIN, normalize=True, reduction="mean_nonzero"
                ),
                "metricops.reference.batch_hard_triplet_loss(reduction='mean_nonzero')",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                lambda: _pml_dropin_batch_hard(_pml()[0], _pml()[1]),
                f"miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN})",
                _pairs_bytes,
            ),
        ),
    ),
    "pml_semihard": LossSpec(
        "the pytorch-metric-learning drop-in: TripletMarginMiner('semihard') + TripletMarginLoss",
        lr=1e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _pml_semihard(*_metricops_pml()),
            f"metricops.pml: miners.TripletMarginMiner(margin={MARGIN}, type_of_triplets='semihard') "
            f"+ losses.TripletMarginLoss(margin={MARGIN})",
        ),
        others=(
            Contender(
                _PML,
                lambda: _pml_semihard(_pml()[0], _pml()[1]),
                f"miners.TripletMarginMiner(margin={MARGIN}, type_of_triplets='semihard') + "
                f"losses.TripletMarginLoss(margin={MARGIN})",
                _triplet_list_bytes,
            ),
        ),
        missing=((_REF, "no reference for PML's mined-triplet composition"),),
    ),
    "pml_contrastive": LossSpec(
        "the pytorch-metric-learning drop-in: ContrastiveLoss (positive and negative pairs averaged separately)",
        lr=1e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _metricops_pml()[0].ContrastiveLoss(neg_margin=PML_CONTRASTIVE_NEG_MARGIN),
            f"metricops.pml: losses.ContrastiveLoss(neg_margin={PML_CONTRASTIVE_NEG_MARGIN})",
        ),
        others=(
            Contender(
                _REF,
                lambda: _reference_split_contrastive,
                "metricops.reference.contrastive_loss, positive and negative pairs (mean_nonzero each)",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                lambda: _pml()[0].ContrastiveLoss(neg_margin=PML_CONTRASTIVE_NEG_MARGIN),
                f"losses.ContrastiveLoss(neg_margin={PML_CONTRASTIVE_NEG_MARGIN})",
                _pairs_bytes,
            ),
        ),
    ),
}
