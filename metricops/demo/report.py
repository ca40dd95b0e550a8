"""The demo's printed tables and its PNG figure."""

from __future__ import annotations

import statistics
from typing import Dict, List, Sequence

import numpy as np
import torch

from .data import PROTOCOLS, SHOWN_METRICS, Split
from .losses import LossSpec
from .timing import REAL_SHARE, TimingRow, format_bytes, speed_verdict


def _fmt_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms" if t >= 0.01 else f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} us"


def format_retrieval(results: Dict[str, Dict[str, Dict[str, float]]], split: Split) -> str:
    """results[column][protocol][metric], columns "raw pixels", "untrained net", "trained net"."""
    cols = list(results)
    lines = [f"{'':<10}" + "".join(f"{c:>15}" for c in cols)]
    for proto, title in PROTOCOLS.items():
        lines.append(f"{title} ({len(getattr(split, proto)[1])} images, each querying all the others):")
        for k in SHOWN_METRICS:
            lines.append(f"  {k:<8}" + "".join(f"{results[c][proto][k]:>15.3f}" for c in cols))
    return "\n".join(lines)


def retrieval_verdict(pixels: Dict[str, Dict[str, float]], trained: Dict[str, Dict[str, float]]) -> List[str]:
    """One line per protocol: where the learned embedding is ahead of raw pixels, and where not."""
    lines = []
    for proto, title in PROTOCOLS.items():
        ahead = [k for k in ("hit@1", "map@r") if trained[proto][k] > pixels[proto][k]]
        behind = [k for k in ("hit@1", "map@r") if k not in ahead]
        parts = [f"{k} {trained[proto][k]:.3f} vs {pixels[proto][k]:.3f}" for k in ahead + behind]
        what = ("ahead of raw pixels on " + " and ".join(ahead)) if ahead else "not ahead of raw pixels"
        if ahead and behind:
            what += ", behind on " + " and ".join(behind)
        lines.append(f"  {title}: trained net {what} ({'; '.join(parts)})")
    return lines


def format_timing(rows: List[TimingRow], spec: LossSpec) -> str:
    lines = [f"{'batch':<8} {'contender':<25} {'time':>10} {'vs ' + spec.trained.library:>20} {'peak mem':>10}"]
    for r in rows:
        if r.seconds is None:
            lines.append(f"B={r.batch:<6} {r.library:<25} {r.skipped}")
            continue
        lines.append(
            f"B={r.batch:<6} {r.library:<25} {_fmt_seconds(r.seconds):>10} {r.verdict:>20} "
            f"{format_bytes(r.peak_bytes):>10}"
        )
    lines.append("what each contender calls (each checked to give the same value and gradient before timing):")
    seen = set()
    for c in (spec.trained,) + spec.others:
        if c.library not in seen:
            seen.add(c.library)
            lines.append(f"  {c.library}: {c.recipe}")
    for lib, why in spec.missing:
        lines.append(f"  {lib}: {why}")
    return "\n".join(lines)


def summary(verdict: List[str], rows: List[TimingRow]) -> str:
    """The closing lines: the learned embedding against raw pixels, and the loss alone at the largest timed batch."""
    lines = ["summary:"] + verdict
    if rows:
        largest = max(r.batch for r in rows)
        cells = []
        for r in (r for r in rows if r.batch == largest):
            if r.seconds is None:
                cells.append(f"{r.library} {r.skipped}")
            else:
                vs = f" ({r.verdict})" if r.verdict else ""
                cells.append(f"{r.library} {_fmt_seconds(r.seconds)}{vs}, {format_bytes(r.peak_bytes)}")
        lines.append(f"  the loss alone at B={largest}: " + "; ".join(cells))
    return "\n".join(lines)


def format_step(step: Dict[str, object], batch: int, trained_library: str) -> str:
    network = step["network_seconds"]
    shares: Dict[str, float] = step["loss_share"]
    parts = ", ".join(f"{lib} {100 * s:.0f}%" if s >= 0.01 else f"{lib} <1%" for lib, s in shares.items())
    text = (
        f"training step at B={batch}: the network's forward, backward and Adam step take "
        f"{_fmt_seconds(network)}; the loss's share of a step: {parts}."
    )
    if step["steps"] is None:
        # A step's time is network + loss: switching implementations moves it by the difference of the losses.
        seconds = list(step["loss_seconds"].values())
        change = (max(seconds) - min(seconds)) / (network + min(seconds))
        return text + (
            f"\n  The network dominates (no loss reaches {100 * REAL_SHARE:.0f}% of the step): the choice "
            f"of loss implementation changes a step by at most {100 * change:.0f}%, so whole steps "
            "are not timed against each other."
        )
    steps: Dict[str, List[float]] = step["steps"]
    base = steps[trained_library]
    out = [text, "  whole training steps, interleaved:"]
    for lib, s in steps.items():
        verdict = "" if lib == trained_library else f"  ({speed_verdict(base, s)[1]})"
        out.append(f"    {lib:<25} {_fmt_seconds(statistics.median(s)):>10}{verdict}")
    return "\n".join(out)


