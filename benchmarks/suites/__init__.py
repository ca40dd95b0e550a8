"""Benchmark suites: name -> builder(device, quick) -> list of harness.Case.

`quick` is False (full sizes), True or "quick" (small sizes, `--quick`), or
"tiny" (the smallest sizes, for the CLI's own test; any truthy value is quick).
"""

from .class_losses import class_losses_cases
from .contrastive import contrastive_loss_cases, triplet_margin_loss_cases
from .distance import pairwise_distance_cases
from .retrieval import knn_cases
from .scale import scale_cases
from .similarity import similarity_cases
from .triplet import triplet_cases

SUITES = {
    "pairwise_distance": pairwise_distance_cases,
    "triplet": triplet_cases,
    "triplet_margin_loss": triplet_margin_loss_cases,
    "contrastive_loss": contrastive_loss_cases,
    "knn": knn_cases,
    "scale": scale_cases,
    "similarity": similarity_cases,
    "class_losses": class_losses_cases,
}
