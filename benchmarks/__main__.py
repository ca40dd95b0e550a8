"""`python -m benchmarks [--quick] [--ops a,b] [--device cpu|cuda] [--json PATH] [--png PATH]`.

Times metricops against torch, plain torch, metricops.reference and other
libraries, side by side; prints a table, writes the results as JSON
(environment: device, torch version, threads; per case: sizes, median seconds,
ratios, and whether each contender's output equals metricops') and a PNG chart
of metricops' speed-up against each contender per op and batch size.
Exits with status 1 if a contender computed something else than metricops
(its ratio would not be a speed-up). `python -m benchmarks.readme_tables`
turns the JSON into the README's tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .chart import write_png
from .harness import format_table, measure_case_memory, time_case, to_json
from .suites import SUITES


def _case_key(row: dict) -> tuple:
    return row["op"], row["mode"], json.dumps(row["params"], sort_keys=True)


def merge_reports(json_path: str, new: dict) -> dict:
    """`new` merged into the report at json_path: its rows replace rows of the same case and join the others.
    Ratios are within a case (contenders timed side by side in one run), so two runs on the same machine and
    software combine; anything else is refused rather than mixed."""
    with open(json_path) as f:
        old = json.load(f)
    same = ("device", "cpu", "cpu_capability", "threads", "torch", "python", "metricops", "libraries")
    differing = [k for k in same if old["environment"].get(k) != new["environment"].get(k)]
    if differing or old.get("run", {}).get("size") != new["run"]["size"]:
        raise SystemExit(f"--merge: {json_path} comes from another environment or size ({differing or 'size'})")
    replaced = {_case_key(r) for r in new["results"]}
    runs = old["run"].get("runs", [dict(old["run"], time=old["environment"].get("time"))])
    merged = dict(new)
    merged["results"] = [r for r in old["results"] if _case_key(r) not in replaced] + new["results"]
    merged["run"] = dict(
        new["run"],
        ops=list(dict.fromkeys(old["run"].get("ops", []) + new["run"]["ops"])),
        seconds=round(sum(r.get("seconds", 0) for r in runs) + new["run"]["seconds"], 1),
        runs=runs + [dict(new["run"], time=new["environment"].get("time"))],
    )
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, short timing (about a minute on a 2-core CPU); "
        "default JSON benchmarks/results/<device>-quick.tmp.json (git-ignored)",
    )
    # Hidden: the smallest sizes and a single timed round, for the CLI's own test.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--json", default=None, help="where to write the results (default benchmarks/results/<device>-latest.json)"
    )
    parser.add_argument(
        "--png", default=None, help="where to draw the speed-up chart (default: the JSON path with .png)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's cases to the existing JSON instead of replacing it (a case measured again replaces its "
        "old row); refused unless both runs share the environment (device, torch, threads, libraries) and size",
    )
    args = parser.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(SUITES)}")
    if args.tiny:
        args.quick = True
    size = "tiny" if args.tiny else ("quick" if args.quick else "full")
    budget = args.budget if args.budget is not None else {"tiny": 0.0, "quick": 0.5, "full": 3.0}[size]
    min_rounds = {"tiny": 1, "quick": 3, "full": 5}[size]
    # Quick runs go to a git-ignored file so they never overwrite the committed full-size results.
    stem = f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-{'quick.tmp' if args.quick else 'latest'}"
    json_path = args.json or os.path.join(os.path.dirname(__file__), "results", f"{stem}.json")
    png_path = args.png or os.path.splitext(json_path)[0] + ".png"

    cases = []
    t0 = time.time()
    for op in ops:
        for case in SUITES[op](args.device, size if args.quick else False):
            time_case(case, args.device, budget_s=budget, min_rounds=min_rounds)
            cases.append(case)
            print(f"  {case.op} {case.mode} {case.params} done", file=sys.stderr)
    if not args.no_memory:
        # After all timing: the memory meter changes the allocator's policy.
        for case in cases:
            measure_case_memory(case, args.device)
        print("  peak memory measured", file=sys.stderr)
    print(format_table(cases))
    report = to_json(cases, args.device)
    report["run"] = {
        "size": size,
        "ops": ops,
        "budget_s": budget,
        "min_rounds": min_rounds,
        "memory": not args.no_memory,
        "seconds": round(time.time() - t0, 1),
    }
    if args.merge:
        report = merge_reports(json_path, report)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    write_png(report, png_path)
    print(
        f"\n{len(cases)} cases in {time.time() - t0:.0f} s; torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads.\nJSON: {json_path}\nPNG:  {png_path}"
    )
    differing = [f"{c.op} {c.params}: {n}" for c in cases for n in c.disagreeing()]
    if differing:
        print(
            "\nThese contenders' outputs differ from metricops' (their ratios compare different work):\n  "
            + "\n  ".join(differing),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
