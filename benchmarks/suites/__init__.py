"""Benchmark suites: name -> builder(device, quick) -> list of harness.Case."""

from .distance import pairwise_distance_cases
from .triplet import triplet_cases

SUITES = {
    "pairwise_distance": pairwise_distance_cases,
    "triplet": triplet_cases,
}
