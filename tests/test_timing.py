"""The interleaved timing loop every benchmark and the demo use (metricops.demo.timing.interleaved_times)."""

import torch

from metricops.demo.timing import interleaved_times


def test_rounds_vary_which_contender_runs_after_which():
    """Each round runs every contender once, in its own (seeded, reproducible) order, so that over the rounds
    each contender follows each of the others and none always comes right after the same one (a call that
    follows large allocations pays for them)."""
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    samples = interleaved_times(runs, torch.device("cpu"), budget_s=0.0, min_rounds=40, max_rounds=40, warm_up=False)
    assert {name: len(v) for name, v in samples.items()} == {name: 40 for name in "abcd"}
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    predecessors = {name: set() for name in "abcd"}
    for before, after in zip(calls, calls[1:]):
        predecessors[after].add(before)
    assert all(predecessors[name] >= set("abcd") - {name} for name in "abcd")
    for name in "abcd":  # no single predecessor follows more than 60% of the time
        follows = [before for before, after in zip(calls, calls[1:]) if after == name and before != name]
        assert max(follows.count(b) for b in set(follows)) <= 0.6 * len(follows)
    calls.clear()
    interleaved_times(runs, torch.device("cpu"), budget_s=0.0, min_rounds=40, max_rounds=40, warm_up=False)
    assert [calls[i : i + 4] for i in range(0, len(calls), 4)] == rounds  # the same orders: reproducible
    assert all(t >= 0 for v in samples.values() for t in v)
