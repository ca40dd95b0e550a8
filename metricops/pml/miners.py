"""pytorch-metric-learning miners on metricops' native ops.

``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` returns
``(a, p, n)`` int64 index tensors, like pytorch-metric-learning 2.9's
``BatchHardMiner`` and ``TripletMarginMiner``: ``a`` indexes ``embeddings``,
``p`` and ``n`` index ``ref_emb`` (the batch itself without one). With no ties
among distances, the same triplets are selected.

Within a batch (no ``ref_emb``) the result is a ``MinedTriplets``: that tuple,
mined when first looked at. A metricops.pml TripletMarginLoss given it with
the same embeddings never looks: it computes its value fused (``_fused``).
"""

from __future__ import annotations

import torch

from .. import _validation as v
from ..distance import pairwise_distance
from ..triplet import mine_triplets
from ._common import matches_and_diffs, mining_values, refuse_unsupported
from ._fused import batch_hard_indices
from ._mined import MinedSource, MinedTriplets, TripletSelection
from ._ms_miner import MultiSimilarityMiner  # noqa: F401 (re-exported)
from .distances import resolve

TRIPLET_TYPES = ("all", "hard", "semihard", "easy")

# The reference-set path tests every negative of a block of positive pairs at
# once; this bounds the block's pairs × R elements.
_REF_BLOCK_ELEMENTS = 2**24


def native_strategy(type_of_triplets: str, margin: float):
    """``TripletMarginMiner``'s selection as a ``metricops.mine_triplets`` (strategy, margin).

    With m = d(a, n) − d(a, p), PML selects ``"all"``: m <= margin,
    ``"hard"``: m <= margin and m <= 0, ``"semihard"``: 0 < m <= margin,
    ``"easy"``: m > margin. mine_triplets' ``"hard"`` is m <= 0 alone, so a
    negative margin makes PML's hard set the ``"violating"`` one (m <= margin).
    """
    if type_of_triplets == "all":
        return "violating", margin
    if type_of_triplets == "hard" and margin < 0:
        return "violating", margin
    return type_of_triplets, margin


def _select(selection: TripletSelection, m: torch.Tensor) -> torch.Tensor:
    """PML's TripletMarginMiner condition on the triplet margins m."""
    if selection.type_of_triplets == "easy":
        return m > selection.margin
    keep = m <= selection.margin
    if selection.type_of_triplets == "hard":
        keep &= m <= 0
    elif selection.type_of_triplets == "semihard":
        keep &= m > 0
    return keep


def _distance_matrix(selection: TripletSelection, x, ref=None):
    """The miner's distance matrix as PML sees it (for CosineSimilarity: the similarities)."""
    d = pairwise_distance(x, ref, metric=selection.metric, normalize=selection.normalize)
    return 1 - d if selection.is_inverted else d


def mine_batch(selection: TripletSelection, x: torch.Tensor, labels: torch.Tensor):
    """The triplets ``selection`` picks within one batch (x detached, labels int32/int64)."""
    with torch.no_grad():
        if selection.type_of_triplets == "batch_hard":
            return batch_hard_indices(x, labels, selection.metric, selection.normalize)
        if selection.is_inverted:
            # PML compares similarities s = 1 − d, rounded to float: near s = 1 two
            # distances that differ can round to the same similarity (a tie PML's
            # test relies on), so the selection runs on the similarities themselves.
            return mine_reference(selection, _distance_matrix(selection, x), *matches_and_diffs(labels, labels))
        strategy, margin = native_strategy(selection.type_of_triplets, selection.margin)
        return mine_triplets(
            x, labels, strategy=strategy, margin=margin, metric=selection.metric, normalize=selection.normalize
        )


