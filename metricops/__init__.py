"""metricops: fused C++/CUDA kernels for deep metric learning.

Importing the package loads the native operators (``torch.ops.metricops``) and
registers their fake kernels and autograd formulas.
"""

from . import _ops  # noqa: F401  (loads the native library first)
from . import _registrations  # noqa: F401
from . import reference  # noqa: F401
from ._ops import build_info
from .distance import pairwise_distance
from .triplet import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    mine_triplets,
    semihard_triplet_loss,
    triplet_statistics,
)
from .contrastive import contrastive_loss, pair_contrastive_loss, triplet_margin_loss
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
from .class_losses import arcface_loss, cosface_loss, proxy_anchor_loss
from . import retrieval  # noqa: F401
from . import nn  # noqa: F401
from . import distributed  # noqa: F401  (torch.distributed is already imported by torch)

__version__ = "0.1.0"

__all__ = [
    "pairwise_distance",
    "batch_hard_triplet_loss",
    "semihard_triplet_loss",
    "batch_all_triplet_loss",
    "triplet_statistics",
    "mine_triplets",
    "contrastive_loss",
    "pair_contrastive_loss",
    "triplet_margin_loss",
    "knn",
    "supcon_loss",
    "ntxent_loss",
    "multi_similarity_loss",
    "circle_loss",
    "generalized_lifted_structure_loss",
    "lifted_structure_loss",
    "info_nce_loss",
    "retrieval_metrics",
    "arcface_loss",
    "cosface_loss",
    "proxy_anchor_loss",
    "retrieval",
    "distributed",
    "build_info",
    "reference",
    "__version__",
]
