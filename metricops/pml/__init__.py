"""Drop-in for a subset of pytorch-metric-learning 2.9, on metricops' native ops.

``from metricops.pml import losses, miners, distances, reducers`` replaces the
same import from ``pytorch_metric_learning`` for:

* ``distances.LpDistance(normalize_embeddings=True, p=2, power=1|2)``, ``distances.CosineSimilarity()``
* ``losses.ContrastiveLoss(pos_margin=0, neg_margin=1, distance=None, reducer=None)``
* ``losses.TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", distance=None,
  reducer=None)``
* ``miners``: ``BatchHardMiner``, ``TripletMarginMiner`` (on ``metricops.mine_triplets``; also with
  ``ref_emb``/``ref_labels``).
* ``losses.SupConLoss``, ``NTXentLoss``, ``MultiSimilarityLoss``, ``CircleLoss``,
  ``GeneralizedLiftedStructureLoss``, ``LiftedStructureLoss`` and ``miners.MultiSimilarityMiner`` (on the
  streaming similarity engine; see ``_similarity``).
* ``reducers``: ``MeanReducer``, ``SumReducer``, ``AvgNonZeroReducer``, ``ThresholdReducer``,
  ``DoNothingReducer``, ``PerAnchorReducer``, ``MultipleReducers``.

Within a batch the miners return a ``MinedTriplets``: the ``(a, p, n)`` tuple,
mined only when something looks inside. TripletMarginLoss (default reducer,
no swap/smooth_loss) given it with the same embeddings, or given no
indices at all, computes its value and gradient fused on the native
batch-all / batch-hard ops, without listing the triplets.

Values and gradients equal pytorch-metric-learning's to float32 rounding. Any
other argument raises ``NotImplementedError`` naming it. pytorch-metric-learning
itself is never imported here.
"""

from . import distances, losses, miners, reducers

__all__ = ["distances", "losses", "miners", "reducers"]
