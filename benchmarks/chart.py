"""Speed-up chart of a benchmark run: metricops vs each other contender, per op, against batch size.

`python -m benchmarks` writes it next to its JSON; `python -m benchmarks.chart RESULTS.json [OUT.png]`
redraws it from a saved JSON (e.g. the committed full-size results).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

# The size each op scales with, in order of preference: batch size B for the
# losses and distances, N for explicit triplets, the database size for knn.
SIZE_KEYS = ("B", "N", "Q")
# Parameters that never distinguish two lines of the same op (same for all cases).
_QUIET = {"dtype", "metric"}


def size_key(params: Dict[str, object]) -> str:
    for k in SIZE_KEYS:
        if k in params:
            return k
    return ""


def _series(results: List[dict]) -> Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]]:
    """(op, mode) -> line label -> [(size, speed-up)], speed-up = contender time / metricops time.

    Only contenders that compute the same thing: yardsticks (e.g. one GEMM)
    and contenders whose output differed from metricops' are left out.
    """
    panels: Dict[Tuple[str, str], Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in results:
        params = row["params"]
        key = size_key(params)
        names = list(row["seconds"])
        base = row["seconds"].get(names[0]) if names else None
        if not key or not base:
            continue
        # Other varying sizes (D, swap, N for knn) go into the line's label.
        extra = ", ".join(f"{k}={v}" for k, v in params.items() if k != key and k not in _QUIET)
        other_work = set(row.get("yardsticks", ()))
        other_work |= {n for n, a in row.get("agreement", {}).items() if not a["agrees"]}
        for name in names[1:]:
            t = row["seconds"].get(name)
            if t is None or name in other_work:  # failed, skipped or not the same work: no point
                continue
            label = f"{name} ({extra})" if extra else name
            panels[(row["op"], row["mode"])][label].append((float(params[key]), t / base))
    return panels


def write_png(report: dict, path: str) -> str:
    """Draw `report` (the dict harness.to_json returns) as a grid of log-log panels; returns `path`."""
    # Figure with its own Agg canvas: no pyplot, no GUI backend, no global state touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = _series(report.get("results", []))
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.4 * cols, 5.2 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    sizes_of = {(r["op"], r["mode"]): size_key(r["params"]) for r in report.get("results", [])}
    for ax, ((op, mode), lines) in zip(axes, sorted(panels.items())):
        ys = [1.0]
        for label, pts in sorted(lines.items()):
            pts.sort()
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            for x, y in pts:  # the number itself, so the chart reads without squinting at a log axis
                ax.annotate(
                    f"{y:.2g}x", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=line.get_color()
                )
            ys += [p[1] for p in pts]
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(min(ys) / 1.6, max(ys) * 1.6)  # room for the labels, and 1x always in view
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        xs = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xlim(xs[0] / 1.5, xs[-1] * 1.5)
        ax.set_title(f"{op} ({mode})", fontsize=10)
        ax.set_xlabel(sizes_of.get((op, mode), "size"))
        ax.set_ylabel("speed-up of metricops (x)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), frameon=False)
    env = report.get("environment", {})
    fig.suptitle(
        "metricops speed-up vs each contender (>1: metricops faster); "
        f"device {env.get('gpu') or env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"{env.get('threads', '?')} threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    with open(argv[0]) as f:
        report = json.load(f)
    out = argv[1] if len(argv) == 2 else os.path.splitext(argv[0])[0] + ".png"
    print(write_png(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
