"""pytorch-metric-learning losses on metricops' native ops.

ContrastiveLoss runs on metricops.contrastive_loss (fused native op) when
every pair of the batch is used, and otherwise on metricops.pairwise_distance
plus gathers. TripletMarginLoss gathers from the native distance matrix. Both
reduce as PML's default AvgNonZeroReducer does (ContrastiveLoss: separately
for positive and negative pairs, then summed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as v
from ..contrastive import contrastive_loss
from ._common import all_pairs, all_triplets, avg_nonzero, refuse_unsupported, set_ref
from .distances import resolve


def _check_call(embeddings, labels, indices_tuple):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    if indices_tuple is not None and len(indices_tuple) not in (3, 4):
        raise ValueError(
            f"indices_tuple must hold 3 tensors (anchors, positives, negatives) or 4 (a1, p, a2, n), "
            f"got {len(indices_tuple)}"
        )


class ContrastiveLoss(torch.nn.Module):
    """``ContrastiveLoss(pos_margin=0, neg_margin=1, distance=None)``, as pytorch-metric-learning 2.9.

    Positive pairs give ``relu(d − pos_margin)``, negative pairs
    ``relu(neg_margin − d)`` (margins inverted for a similarity); each group
    is averaged over its nonzero terms and the two averages are summed.
    """

    def __init__(self, pos_margin: float = 0, neg_margin: float = 1, distance=None, **kwargs):
        super().__init__()
        refuse_unsupported("losses.ContrastiveLoss", kwargs)
        v.check_number(pos_margin, "pos_margin")
        v.check_number(neg_margin, "neg_margin")
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.distance = resolve(distance, "losses.ContrastiveLoss")

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_call(embeddings, labels, indices_tuple)
        ref, ref_lab = set_ref(embeddings, labels, ref_emb, ref_labels)
        dist = self.distance
        if (
            indices_tuple is None
            and ref_emb is None
            and labels.dtype in (torch.int32, torch.int64)
            and labels.device == embeddings.device
            and embeddings.dtype in (torch.float32, torch.float64)
        ):
            return self._all_pairs_native(embeddings, labels)
        if indices_tuple is None:
            indices_tuple = all_pairs(labels, ref_lab)
        elif len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        a1, p, a2, n = indices_tuple
        if all(len(t) <= 1 for t in indices_tuple):  # PML returns 0 here
            return torch.sum(embeddings * 0)
        mat = dist(embeddings, None if ref_emb is None else ref)
        zero = torch.sum(embeddings * 0)
        pos_loss = neg_loss = zero
        if len(a1) > 0:
            pos_loss = avg_nonzero(F.relu(dist.margin(mat[a1, p], self.pos_margin)), embeddings)
        if len(a2) > 0:
            neg_loss = avg_nonzero(F.relu(dist.margin(self.neg_margin, mat[a2, n])), embeddings)
        return pos_loss + neg_loss

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
    """``TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", distance=None)``.

    relu (or softplus, ``smooth_loss``) of ``d(a,p) − d(a,n) + margin`` (margin
    sign inverted for a similarity), averaged over the nonzero terms. Without
    ``indices_tuple`` every valid triplet is used.
    """

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                 triplets_per_anchor="all", distance=None, **kwargs):
        super().__init__()
        refuse_unsupported("losses.TripletMarginLoss", kwargs)
        if triplets_per_anchor != "all":
            raise NotImplementedError(
                f"metricops.pml: losses.TripletMarginLoss supports triplets_per_anchor='all' only, "
                f"got {triplets_per_anchor!r}"
            )
        v.check_number(margin, "margin", finite=True)
        v.check_flag(swap, "swap")
        v.check_flag(smooth_loss, "smooth_loss")
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self.distance = resolve(distance, "losses.TripletMarginLoss")

    def _triplets(self, embeddings, labels, ref_emb, ref_labels, indices_tuple):
        if indices_tuple is None:
            self_ref = ref_emb is None or ref_labels is None or ref_labels is labels
            if self_ref and labels.dtype in (torch.int32, torch.int64):
                import metricops

                if hasattr(metricops, "mine_triplets"):
                    return metricops.mine_triplets(
                        embeddings, labels, strategy="all", metric=self.distance.metric,
                        normalize=self.distance.normalize_embeddings,
                    )
            return all_triplets(labels, ref_labels)
        if len(indices_tuple) == 3:
            return indices_tuple
        a1, p, a2, n = indices_tuple  # pairs -> triplets sharing an anchor, as PML does
        p_idx, n_idx = torch.where(a1[:, None] == a2[None, :])
        return a1[p_idx], p[p_idx], n[n_idx]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_call(embeddings, labels, indices_tuple)
        ref, ref_lab = set_ref(embeddings, labels, ref_emb, ref_labels)
        a, p, n = self._triplets(embeddings, labels, ref_emb, ref_lab, indices_tuple)
        if len(a) == 0:
            return torch.sum(embeddings * 0)
        dist = self.distance
        mat = dist(embeddings, None if ref_emb is None else ref)
        ap = mat[a, p]
        an = mat[a, n]
        if self.swap:
            # PML indexes the (query, ref) matrix with (p, n) here, also with ref_emb.
            an = dist.smallest_dist(an, mat[p, n])
        violation = dist.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return avg_nonzero(losses, embeddings)
