"""The end-to-end demo, the benchmark CLI's report, and the README's commands.

Everything runs in-process on the smallest settings (`--quick`, `--tiny`) so the
file stays well under a minute on a 2-core CPU.
"""

import json
import os
import re

import pytest

from benchmarks import __main__ as bench_cli
from metricops import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def _run_demo(tmp_path, *extra):
    return demo.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path), *extra])


@pytest.mark.parametrize("loss", demo.LOSSES)
def test_demo_quick_trains_and_improves_zero_shot_retrieval(tmp_path, loss, capsys):
    res = _run_demo(tmp_path, "--loss", loss, "--seed", "0")
    before, after = res["before"], res["after"]
    # Training on digits 0-4 must help retrieval on the unseen 5-9 (seeds 0-2 gain 0.044-0.17 map@r with every loss).
    assert after["map@r"] > before["map@r"] + 0.03, (before["map@r"], after["map@r"])
    for key in ("hit@1", "recall@1", "recall@5", "recall@10", "map@1", "map@5", "map@10", "map@r"):
        assert 0.0 <= after[key] <= 1.0
    assert after["num_queries"] == before["num_queries"] > 800  # every test image of digits 5-9 queries
    losses = res["losses"]
    assert len(losses) == 40 and all(l == l and l >= 0 for l in losses)  # no NaN
    assert res["step_times"]["metricops"] > 0 and res["step_times"]["reference"] > 0
    assert res["png"] == str(tmp_path / f"demo_{loss}.png") and _is_png(res["png"])
    out = capsys.readouterr().out
    assert "map@r" in out and "hit@1" in out and "raw pixels" in out
    assert re.search(r"metricops is \d+\.\d\dx (faster|slower)", out)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a = _run_demo(tmp_path, "--seed", "3", "--timing-steps", "0", "--batches-per-epoch", "5")
    b = _run_demo(tmp_path, "--seed", "3", "--timing-steps", "0", "--batches-per-epoch", "5")
    c = _run_demo(tmp_path, "--seed", "4", "--timing-steps", "0", "--batches-per-epoch", "5")
    assert a["losses"] == b["losses"] and a["after"] == b["after"]
    assert a["losses"] != c["losses"]
    assert a["step_times"] is None


def test_demo_balanced_batches_have_positives_and_negatives():
    import numpy as np

    labels = np.repeat(np.arange(5), [30, 31, 29, 40, 33])
    rng = np.random.default_rng(0)
    for batch in demo.balanced_batches(labels, 4, 7, 50, rng):
        counts = np.bincount(labels[batch], minlength=5)
        assert len(batch) == 28 and sorted(counts[counts > 0].tolist()) == [7, 7, 7, 7]
        assert len(set(batch.tolist())) == 28  # no image twice in a batch


def test_demo_rejects_batches_without_positives(tmp_path):
    with pytest.raises(SystemExit):
        _run_demo(tmp_path, "--batch-size", "5")  # 5 classes x 1 sample: no positive pairs


def test_benchmark_cli_writes_json_and_png(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    assert bench_cli.main(["--tiny", "--device", "cpu", "--json", str(json_path)]) == 0
    report = json.loads(json_path.read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["threads"] >= 1
    assert report["run"]["size"] == "tiny"
    rows = report["results"]
    assert {r["op"] for r in rows} >= {
        "pairwise_distance", "batch_hard_triplet_loss", "semihard_triplet_loss", "batch_all_triplet_loss",
        "triplet_margin_loss", "contrastive_loss", "knn",
    }
    for r in rows:
        assert set(r) >= {"op", "mode", "params", "seconds", "ratio_vs_metricops", "errors", "peak_bytes"}
        first = next(iter(r["seconds"]))
        assert first.startswith("metricops") and r["seconds"][first] > 0
        assert r["ratio_vs_metricops"][first] == pytest.approx(1.0)
        assert any(k in r["params"] for k in ("B", "N", "Q"))  # sizes are recorded
    png = tmp_path / "bench.png"  # default: next to the JSON
    assert _is_png(png) and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out


def test_benchmark_chart_series_are_speedups_against_size():
    from benchmarks.chart import _series

    rows = [
        {"op": "x", "mode": "forward", "params": {"B": b, "D": 8, "dtype": "float32"},
         "seconds": {"metricops": 1.0, "torch": 2.0 * b, "broken": None}}
        for b in (4, 2)
    ]
    series = _series(rows)
    assert dict(series[("x", "forward")]) == {"torch (D=8)": [(4.0, 8.0), (2.0, 4.0)]}


def _makefile_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", f.read(), flags=re.M))


def test_readme_commands_are_makefile_targets():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"```[a-z]*\n(.*?)```", readme, flags=re.S)
    assert block, "README has no code block"
    commands = re.findall(r"^\s*make\s+([A-Za-z0-9_.-]+)", block.group(1), flags=re.M)
    assert len(commands) >= 2, block.group(1)
    missing = set(commands) - _makefile_targets()
    assert not missing, f"README commands without a Makefile target: {missing}"


def test_make_demo_target_runs_the_demo():
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert "demo" in _makefile_targets()
    assert re.search(r"^demo:\s*build\s*\n\t\$\(PY\) -m metricops\.demo\b", makefile, flags=re.M)
