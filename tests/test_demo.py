"""The end-to-end demo, the benchmark CLI's report, and the README's commands.

Everything runs in-process on the smallest settings (`--quick`, `--tiny`) so the
file stays well under 30 s on a 2-core CPU.
"""

import contextlib
import gc
import io
import json
import os
import re
import time

import numpy as np
import pytest
import torch

from benchmarks import __main__ as bench_cli
from metricops import demo
import metricops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    # As the demo runs by default (--threads 1): on the shared 2-core machine two threads waiting on each
    # other make these small calls many times slower whenever other processes are busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def _run_demo(out_dir, *extra):
    return demo.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(out_dir), *extra])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`--quick --seed 0` once for the module: (its result, what it printed)."""
    out_dir = tmp_path_factory.mktemp("demo")
    before = torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            res = _run_demo(out_dir, "--seed", "0")
    finally:
        torch.set_num_threads(before)
    return res, printed.getvalue(), out_dir


def test_demo_quick_beats_raw_pixels_and_prints_the_loss_timing_table(quick_run):
    res, out, out_dir = quick_run
    pixels, untrained, trained = (res["results"][k] for k in ("raw pixels", "untrained net", "trained net"))
    # What the demo must show: ahead of raw pixels on map@r in both protocols, and on hit@1 for held-out images
    # of the training classes (quick mode, seed 0: 0.966 vs 0.956 hit@1, 0.82 vs 0.49 and 0.43 vs 0.37 map@r).
    assert trained["held_out"]["hit@1"] > pixels["held_out"]["hit@1"]
    assert trained["held_out"]["map@r"] > pixels["held_out"]["map@r"] + 0.2
    assert trained["unseen"]["map@r"] > pixels["unseen"]["map@r"] + 0.03
    for proto in demo.PROTOCOLS:  # and training did it, not the architecture
        assert trained[proto]["map@r"] > untrained[proto]["map@r"] + 0.1
    assert trained["held_out"]["num_queries"] == 500 and trained["unseen"]["num_queries"] == 2500
    assert len(res["losses"]) == 40 and all(np.isfinite(res["losses"]))

    assert "held-out images of the training digits 0-4" in out and "unseen digits 5-9 (zero-shot transfer)" in out
    assert "trained net ahead of raw pixels on hit@1 and map@r" in out  # the held-out verdict line
    # The loss-timing table: every contender at the training batch and at the large batch.
    assert re.search(r"^batch +contender +time +vs metricops +peak mem$", out, flags=re.M)
    for b in (100, 256):
        for lib in ("metricops", "metricops.reference", "pytorch-metric-learning"):
            assert re.search(rf"^B={b} +{re.escape(lib)} +\d+(\.\d+)? (us|ms|s)\b", out, flags=re.M), (b, lib)
    assert re.search(
        r"^B=100 +pytorch-metric-learning .*(x slower|x faster|same within noise) +(<1 MiB|\d+ MiB)", out, flags=re.M
    )
    assert "miners.BatchHardMiner() + losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer())" in out
    assert "training step at B=100" in out
    rows = res["timing"]
    assert {(r.batch, r.library) for r in rows} == {
        (b, lib) for b in (100, 256) for lib in ("metricops", "metricops.reference", "pytorch-metric-learning")
    }
    assert all(r.seconds > 0 and len(r.samples) >= 5 and r.peak_bytes is not None for r in rows)
    assert res["png"] == str(out_dir / "demo_batch_hard.png") and _is_png(res["png"])
    assert os.path.getsize(res["png"]) > 50_000


def test_demo_is_deterministic_for_a_seed(quick_run, tmp_path):
    a = quick_run[0]
    b = _run_demo(tmp_path, "--seed", "0", "--timing-batches", "--no-png")  # the same run, no timing, no PNG
    assert b["losses"] == a["losses"] and b["results"] == a["results"]
    assert b["timing"] == [] and b["step"] is None and b["png"] is None and not os.listdir(tmp_path)
    c = _run_demo(tmp_path, "--seed", "1", "--timing-batches", "--no-png", "--epochs", "1", "--batches-per-epoch", "1")
    assert c["losses"][0] != a["losses"][0]  # another initialization and another first batch


def _small_real_batch(per_class=8):
    split = demo.load_split(torch.device("cpu"))
    x, y = split.train
    idx = next(demo.balanced_batches(y.numpy(), 5, per_class, 1, np.random.default_rng(0)))
    return x[idx], y[idx]


@pytest.mark.parametrize("name", list(demo.LOSSES))
def test_every_loss_trains_and_its_contenders_compute_the_same_value(name):
    spec = demo.LOSSES[name]
    x, y = _small_real_batch()
    torch.manual_seed(0)
    model = demo.EmbeddingNet()
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=3)
    losses = demo.train(
        model,
        spec.trained.build(),
        opt,
        sched,
        *demo.load_split(torch.device("cpu")).train,
        epochs=1,
        batches_per_epoch=3,
        classes_per_batch=5,
        per_class=8,
        rng=np.random.default_rng(0),
        progress=False,
    )
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(v >= 0 for v in losses)
    # time_losses checks every contender's value and gradient against the trained loss before timing it.
    rows = demo.time_losses(spec, {40: (demo.embed(model, x), y)}, torch.device("cpu"), budget_s=0.0)
    libs = [r.library for r in rows]
    assert libs[0] == spec.trained.library and len(libs) == len(set(libs)) == 1 + len(spec.others) + len(spec.missing)
    for r in rows:
        assert (r.seconds is not None) != bool(r.skipped)  # ran, or says why not
    assert any(r.library == "pytorch-metric-learning" for r in rows)  # run, or named as missing with a reason


def test_a_contender_computing_another_loss_is_refused_before_timing():
    x, y = _small_real_batch()
    e = torch.nn.functional.normalize(torch.randn(len(y), 16, generator=torch.Generator().manual_seed(0)), dim=1)
    spec = demo.LOSSES["batch_hard"]
    wrong_margin = demo.Contender(
        "metricops.reference",
        lambda: lambda a, b: metricops.reference.batch_hard_triplet_loss(a, b, margin=0.3, normalize=True),
        "margin 0.3",
    )
    bad = demo.LossSpec("test", lr=1e-3, trained=spec.trained, others=(wrong_margin,))
    with pytest.raises(AssertionError, match="metricops.reference does not compute the trained loss"):
        demo.time_losses(bad, {len(y): (e, y)}, torch.device("cpu"), budget_s=0.0)


def test_a_contender_too_large_for_memory_is_reported_not_run(monkeypatch):
    y = torch.arange(4096) % 10
    spec = demo.LOSSES["batch_all"]
    need = {c.library: c.bytes_needed(y, 64) for c in spec.others}
    # At B=4096: (B, B, B) terms, and every triplet as indices: far beyond the limit.
    assert need["metricops.reference"] > 100 * 2**30 and need["pytorch-metric-learning"] > 10 * 2**30
    assert need["pytorch-metric-learning"] > demo.timing.MEMORY_LIMIT_BYTES
    x, y = _small_real_batch()
    e = torch.nn.functional.normalize(torch.randn(len(y), 64, generator=torch.Generator().manual_seed(0)), dim=1)
    # The same decision at a small batch, with a limit between the two contenders' needs.
    need = {c.library: c.bytes_needed(y, 64) for c in spec.others}
    monkeypatch.setattr(
        demo.timing, "MEMORY_LIMIT_BYTES", (need["pytorch-metric-learning"] + need["metricops.reference"]) / 2
    )
    assert need["pytorch-metric-learning"] < demo.timing.MEMORY_LIMIT_BYTES < need["metricops.reference"]
    rows = demo.time_losses(spec, {len(y): (e, y)}, torch.device("cpu"), budget_s=0.0)
    skipped = {r.library: r.skipped for r in rows if r.seconds is None}
    assert set(skipped) == {"metricops.reference"}
    assert re.fullmatch(r"not run: needs ~\d+ MiB", skipped["metricops.reference"]), skipped
    assert "not run: needs" in demo.format_timing(rows, spec)


def test_speed_verdict_claims_only_what_the_rounds_support():
    base = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.95, 1.05, 1.0, 1.1]
    assert demo.speed_verdict(base, [2 * t for t in base]) == (pytest.approx(2.0), "2.0x slower")
    assert demo.speed_verdict(base, [t / 4 for t in base]) == (pytest.approx(0.25), "4.0x faster")
    assert demo.speed_verdict(base, [50 * t for t in base])[1] == "50x slower"
    # Medians 10% apart, but the other is faster in some rounds and slower in others: no claim.
    noisy = [1.5, 0.8, 1.3, 0.9, 1.4, 1.1, 1.2, 0.85, 1.1, 1.25]
    assert demo.speed_verdict(base, noisy)[1] == "same within noise"


def test_whole_training_steps_are_compared_only_where_the_loss_is_a_real_share():
    x, y = _small_real_batch()
    model = demo.EmbeddingNet()
    spec = demo.LOSSES["batch_hard"]
    fast = [demo.TimingRow(len(y), "metricops", seconds=1e-6)]
    step = demo.time_training_step(model, spec, x, y, 1e-3, fast, torch.device("cpu"), budget_s=0.0)
    assert step["steps"] is None and step["network_seconds"] > 0
    assert "The network dominates" in demo.format_step(step, len(y), "metricops")

    def slow_same_loss(e, labels):  # the trained loss, plus a wait that makes it most of the step
        time.sleep(0.05)
        return metricops.batch_hard_triplet_loss(e, labels, margin=demo.MARGIN, normalize=True)

    slow_spec = demo.LossSpec(
        "test", lr=1e-3, trained=spec.trained, others=(demo.Contender("slow", lambda: slow_same_loss, "sleeps"),)
    )
    slow = fast + [demo.TimingRow(len(y), "slow", seconds=0.05)]
    step = demo.time_training_step(model, slow_spec, x, y, 1e-3, slow, torch.device("cpu"), budget_s=0.0)
    assert set(step["steps"]) == {"metricops", "slow"} and step["loss_share"]["slow"] > 0.1
    text = demo.format_step(step, len(y), "metricops")
    assert "whole training steps, interleaved" in text and re.search(r"slow +\d+(\.\d+)? ms +\(\d+\.\dx slower\)", text)


def test_demo_split_is_fixed_disjoint_and_has_unseen_classes():
    split = demo.load_split(torch.device("cpu"))
    (xt, yt), (xh, yh), (xu, yu) = split.train, split.held_out, split.unseen
    assert xt.shape == (2000, 784) and xh.shape == (500, 784) and xu.shape == (2500, 784)
    assert 0.0 <= float(xt.min()) and float(xt.max()) == 1.0
    assert set(yt.tolist()) == set(yh.tolist()) == set(demo.TRAIN_CLASSES)
    assert set(yu.tolist()) == set(demo.UNSEEN_CLASSES)
    assert np.bincount(yh.numpy()).tolist() == [100] * 5
    rows = lambda x: {r.numpy().tobytes() for r in x}  # noqa: E731
    assert not rows(xh) & rows(xt)  # no held-out image is trained on (the 5,000 images are distinct)


def test_demo_balanced_batches_have_positives_and_negatives():
    labels = np.repeat(np.arange(5), [30, 31, 29, 40, 33])
    rng = np.random.default_rng(0)
    for batch in demo.balanced_batches(labels, 4, 7, 50, rng):
        counts = np.bincount(labels[batch], minlength=5)
        assert len(batch) == 28 and sorted(counts[counts > 0].tolist()) == [7, 7, 7, 7]
        assert len(set(batch.tolist())) == 28  # no image twice in a batch


def test_demo_rejects_batches_without_positives(tmp_path):
    with pytest.raises(SystemExit, match="at least 2 samples per class"):
        _run_demo(tmp_path, "--batch-size", "5")  # 5 classes x 1 sample: no positive pairs


def test_benchmark_cli_writes_json_and_png(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    # The CLI itself, on the suites of the first ops (every suite's tiny cases run in test_benchmark_contenders).
    ops = "pairwise_distance,triplet,triplet_margin_loss,contrastive_loss,knn,scale"
    # The memory pass calls gc.collect() per contender: in this late-suite process (compiled graphs of earlier
    # tests) each full collection takes seconds, so the earlier tests' objects are frozen out of it.
    gc.freeze()
    try:
        assert bench_cli.main(["--tiny", "--ops", ops, "--device", "cpu", "--json", str(json_path)]) == 0
    finally:
        gc.unfreeze()
    report = json.loads(json_path.read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["threads"] >= 1
    assert report["run"]["size"] == "tiny"
    rows = report["results"]
    assert {r["op"] for r in rows} >= {
        "pairwise_distance",
        "batch_hard_triplet_loss",
        "semihard_triplet_loss",
        "batch_all_triplet_loss",
        "triplet_margin_loss",
        "contrastive_loss",
        "knn",
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
        {
            "op": "x",
            "mode": "forward",
            "params": {"B": b, "D": 8, "dtype": "float32"},
            "seconds": {"metricops": 1.0, "torch": 2.0 * b, "broken": None},
        }
        for b in (4, 2)
    ]
    series = _series(rows)
    assert dict(series[("x", "forward")]) == {"torch (D=8)": [(4.0, 8.0), (2.0, 4.0)]}


def _readme_demo_output():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    m = re.search(r"<!-- demo output begin -->\n```text\n(.*?)```\n<!-- demo output end -->", readme, flags=re.S)
    assert m, "README's demo section has no pasted output between the demo output markers"
    return readme, m.group(1)


def test_readme_shows_the_demo_output_its_ratios_match_its_times_and_the_picture_exists():
    readme, out = _readme_demo_output()
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    rows = re.findall(
        r"^B=(\d+) +(\S+) +(\d+(?:\.\d+)?) (us|ms|s) +(?:(\d+(?:\.\d+)?)x (slower|faster))?", out, flags=re.M
    )
    base = {b: float(t) * unit[u] for b, lib, t, u, _, _ in rows if lib == "metricops"}
    assert set(base) == {"100", "4096"}
    checked = 0
    for b, lib, t, u, ratio, word in rows:
        if ratio:  # times carry 3 digits, the ratio 2: allow the printed roundings
            seconds = float(t) * unit[u]
            actual = seconds / base[b] if word == "slower" else base[b] / seconds
            assert float(ratio) == pytest.approx(actual, rel=0.03), (b, lib, t, u, ratio, word)
            checked += 1
    assert checked >= 3
    # The same claim, as the README's pasted run states it.
    assert "held-out images of the training digits 0-4: trained net ahead of raw pixels on hit@1 and map@r" in out
    assert "unseen digits 5-9 (zero-shot transfer): trained net ahead of raw pixels on map@r" in out
    picture = re.search(r"!\[[^]]*\]\((docs/demo_[a-z_]+\.png)\)", readme)
    assert picture and _is_png(os.path.join(ROOT, picture.group(1)))


def _makefile():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return f.read()


def _makefile_targets():
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", _makefile(), flags=re.M))


def test_readme_commands_are_makefile_targets():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"```[a-z]*\n(.*?)```", readme, flags=re.S)
    assert block, "README has no code block"
    commands = re.findall(r"^\s*make\s+([A-Za-z0-9_.-]+)", block.group(1), flags=re.M)
    assert len(commands) >= 2, block.group(1)
    missing = set(commands) - _makefile_targets()
    assert not missing, f"README commands without a Makefile target: {missing}"


def _recipe(target):
    m = re.search(rf"^{re.escape(target)}\s*:[^\n]*\n((?:\t[^\n]*\n)+)", _makefile(), flags=re.M)
    assert m, f"no recipe for {target}"
    return m.group(1)


def test_make_demo_runs_the_demo_and_says_what_the_slow_steps_are_doing():
    assert re.search(r"^\t\$\(PY\) -m metricops\.demo\b", _recipe("demo"), flags=re.M)
    # A fresh clone's first `make demo` installs torch and compiles the kernels for minutes: each step first
    # says what it is doing and about how long it takes, and nothing hides pip's or ninja's progress.
    for target, step, words in (
        ("$(STAMP)", "-m pip install", "torch"),
        ("build", "setup.py", "compiling"),
        ("demo", "-m metricops.demo", "demo"),
    ):
        recipe = _recipe(target)
        said = "".join(re.findall(r"^\t@echo (.*)$", recipe[: recipe.index(step)], flags=re.M))
        assert words in said and re.search(r"~\d+(-\d+)? (min|s)\b", said), (target, said)
    assert not re.search(r"pip install[^\n]* -q", _recipe("$(STAMP)"))
