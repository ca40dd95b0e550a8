"""`python -m benchmarks --merge`: a suite run again joins the committed results only from the same environment
and size, and a case measured again replaces its old row."""

import json

import pytest

from benchmarks.__main__ import merge_reports


def _report(rows, threads=2, size="full", seconds=10.0, time="2026-11-30T12:00:00Z", **cpu):
    env = {"device": "cpu", "cpu": "Intel Xeon", "cpu_capability": "AVX512", "threads": threads}
    env.update(cpu, torch="2.14.1", python="3.11.7")
    env.update(metricops="0.1.0", libraries={"pytorch-metric-learning": "2.9.0"}, time=time)
    results = [{"op": op, "mode": "forward", "params": {"B": b}, "seconds": {"metricops": s}} for op, b, s in rows]
    return {"environment": env, "results": results, "run": {"size": size, "ops": ["x"], "seconds": seconds}}


def test_merge_keeps_old_cases_and_replaces_remeasured_ones(tmp_path):
    path = tmp_path / "cpu-latest.json"
    path.write_text(json.dumps(_report([("a", 1, 1.0), ("b", 1, 2.0)])))
    new = _report([("b", 1, 3.0), ("c", 4, 5.0)], seconds=5.0, time="2026-11-30T13:00:00Z")
    new["run"]["ops"] = ["y"]
    merged = merge_reports(str(path), new)
    got = {(r["op"], r["params"]["B"]): r["seconds"]["metricops"] for r in merged["results"]}
    assert got == {("a", 1): 1.0, ("b", 1): 3.0, ("c", 4): 5.0}
    assert merged["run"]["ops"] == ["x", "y"] and merged["run"]["seconds"] == 15.0
    assert [r["time"] for r in merged["run"]["runs"]] == ["2026-11-30T12:00:00Z", "2026-11-30T13:00:00Z"]
    # the README's header names each suite's run, not "one run"
    from benchmarks.readme_tables import _runs_phrase

    assert _runs_phrase(merged) == (
        "2 runs on the same machine and libraries (x: 2026-11-30 12:00 UTC; y: 2026-11-30 13:00 UTC; each row's "
        "ratios from one run)"
    )
    assert _runs_phrase(new) == "one run on 2026-11-30"


# Two x86_64 CPUs of another model or vector ISA time the same code differently (harness.environment): one of
# them is "another environment" as much as another thread count is.
@pytest.mark.parametrize("change", [{"threads": 1}, {"size": "quick"}, {"cpu": "AMD EPYC"}, {"cpu_capability": "AVX2"}])
def test_merge_refuses_another_environment_or_size(tmp_path, change):
    path = tmp_path / "cpu-latest.json"
    path.write_text(json.dumps(_report([("a", 1, 1.0)])))
    with pytest.raises(SystemExit, match="another environment or size"):
        merge_reports(str(path), _report([("b", 1, 1.0)], **change))
