"""The interleaved timing loop every benchmark and the demo use (metricops.demo.timing.interleaved_times)."""

import time

import torch

from metricops.demo.timing import SETTLE_CALLS, interleaved_times


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


def test_a_call_after_a_much_slower_one_is_preceded_by_an_untimed_call():
    """A contender that comes right after one far slower (here: 60 ms against nothing) first makes untimed
    calls, so that its timed call does not pay for the slower one's freed pages: here its call right after the
    slow one takes 20 ms more, and none of its timed calls may."""
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.06)

    def fast():
        if calls and calls[-1] == "slow":
            time.sleep(0.02)  # the pages the slow call freed
        calls.append("fast")

    samples = interleaved_times(
        {"slow": slow, "fast": fast}, torch.device("cpu"), budget_s=0.0, min_rounds=8, max_rounds=8, warm_up=False
    )
    assert [len(samples["slow"]), len(samples["fast"])] == [8, 8]
    after_slow = sum(1 for before, after in zip(calls, calls[1:]) if (before, after) == ("slow", "fast"))
    assert after_slow >= 2  # the seeded orders put fast right after slow this often
    assert calls.count("fast") == 8 + SETTLE_CALLS * after_slow  # the untimed calls
    assert calls.count("slow") == 8  # never settles: nothing before it is slower
    assert max(samples["fast"]) < 0.01