def _timing_panel(ax, rows: List[TimingRow], loss_name: str) -> None:
    ran = [r.seconds for r in rows if r.seconds is not None]
    if not ran:
        ax.axis("off")
        ax.text(0.5, 0.5, "loss timing skipped", ha="center", va="center", transform=ax.transAxes)
        return
    batches = sorted({r.batch for r in rows})
    libs = list(dict.fromkeys(r.library for r in rows))
    width = 0.8 / len(libs)
    floor = min(ran) / 3
    for i, lib in enumerate(libs):
        labelled = False
        for j, b in enumerate(batches):
            r = next((r for r in rows if r.batch == b and r.library == lib), None)
            if r is None:
                continue
            xx = j + (i - (len(libs) - 1) / 2) * width
            if r.seconds is None:
                why = r.skipped.replace("not run: needs ", "needs ")
                ax.text(
                    xx,
                    floor * 1.1e3,
                    f"not run\n({why})" if len(why) < 20 else "not run",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=f"C{i}",
                )
                continue
            ax.bar(xx, r.seconds * 1e3, width, color=f"C{i}", label=None if labelled else lib)
            labelled = True
            words = f"\n{r.verdict}" if r.verdict else ""
            ax.text(
                xx,
                r.seconds * 1e3 * 1.15,
                f"{_fmt_seconds(r.seconds)}\n{format_bytes(r.peak_bytes)}{words}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_ylim(floor * 1e3, max(ran) * 1e3 * 30)
    ax.set_xticks(np.arange(len(batches)))
    ax.set_xticklabels([f"B={b}" for b in batches])
    ax.set_ylabel("ms, forward+backward (log scale)")
    ax.set_title(f"the loss alone ({loss_name}): median time, peak extra memory", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def save_figure(
    path: str,
    split: Split,
    emb: Dict[str, Dict[str, torch.Tensor]],
    losses: Sequence[float],
    loss_name: str,
    results: Dict[str, Dict[str, Dict[str, float]]],
    rows: List[TimingRow],
) -> None:
    # Figure + its own Agg canvas: no pyplot, so no GUI backend and no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    panels = (
        ("unseen", "untrained net", "unseen digits 5-9, untrained net"),
        ("unseen", "trained net", "unseen digits 5-9, trained net (zero-shot)"),
        ("held_out", "trained net", "held-out digits 0-4, trained net"),
    )
    for ax, (proto, col, title) in zip(axes[0], panels):
        # PCA to 2-D (t-SNE would be too slow for a demo), each projection fitted on its own embeddings.
        e = emb[col][proto].detach().cpu().double()
        e = e - e.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(e, full_matrices=False)
        p = (e @ v[:2].T).numpy()
        y = getattr(split, proto)[1].cpu().numpy()
        for c in np.unique(y):
            sel = y == c
            ax.scatter(p[sel, 0], p[sel, 1], s=4, alpha=0.6, label=str(c))
        ax.set_title(
            f"{title}\nmap@r {results[col][proto]['map@r']:.3f} "
            f"(raw pixels {results['raw pixels'][proto]['map@r']:.3f})",
            fontsize=10,
        )
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=3, fontsize=8, title="digit", loc="upper right", framealpha=0.8)

    ax = axes[1, 0]
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax.set_title(f"training loss ({loss_name}, digits 0-4)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")

    ax = axes[1, 1]
    cols = list(results)
    bars = [(proto, k) for proto in PROTOCOLS for k in ("hit@1", "map@r")]
    width = 0.8 / len(cols)
    colors = {"raw pixels": "0.6", "untrained net": "#9ecae1", "trained net": "#08519c"}
    for i, col in enumerate(cols):
        vals = [results[col][proto][k] for proto, k in bars]
        xs = np.arange(len(bars)) + (i - (len(cols) - 1) / 2) * width
        ax.bar(xs, vals, width, label=col, color=colors.get(col))
        for xx, v in zip(xs, vals):
            ax.text(xx, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(bars)))
    ax.set_xticklabels([f"{'held-out 0-4' if p == 'held_out' else 'unseen 5-9'}\n{k}" for p, k in bars], fontsize=9)
    ax.set_ylim(0, 1.1)
    ax.set_title("retrieval: each image queries all the others of its set", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")

    _timing_panel(axes[1, 2], rows, loss_name)
    # Fixed margins: tight_layout would lay the figure out twice (a second, at 2 cores).
    fig.subplots_adjust(left=0.045, right=0.99, top=0.93, bottom=0.07, wspace=0.2, hspace=0.33)
    fig.savefig(path, dpi=80)
