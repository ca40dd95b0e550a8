"""Benchmark suites: name -> builder(device, quick) -> list of harness.Case."""

from .contrastive import contrastive_loss_cases, triplet_margin_loss_cases
from .distance import pairwise_distance_cases
from .retrieval import knn_cases
from .triplet import triplet_cases

SUITES = {
    "pairwise_distance": pairwise_distance_cases,
    "triplet": triplet_cases,
    "triplet_margin_loss": triplet_margin_loss_cases,
    "contrastive_loss": contrastive_loss_cases,
    "knn": knn_cases,
}
