"""Benchmark suites: name -> builder(device, quick) -> list of harness.Case."""

from .distance import pairwise_distance_cases
from .retrieval import knn_cases

SUITES = {
    "pairwise_distance": pairwise_distance_cases,
    "knn": knn_cases,
}