def mine_reference(selection: TripletSelection, mat, matches, diffs):
    """PML's rules on its (B, R) matrix ``mat`` with the (B, R) label masks."""
    if selection.type_of_triplets == "batch_hard":
        return _batch_hard_reference(selection, mat, matches, diffs)
    # PML: every valid triplet's margin, then the condition. Per positive pair
    # rather than per (a, p, n) of a B × R × R tensor: O(#positive pairs · R)
    # work, in blocks of pairs. Positive pairs in (a, p) order, negatives
    # ascending: PML's lexicographic order.
    anchors, positives = torch.where(matches)
    block = max(1, _REF_BLOCK_ELEMENTS // max(1, mat.shape[1]))
    found = []
    for start in range(0, len(anchors), block):
        a, p = anchors[start : start + block], positives[start : start + block]
        ap, an = mat[a, p][:, None], mat[a]
        m = ap - an if selection.is_inverted else an - ap
        pair, n = torch.where(diffs[a] & _select(selection, m))
        found.append((a[pair], p[pair], n))
    if not found:
        empty = torch.empty(0, dtype=torch.int64, device=mat.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(parts) for parts in zip(*found))


def _batch_hard_reference(selection, mat, matches, diffs):
    a = torch.arange(mat.shape[0], device=mat.device)
    if mat.shape[1] == 0:  # no reference rows: no triplet (PML's max() fails here)
        return a[:0], a[:0].clone(), a[:0].clone()
    # PML's get_x_per_row: the invalid entries become ±inf, then one max/min per row.
    inf = torch.tensor(float("inf"), dtype=mat.dtype, device=mat.device)
    if selection.is_inverted:  # similarities: hardest positive is the least similar
        p = mat.masked_fill(~matches, inf).min(dim=1).indices
        n = mat.masked_fill(~diffs, -inf).max(dim=1).indices
    else:
        p = mat.masked_fill(~matches, -inf).max(dim=1).indices
        n = mat.masked_fill(~diffs, inf).min(dim=1).indices
    keep = matches.any(dim=1) & diffs.any(dim=1)
    return a[keep], p[keep], n[keep]


def _integer_labels(labels, name="labels"):
    """pytorch-metric-learning takes float labels too (any values: it only compares them); the kernels compare
    integers. Integral values are kept; other floats become the indices of their distinct values."""
    if labels.dtype in (torch.int32, torch.int64):
        return labels
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        return torch.unique(labels, return_inverse=True)[1]
    return labels.to(torch.int64)


class _TripletMiner(torch.nn.Module):
    _name = "miners"

    def __init__(self, distance, kwargs):
        super().__init__()
        refuse_unsupported(self._name, kwargs)
        self.distance = resolve(distance, self._name)

    def _selection(self) -> TripletSelection:
        raise NotImplementedError

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        v.check_tensor(embeddings, "embeddings")
        ref_is_batch = ref_emb is embeddings
        embeddings = mining_values(embeddings)  # (indices only)
        if isinstance(ref_emb, torch.Tensor):
            ref_emb = embeddings if ref_is_batch else mining_values(ref_emb)
        v.check_embeddings(embeddings, "embeddings")
        v.check_tensor(labels, "labels")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be a 1-D tensor of length B={embeddings.shape[0]} (one label per embedding), "
                f"got shape {tuple(labels.shape)}"
            )
        selection = self._selection()
        # PML's set_ref_emb: without ref_emb the batch is its own reference;
        # (i, i) is left out only when the reference labels are the batch's own tensor.
        self_ref_labels = ref_labels is labels
        labels = labels.to(embeddings.device)
        if ref_emb is None or (ref_emb is embeddings and self_ref_labels):
            source = MinedSource(embeddings, _integer_labels(labels))
            return MinedTriplets(lambda: mine_batch(selection, source.values, source.labels), selection, source)
        v.check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("ref_labels must be given with ref_emb (one label per ref_emb row)")
        v.check_tensor(ref_labels, "ref_labels")
        if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]:
            raise ValueError(
                f"ref_labels must be a 1-D tensor of length {ref_emb.shape[0]} (one per ref_emb row), "
                f"got shape {tuple(ref_labels.shape)}"
            )
        ref_labels = labels if self_ref_labels else ref_labels.to(embeddings.device)
        with torch.no_grad():
            mat = _distance_matrix(selection, embeddings.detach(), ref_emb.detach())
            return mine_reference(selection, mat, *matches_and_diffs(labels, ref_labels))


class BatchHardMiner(_TripletMiner):
    """``BatchHardMiner(distance=None)``: per anchor with a triplet, its hardest positive and hardest negative."""

    _name = "miners.BatchHardMiner"

    def __init__(self, distance=None, **kwargs):
        super().__init__(distance, kwargs)

    def _selection(self):
        d = self.distance
        return TripletSelection("batch_hard", 0.0, d.metric, d.normalize_embeddings, d.is_inverted)


class TripletMarginMiner(_TripletMiner):
    """``TripletMarginMiner(margin=0.2, type_of_triplets="all", distance=None)``.

    Selects valid triplets by m = d(a, n) − d(a, p) (for ``CosineSimilarity``,
    s(a, p) − s(a, n), the same number): ``"all"``: m <= margin, ``"hard"``:
    m <= min(margin, 0), ``"semihard"``: 0 < m <= margin, ``"easy"``: m > margin.
    Triplets come in lexicographic (a, p, n) order.
    """

    _name = "miners.TripletMarginMiner"

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None, **kwargs):
        super().__init__(distance, kwargs)
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self._selection()  # checks both, as each call does

    def _selection(self):
        # at construction and at each call (the attributes may be set after construction)
        if self.type_of_triplets not in TRIPLET_TYPES:
            raise NotImplementedError(
                f"metricops.pml: miners.TripletMarginMiner type_of_triplets must be one of "
                f"{', '.join(repr(t) for t in TRIPLET_TYPES)}, got {self.type_of_triplets!r}"
            )
        d = self.distance
        margin = v.check_number(self.margin, "margin", finite=True)
        return TripletSelection(self.type_of_triplets, float(margin), d.metric, d.normalize_embeddings, d.is_inverted)
