"""pytorch-metric-learning losses on metricops' native ops.

Each loss builds PML's loss dict (per-pair or per-triplet terms and their
indices) and hands it to its reducer (``reducer=``, PML's default
AvgNonZeroReducer). With that default reducer the common calls never build
the dict: ContrastiveLoss over every pair of the batch is one fused native
op per pair group, and TripletMarginLoss over every triplet, or over a
metricops.pml miner's output, is computed by ``_fused`` without listing the
triplets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as v
from ..contrastive import contrastive_loss
from . import _fused
from . import reducers as _reducers
from ._common import (
    all_pairs,
    all_triplets,
    check_call as _check_call,
    mining_values,
    nonfinite_below_streaming,
    refuse_unsupported,
    set_ref,
)
from ._mined import MinedTriplets, TripletSelection
from ._similarity import (  # noqa: F401 (the similarity losses, re-exported)
    CircleLoss,
    GeneralizedLiftedStructureLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
)
from .distances import resolve


def _no_terms():
    """PML's zero_loss entry: no terms at all; every reducer turns it into the zero loss."""
    return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def _native_dtype(embeddings, labels) -> bool:
    """Whether the fused native ops take these inputs as they are (else the generic path runs)."""
    return (
        labels is not None
        and labels.dtype in (torch.int32, torch.int64)
        and labels.device == embeddings.device
        and embeddings.dtype in (torch.float32, torch.float64)
    )


