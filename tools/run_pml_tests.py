"""Run pytorch-metric-learning's own tests for the classes metricops.pml replaces, with metricops.pml swapped in.

Usage (PML's repository is not part of this one; clone it anywhere outside it):

    .venv/bin/python tools/run_pml_tests.py /path/to/pytorch-metric-learning [extra pytest args]

The path is PML's checkout or its ``tests`` folder. PML's test files import
their classes from ``pytorch_metric_learning.{losses,miners,distances,reducers}``;
this file is also a pytest plugin (``-p run_pml_tests``) that assigns the
metricops.pml classes of the same names onto those modules before any test
module is imported, so the unchanged tests run against metricops.pml. Tests
run on CPU in float32 and float64 (PML's ``TEST_DEVICE``/``TEST_DTYPES``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILES = (
    "losses/test_triplet_margin_loss.py",
    "losses/test_contrastive_loss.py",
    "losses/test_proxy_anchor_loss.py",
    "losses/test_arcface_loss.py",
    "losses/test_cosface_loss.py",
    "miners/test_batch_hard_miner.py",
    "miners/test_triplet_margin_miner.py",
    "losses/test_ntxent_loss.py",
    "losses/test_multi_similarity_loss.py",
    "losses/test_circle_loss.py",
    "losses/test_lifted_structure_loss.py",
    "miners/test_multi_similarity_miner.py",
)
SUBMODULES = ("losses", "miners", "distances", "reducers")

swapped: list = []


def pytest_configure(config):
    """Swap before collection: PML's test modules bind the classes when they are imported."""
    import metricops.pml

    for sub in SUBMODULES:
        ours = getattr(metricops.pml, sub)
        theirs = importlib.import_module(f"pytorch_metric_learning.{sub}")
        for name in dir(ours):
            obj = getattr(ours, name)
            # defined in metricops.pml (some classes live in a private module and are re-exported)
            if isinstance(obj, type) and obj.__module__.startswith("metricops.pml") and hasattr(theirs, name):
                setattr(theirs, name, obj)
                swapped.append(f"{sub}.{name}")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"metricops.pml swapped in for pytorch_metric_learning: {', '.join(swapped)}")


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    tests = Path(argv[0]).resolve()
    if (tests / "tests").is_dir():
        tests = tests / "tests"
    missing = [f for f in TEST_FILES if not (tests / f).is_file()]
    if missing:
        print(f"{tests} lacks {', '.join(missing)}: give PML's checkout or its tests folder", file=sys.stderr)
        return 2
    env = dict(os.environ, TEST_DEVICE="cpu", TEST_DTYPES="float32,float64")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tools"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "run_pml_tests",
        "-p",
        "no:cacheprovider",
        "-q",
        "--rootdir",
        str(tests.parent),
        *[str(tests / f) for f in TEST_FILES],
        *argv[1:],
    ]
    # PML's tests/__init__.py puts "src" on sys.path: run beside tests/, where src/ is PML's own source
    # at most (the swap imports the installed package first, so that is the one patched and used).
    return subprocess.call(cmd, cwd=tests.parent, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
