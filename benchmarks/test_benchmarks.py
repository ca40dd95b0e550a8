"""pytest-benchmark view of the same cases as the CLI.

Run with `.venv/bin/python -m pytest benchmarks --benchmark-enable` (the CLI,
`python -m benchmarks`, prints side-by-side ratios instead). Not part of
`make test`: speed is shown by benchmarks, never asserted in tests.
"""

import pytest
import torch

from benchmarks.suites import SUITES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params():
    for op, build in SUITES.items():
        for case in build(DEVICE, True):
            sizes = "-".join(f"{k}{v}" for k, v in case.params.items())
            for name, fn in case.contenders.items():
                yield pytest.param(fn, id=f"{op}-{case.mode}-{sizes}-{name}")


@pytest.mark.parametrize("fn", list(_params()))
def test_benchmark(benchmark, fn):
    if DEVICE == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark(run)
    else:
        benchmark(fn)
