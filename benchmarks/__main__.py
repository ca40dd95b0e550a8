"""`python -m benchmarks [--quick] [--ops a,b] [--device cpu|cuda] [--json PATH]`."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .harness import format_table, time_case, write_json
from .suites import SUITES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/<device>-latest.json)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = parser.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(SUITES)}")
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    json_path = args.json or os.path.join(
        os.path.dirname(__file__), "results", f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-latest.json"
    )

    cases = []
    t0 = time.time()
    for op in ops:
        for case in SUITES[op](args.device, args.quick):
            time_case(
                case, args.device, budget_s=budget, min_rounds=3 if args.quick else 5, measure_memory=not args.no_memory
            )
            cases.append(case)
            print(f"  {case.op} {case.mode} {case.params} done", file=sys.stderr)
    print(format_table(cases))
    write_json(cases, args.device, json_path)
    print(f"\n{len(cases)} cases in {time.time() - t0:.0f} s; torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads. JSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
