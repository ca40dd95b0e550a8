"""Plain-PyTorch reference implementations: the ground truth for tests.

Written for clarity, not speed (some use O(B³) memory); every native op is
checked against these in float64. One module per op family; a new family adds
its module here and re-exports its public functions below.
"""

from .class_losses import arcface_loss, cosface_loss, proxy_anchor_loss, proxy_anchor_terms
from .contrastive import contrastive_loss, pair_contrastive_loss, triplet_margin_loss
from .distance import _row_distance, pairwise_distance
from .retrieval import knn, retrieval_metrics
from .similarity import (
    circle_loss,
    generalized_lifted_structure_loss,
    info_nce_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    ntxent_loss,
    supcon_loss,
)
from .triplet import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    mine_triplets,
    semihard_negatives,
    semihard_triplet_loss,
    triplet_statistics,
)

__all__ = [
    "_row_distance",
    "arcface_loss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "circle_loss",
    "contrastive_loss",
    "generalized_lifted_structure_loss",
    "info_nce_loss",
    "cosface_loss",
    "knn",
    "lifted_structure_loss",
    "mine_triplets",
    "multi_similarity_loss",
    "ntxent_loss",
    "pair_contrastive_loss",
    "pairwise_distance",
    "proxy_anchor_loss",
    "proxy_anchor_terms",
    "retrieval_metrics",
    "semihard_negatives",
    "semihard_triplet_loss",
    "supcon_loss",
    "triplet_margin_loss",
    "triplet_statistics",
]
