"""The interleaved timing loop every benchmark and the demo use (metricops.demo.timing.interleaved_times)."""

import torch

from metricops.demo.timing import interleaved_times


def test_rounds_rotate_which_contender_goes_first():
    """Round r starts with contender r mod n: none always runs right after the same other one (a call that
    follows large allocations pays for them), and every contender gets one sample per round."""
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = interleaved_times(runs, torch.device("cpu"), budget_s=0.0, min_rounds=6, warm_up=False)
    assert {name: len(v) for name, v in samples.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("bca"), list("cab")] * 2
    assert all(t >= 0 for v in samples.values() for t in v)
