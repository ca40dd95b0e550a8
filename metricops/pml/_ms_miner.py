"""pytorch-metric-learning 2.9's MultiSimilarityMiner, and the lazy pairs it returns (a metricops.pml
MultiSimilarityLoss on the same embeddings consumes the rule without listing them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as v
from ._common import refuse_unsupported, set_ref
from ._mined import MinedSource, MinedTriplets
from .distances import BaseDistance, CosineSimilarity

# Elements (rows × R) of one block of the miner's similarity matrix.
_MINER_BLOCK_ELEMENTS = 2**24


class MultiSimilaritySelection:
    """A MultiSimilarityMiner's rule, frozen at the call: ``epsilon`` and the miner's ``distance``."""

    def __init__(self, epsilon: float, distance: BaseDistance):
        self.epsilon = epsilon
        self.distance = distance


class MinedPairs(MinedTriplets):
    """``(a1, p, a2, n)``: the MultiSimilarityMiner's pairs as int64 tensors, mined on first look (see
    ``MinedTriplets``); a metricops.pml MultiSimilarityLoss on the same embeddings never looks."""

    def __len__(self):
        return 4


def _mine_pairs(distance: BaseDistance, epsilon: float, x, labels, ref, ref_labels, self_labels: bool, self_emb: bool):
    """PML's MultiSimilarityMiner on (B, R) in row blocks: positive (i, j) kept if
    s_ij − ε < max over i's negatives (distances: d_ij + ε > min), negative kept if s_ij + ε > min over i's
    positives (d_ij − ε < max). Pairs in row-major order (PML orders each row by similarity).

    ``self_labels``: (i, i) is no positive pair (PML: ``ref_labels is labels``); ``self_emb``: (i, i) is
    no candidate at all (PML: ``embeddings is ref_emb``).
    """
    empty = torch.empty(0, dtype=torch.int64, device=x.device)
    if x.shape[0] == 0 or ref.shape[0] == 0:
        return empty, empty.clone(), empty.clone(), empty.clone()
    block = max(1, _MINER_BLOCK_ELEMENTS // ref.shape[0])
    inf = float("inf")
    found_pos, found_neg, any_pos, any_neg = [], [], False, False
    cosine = isinstance(distance, CosineSimilarity)
    if cosine:  # PML's own arithmetic: normalized rows, one matrix product
        x, ref = F.normalize(x, dim=1), F.normalize(ref, dim=1)
    for start in range(0, x.shape[0], block):
        rows = torch.arange(start, min(start + block, x.shape[0]), device=x.device)
        local = torch.arange(len(rows), device=x.device)
        if cosine:
            mat = x[rows] @ ref.T
        else:
            mat = distance(x[rows], ref)  # LpDistance: metricops.pairwise_distance (half precision on CPU too)
        matches = labels[rows, None] == ref_labels[None, :]
        diffs = ~matches
        if self_labels:
            matches[local, rows] = False
        any_pos |= bool(matches.any())
        any_neg |= bool(diffs.any())
        # PML sorts the positives among the entries not listed as negatives and vice versa; (i, i) is
        # ignored by both only when the reference is the batch itself.
        pos_cand, neg_cand = ~diffs, ~matches
        if self_emb:
            pos_cand[local, rows] = False
            neg_cand[local, rows] = False
        if distance.is_inverted:
            hardest_neg = mat.masked_fill(~neg_cand, -inf).amax(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos_cand, inf).amin(dim=1, keepdim=True)
            keep_pos = pos_cand & (mat - epsilon < hardest_neg)
            keep_neg = neg_cand & (mat + epsilon > hardest_pos)
        else:
            hardest_neg = mat.masked_fill(~neg_cand, inf).amin(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos_cand, -inf).amax(dim=1, keepdim=True)
            keep_pos = pos_cand & (mat + epsilon > hardest_neg)
            keep_neg = neg_cand & (mat - epsilon < hardest_pos)
        r, c = torch.where(keep_pos)
        found_pos.append((rows[r], c))
        r, c = torch.where(keep_neg)
        found_neg.append((rows[r], c))
    if not any_pos or not any_neg:
        return empty, empty.clone(), empty.clone(), empty.clone()
    a1, p = (torch.cat(t) for t in zip(*found_pos))
    a2, n = (torch.cat(t) for t in zip(*found_neg))
    return a1, p, a2, n


class MultiSimilarityMiner(torch.nn.Module):
    """``MultiSimilarityMiner(epsilon=0.1, distance=None)``, as pytorch-metric-learning 2.9.

    Returns ``(a1, p, a2, n)`` int64 index tensors: positive pairs (a1, p) whose similarity is below the
    anchor's hardest negative's + ε, negative pairs (a2, n) above the anchor's hardest positive's − ε (for
    an LpDistance, the same with distances and the inequalities flipped). Nothing when the batch has no
    positive or no negative pair. Computed in row blocks (O(block·R) memory). Within a batch the result is
    a ``MinedPairs``, mined when first looked at; a metricops.pml MultiSimilarityLoss given it on the same
    embeddings computes its value natively without the pairs. Within each anchor the pairs are in
    column order (PML's are in order of similarity); as sets they are PML's.
    """

    def __init__(self, epsilon: float = 0.1, distance=None, **kwargs):
        super().__init__()
        refuse_unsupported("miners.MultiSimilarityMiner", kwargs)
        if distance is None:
            distance = CosineSimilarity()
        if not isinstance(distance, BaseDistance):
            raise NotImplementedError(
                "metricops.pml: miners.MultiSimilarityMiner(distance=...) must be metricops.pml.distances."
                f"LpDistance or CosineSimilarity, got {type(distance).__module__}.{type(distance).__name__}"
            )
        self.epsilon = v.check_number(epsilon, "epsilon")
        self.distance = distance

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        v.check_tensor(embeddings, "embeddings")
        v.check_tensor(labels, "labels")
        set_ref(embeddings, labels, ref_emb, ref_labels)
        epsilon, distance = float(self.epsilon), self.distance
        # PML's set_ref_emb: without ref_emb the batch is its own reference, with its own labels object
        self_emb = ref_emb is None or ref_emb is embeddings
        self_labels = ref_emb is None or ref_labels is None or ref_labels is labels
        labels = labels.to(embeddings.device)
        if self_emb and self_labels:
            source = MinedSource(embeddings, labels)
            selection = MultiSimilaritySelection(epsilon, distance)
            values = source.values
            return MinedPairs(
                lambda: _mine_pairs(distance, epsilon, values, source.labels, values, source.labels, True, True),
                selection,
                source,
            )
        if ref_labels is None:
            raise ValueError("ref_labels must be given with ref_emb (one label per ref_emb row)")
        ref_labels = ref_labels.to(embeddings.device)
        with torch.no_grad():
            return _mine_pairs(
                distance, epsilon, embeddings.detach(), labels, ref_emb.detach(), ref_labels, self_labels, self_emb
            )
