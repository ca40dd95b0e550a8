"""pytorch-metric-learning miners on metricops.mine_triplets.

``miner(embeddings, labels)`` returns ``(a, p, n)`` int64 index tensors, like
pytorch-metric-learning 2.9's ``BatchHardMiner`` and ``TripletMarginMiner``.
With no ties among distances, the same triplets are selected (PML's
``type_of_triplets="all"`` is metricops' ``"violating"`` strategy).
"""

from __future__ import annotations

import torch

from ..triplet import mine_triplets
from ._common import refuse_unsupported
from .. import _validation as v
from .distances import resolve

_TYPES = {"all": "violating", "hard": "hard", "semihard": "semihard", "easy": "easy"}


class _TripletMiner(torch.nn.Module):
    _name = "miners"

    def __init__(self, distance, kwargs):
        super().__init__()
        refuse_unsupported(self._name, kwargs)
        self.distance = resolve(distance, self._name)

    def _mine(self, embeddings, labels, ref_emb, ref_labels, strategy, margin):
        if (ref_emb is not None and ref_emb is not embeddings) or (ref_labels is not None and ref_labels is not labels):
            raise NotImplementedError(f"metricops.pml: {self._name} does not support ref_emb/ref_labels yet")
        # pytorch-metric-learning takes float labels too; the kernels compare integers.
        if labels.dtype not in (torch.int32, torch.int64):
            if labels.is_floating_point() and not torch.equal(labels, labels.round()):
                raise ValueError("labels must hold integer values (int32/int64, or integral floats)")
            labels = labels.to(torch.int64)
        return mine_triplets(
            embeddings.detach(),
            labels,
            strategy=strategy,
            margin=margin,
            metric=self.distance.metric,
            normalize=self.distance.normalize_embeddings,
        )


class BatchHardMiner(_TripletMiner):
    """``BatchHardMiner(distance=None)``: per anchor with a triplet, its hardest positive and hardest negative."""

    _name = "miners.BatchHardMiner"

    def __init__(self, distance=None, **kwargs):
        super().__init__(distance, kwargs)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self._mine(embeddings, labels, ref_emb, ref_labels, "batch_hard", 0.0)


class TripletMarginMiner(_TripletMiner):
    """``TripletMarginMiner(margin=0.2, type_of_triplets="all", distance=None)``.

    Selects valid triplets by m = d(a, n) − d(a, p) (for ``CosineSimilarity``,
    s(a, p) − s(a, n), the same number): ``"all"``: m <= margin, ``"hard"``:
    m <= 0, ``"semihard"``: 0 < m <= margin, ``"easy"``: m > margin.
    """

    _name = "miners.TripletMarginMiner"

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None, **kwargs):
        super().__init__(distance, kwargs)
        if type_of_triplets not in _TYPES:
            raise NotImplementedError(
                f"metricops.pml: miners.TripletMarginMiner type_of_triplets must be one of "
                f"{', '.join(repr(t) for t in _TYPES)}, got {type_of_triplets!r}"
            )
        self.margin = v.check_number(margin, "margin", finite=True)
        self.type_of_triplets = type_of_triplets

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self._mine(embeddings, labels, ref_emb, ref_labels, _TYPES[self.type_of_triplets], self.margin)