class ContrastiveLoss(torch.nn.Module):
    """``ContrastiveLoss(pos_margin=0, neg_margin=1, distance=None, reducer=None)``, as pytorch-metric-learning 2.9.

    Positive pairs give ``relu(d − pos_margin)``, negative pairs
    ``relu(neg_margin − d)`` (margins inverted for a similarity). Each group
    is reduced by its own copy of ``reducer`` (default AvgNonZeroReducer:
    the mean over its nonzero terms) and the two are summed.
    """

    def __init__(self, pos_margin: float = 0, neg_margin: float = 1, distance=None, reducer=None, **kwargs):
        super().__init__()
        refuse_unsupported("losses.ContrastiveLoss", kwargs)
        v.check_number(pos_margin, "pos_margin")
        v.check_number(neg_margin, "neg_margin")
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.distance = resolve(distance, "losses.ContrastiveLoss")
        self.reducer = _reducers.resolve(
            reducer, ["pos_loss", "neg_loss"], _reducers.AvgNonZeroReducer, "losses.ContrastiveLoss"
        )

    def _default_reducer(self) -> bool:
        r = self.reducer
        return (
            type(r) is _reducers.MultipleReducers
            and set(r.reducers) == {"pos_loss", "neg_loss"}
            and all(_reducers.is_avg_nonzero(x) for x in r.reducers.values())
        )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_call(embeddings, labels, indices_tuple)
        v.check_number(self.pos_margin, "pos_margin")  # again: the attributes may be set after construction
        v.check_number(self.neg_margin, "neg_margin")
        ref, ref_lab = set_ref(embeddings, labels, ref_emb, ref_labels)
        if (
            indices_tuple is None
            and ref_emb is None
            and _native_dtype(embeddings, labels)
            and self._default_reducer()
            and not nonfinite_below_streaming(embeddings)
        ):
            return self._all_pairs_native(embeddings, labels)
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, None if ref_emb is None else ref, ref_lab)
        return self.reducer(loss_dict, embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's loss dict: ``pos_loss`` and ``neg_loss`` terms with their (anchor, other) pairs."""
        if indices_tuple is None:
            indices_tuple = all_pairs(labels, ref_labels)
        elif len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        a1, p, a2, n = indices_tuple
        if all(len(t) <= 1 for t in indices_tuple):  # PML reduces this to 0
            return {"pos_loss": _no_terms(), "neg_loss": _no_terms()}
        dist = self.distance
        mat = dist(embeddings, ref_emb)
        pos_loss = F.relu(dist.margin(mat[a1, p], self.pos_margin)) if len(a1) > 0 else 0
        neg_loss = F.relu(dist.margin(self.neg_margin, mat[a2, n])) if len(a2) > 0 else 0
        return {
            "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
        }

    def _all_pairs_native(self, embeddings, labels):
        # PML averages the positive and the negative terms separately over
        # their nonzero entries. An infinite margin switches one group off
        # (its hinge is 0 with slope 0), so each group is one fused native
        # call with reduction="mean_nonzero", which is 0 when no term is > 0,
        # as AvgNonZeroReducer. Margins on a similarity s = 1 − d become
        # distance margins 1 − margin.
        dist = self.distance
        pm, nm = float(self.pos_margin), float(self.neg_margin)
        if dist.is_inverted:
            pm, nm = 1.0 - pm, 1.0 - nm
        inf = float("inf")
        kw = dict(metric=dist.metric, normalize=dist.normalize_embeddings, reduction="mean_nonzero")
        pos = contrastive_loss(embeddings, labels, pos_margin=pm, neg_margin=-inf, **kw)
        neg = contrastive_loss(embeddings, labels, pos_margin=inf, neg_margin=nm, **kw)
        return pos + neg


class TripletMarginLoss(torch.nn.Module):
    """``TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", distance=None,
    reducer=None)``.

    relu (or softplus, ``smooth_loss``) of ``d(a,p) − d(a,n) + margin`` (margin
    sign inverted for a similarity), reduced by ``reducer`` (default
    AvgNonZeroReducer: the mean over the nonzero terms). Without
    ``indices_tuple`` every valid triplet is used.
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor="all",
        distance=None,
        reducer=None,
        **kwargs,
    ):
        super().__init__()
        refuse_unsupported("losses.TripletMarginLoss", kwargs)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self._check_attributes()
        self.distance = resolve(distance, "losses.TripletMarginLoss")
        self.reducer = _reducers.resolve(reducer, ["loss"], _reducers.AvgNonZeroReducer, "losses.TripletMarginLoss")

    def _check_attributes(self):
        """At construction and at each call (the attributes may be set after construction)."""
        if self.triplets_per_anchor != "all":
            raise NotImplementedError(
                f"metricops.pml: losses.TripletMarginLoss supports triplets_per_anchor='all' only, "
                f"got {self.triplets_per_anchor!r}"
            )
        v.check_number(self.margin, "margin", finite=True)
        v.check_flag(self.swap, "swap")
        v.check_flag(self.smooth_loss, "smooth_loss")

    def _triplets(self, embeddings, labels, ref_emb, ref_labels, indices_tuple):
        if indices_tuple is None:
            self_ref = ref_emb is None or ref_labels is None or ref_labels is labels
            if self_ref and labels.dtype in (torch.int32, torch.int64):
                import metricops

                return metricops.mine_triplets(
                    mining_values(embeddings),
                    labels,
                    strategy="all",
                    metric=self.distance.metric,
                    normalize=self.distance.normalize_embeddings,
                )
            return all_triplets(labels, ref_labels)
        if len(indices_tuple) == 3:
            return tuple(indices_tuple)
        a1, p, a2, n = indices_tuple  # pairs -> triplets sharing an anchor, as PML does
        p_idx, n_idx = torch.where(a1[:, None] == a2[None, :])
        return a1[p_idx], p[p_idx], n[n_idx]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_call(embeddings, labels, indices_tuple)
        self._check_attributes()
        ref, ref_lab = set_ref(embeddings, labels, ref_emb, ref_labels)
        if ref_emb is None:
            fused = self._fused(embeddings, labels, indices_tuple)
            if fused is not None:
                return fused
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, None if ref_emb is None else ref, ref_lab)
        return self.reducer(loss_dict, embeddings, labels)

    def _fused(self, embeddings, labels, indices_tuple):
        """The loss without listing triplets, where that is exact: the default reducer and hinge, and every
        triplet of the batch or a metricops.pml miner's selection on these very embeddings. Else None."""
        if self.swap or self.smooth_loss or not _reducers.is_avg_nonzero(self.reducer):
            return None
        if embeddings.dtype not in (torch.float32, torch.float64):
            return None
        dist = self.distance
        if indices_tuple is None:
            if not _native_dtype(embeddings, labels):
                return None
            return _fused.triplet_margin_loss(
                embeddings, labels, None, self.margin, dist.metric, dist.normalize_embeddings
            )
        if not isinstance(indices_tuple, MinedTriplets) or indices_tuple.source is None:
            return None
        selection, source = indices_tuple.selection, indices_tuple.source
        if not isinstance(selection, TripletSelection):  # a pair miner's output: listed, converted as PML does
            return None
        same_distance = (selection.metric, selection.normalize, selection.is_inverted) == (
            dist.metric,
            dist.normalize_embeddings,
            dist.is_inverted,
        )
        if not same_distance or not source.is_unchanged(embeddings) or source.labels.device != embeddings.device:
            return None
        if selection.type_of_triplets == "batch_hard":
            return _fused.batch_hard_loss(
                embeddings, source.labels, self.margin, dist.metric, dist.normalize_embeddings
            )
        return _fused.triplet_margin_loss(
            embeddings, source.labels, selection, self.margin, dist.metric, dist.normalize_embeddings
        )

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's loss dict: one term per triplet, with the (anchor, positive, negative) indices."""
        a, p, n = self._triplets(embeddings, labels, ref_emb, ref_labels, indices_tuple)
        if len(a) == 0:
            return {"loss": _no_terms()}
        dist = self.distance
        mat = dist(embeddings, ref_emb)
        ap = mat[a, p]
        an = mat[a, n]
        if self.swap:
            # PML indexes the (query, ref) matrix with (p, n) here, also with ref_emb.
            an = dist.smallest_dist(an, mat[p, n])
        violation = dist.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}


# The losses with class parameters live in their own module; their public home is this one.
from ._class_losses import ArcFaceLoss, CosFaceLoss, ProxyAnchorLoss  # noqa: E402

for _cls in (ArcFaceLoss, CosFaceLoss, ProxyAnchorLoss):
    _cls.__module__ = __name__
