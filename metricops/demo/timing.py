"""Timing the loss alone (forward+backward, interleaved rounds), its peak memory, and a training step."""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .losses import _PML, LossFn, LossSpec, _pml


# A contender whose estimated memory at a timed batch exceeds this is not run (and the table says why).
MEMORY_LIMIT_BYTES = 2 * 2**30
# The loss is "a real share" of a training step from this fraction on; below it the network dominates.
REAL_SHARE = 0.10
# interleaved_times: a contender whose call follows another's that took this many times its own last time (and
# at least SETTLE_MIN_SECONDS) makes SETTLE_CALLS untimed calls first.
SETTLE_AFTER_SLOWER = 2.0
SETTLE_MIN_SECONDS = 0.05
SETTLE_CALLS = 2


def format_bytes(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.0f} MiB"
    return "<1 MiB"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn: LossFn, e: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        e.grad = None
        loss = fn(e, y)
        loss.backward()
        return loss

    return run


def _cpu_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra memory of one call of `fn`: the CUDA allocator's peak, or on CPU the process's RSS peak.

    On Linux the RSS high-water mark is reset first (/proc/self/clear_refs) and every
    allocation above 128 KiB is made its own mapping (glibc mallopt), so freed memory
    goes back to the system and a later call's peak is not hidden by a reused heap.
    None where neither is available.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so large blocks are unmapped when freed
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _cpu_status_bytes("VmRSS")
        fn()
        return max(_cpu_status_bytes("VmHWM") - base, 0)
    except (OSError, AttributeError):
        return None


def interleaved_times(
    runs: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warm_up: bool = True,
) -> Dict[str, List[float]]:
    """Seconds per call of each run, taking turns (one call each per round), so that
    machine noise hits every contender alike; after one untimed call each unless `warm_up` is False
    (the caller has just run them). benchmarks/harness.py times its contenders with it too.

    Each round runs the contenders in its own order (a fixed-seed shuffle), so that no contender always runs
    right after the same other one: a call that follows one with large allocations pays for the pages the
    allocator handed back (measured: the same op timed 1.4× slower when always first after pytorch-metric-
    learning and a GEMM than when it ran second). Rotating the order is not enough: it keeps each contender's
    predecessor but once a round (the functional NT-Xent, always after the reference's 150 MiB and a GEMM,
    timed 1.2-1.4× its own drop-in, which it equals alone).

    A shuffle still leaves a few rounds (at least min_rounds, 5 where a contender takes seconds) unequal: a call
    right after one that took far longer pays for that one's freed pages (measured: GeneralizedLifted at
    B = 2048 took 22-31 ms right after the 3.6 s reference, which holds 6 GiB, 13-16 ms on the next call and
    12-14 from then on; the committed medians had the functional at 25 ms and its drop-in at 18). A lighter
    predecessor does it too: with the rule at 10× instead of 2×, the functional NT-Xent at B = 2048 (14 ms
    alone, as its drop-in) was timed at 20.5 ms and its drop-in at 15.4, the 95 ms reference (164 MiB) in
    their rounds. So a contender that follows a call of another lasting SETTLE_AFTER_SLOWER times its own
    last time, and at least SETTLE_MIN_SECONDS, first makes SETTLE_CALLS untimed calls: each contender is
    timed in its own steady state."""
    if warm_up:
        for fn in runs.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    rounds = 0
    order = list(runs.items())
    shuffle = random.Random(0).shuffle
    previous: Optional[Tuple[str, float]] = None  # (name, seconds) of the last timed call
    while runs and rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        this_round = order[:]
        shuffle(this_round)
        for name, fn in this_round:
            own = samples[name][-1] if samples[name] else 0.0
            if (
                previous is not None
                and previous[0] != name
                and previous[1] >= max(SETTLE_MIN_SECONDS, SETTLE_AFTER_SLOWER * own)
            ):
                for _ in range(SETTLE_CALLS):
                    fn()  # untimed: pays for the pages the slower call freed
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            elapsed = time.perf_counter() - t0
            samples[name].append(elapsed)
            previous = (name, elapsed)
        rounds += 1
    return samples


def speed_verdict(base: Sequence[float], other: Sequence[float]) -> Tuple[float, str]:
    """(ratio of medians other/base, words) from interleaved per-round samples.

    A speed-up or slow-down is claimed only when it holds in at least 9 of 10
    rounds (the 10th/90th percentiles of the per-round ratios are on the same
    side of 1); otherwise the words say the difference is within the noise.
    """
    ratio = statistics.median(other) / statistics.median(base)
    per_round = np.asarray(other) / np.asarray(base)
    lo, hi = np.percentile(per_round, [10, 90])
    if lo > 1.0:
        return ratio, f"{ratio:.1f}x slower" if ratio < 10 else f"{ratio:.0f}x slower"
    if hi < 1.0:
        return ratio, f"{1 / ratio:.1f}x faster"
    return ratio, "same within noise"


@dataclass
class TimingRow:
    batch: int
    library: str
    seconds: Optional[float] = None  # median of the interleaved rounds
    samples: Optional[List[float]] = None
    peak_bytes: Optional[int] = None
    verdict: str = ""  # against the trained contender, e.g. "36x slower"
    skipped: str = ""  # why it did not run


def _check_same_value(name: str, fn: LossFn, expected: Tuple[torch.Tensor, torch.Tensor], e, y) -> None:
    """Like for like: a contender must give the trained loss's value and gradient before it is timed.

    The value must agree to 1e-4 (relative; float32 sums in another order), and the gradient rows to
    1e-3 of the largest entry, except the rows of about one near-tie per 100 anchors: where two
    distances are equal to rounding, the libraries may pick different hardest partners, which moves
    three rows (the anchor's and both partners').
    """
    value = _fwd_bwd(fn, e, y)().detach()
    grad = e.grad.detach()
    row_err = (grad - expected[1]).abs().amax(dim=1)
    bad_rows = int((row_err > 1e-3 * expected[1].abs().max() + 1e-9).sum())
    if not torch.allclose(value, expected[0], rtol=1e-4, atol=1e-7) or bad_rows > 3 * max(1, len(y) // 100):
        raise AssertionError(
            f"{name} does not compute the trained loss: value {value.item():.6g} vs {expected[0].item():.6g}, "
            f"{bad_rows} of {len(y)} gradient rows differ"
        )


def time_losses(
    spec: LossSpec, batches: Dict[int, Tuple[torch.Tensor, torch.Tensor]], device: torch.device, budget_s: float
) -> List[TimingRow]:
    """The loss alone, forward+backward, per batch size: every contender that can run, interleaved."""
    rows: List[TimingRow] = []
    contenders = (spec.trained,) + spec.others
    for b, (emb, labels) in batches.items():
        e = emb.detach().clone().requires_grad_()
        runs: Dict[str, Callable[[], object]] = {}
        batch_rows = {c.library: TimingRow(b, c.library) for c in contenders}
        trained_fn = spec.trained.build()
        expected = _fwd_bwd(trained_fn, e, labels)().detach(), e.grad.detach().clone()
        runs[spec.trained.library] = _fwd_bwd(trained_fn, e, labels)
        for c in spec.others:
            need = c.bytes_needed(labels, e.shape[1])
            if c.library == _PML and _pml() is None:
                batch_rows[c.library].skipped = "not installed"
            elif need > MEMORY_LIMIT_BYTES:
                batch_rows[c.library].skipped = f"not run: needs ~{format_bytes(need)}"
            else:
                fn = c.build()
                _check_same_value(c.library, fn, expected, e, labels)
                runs[c.library] = _fwd_bwd(fn, e, labels)
        # Every contender has just run once (the value check): that was the warm-up.
        samples = interleaved_times(runs, device, budget_s=budget_s, warm_up=False)
        base = samples[spec.trained.library]
        for name, s in samples.items():
            row = batch_rows[name]
            row.samples, row.seconds = s, statistics.median(s)
            if name != spec.trained.library:
                row.verdict = speed_verdict(base, s)[1]
        # Memory after all timing: the allocator settings it changes would otherwise bias the times.
        for name, fn in runs.items():
            batch_rows[name].peak_bytes = peak_memory_bytes(fn, device)
        rows.extend(batch_rows.values())
        for lib, why in spec.missing:
            rows.append(TimingRow(b, lib, skipped=why))
    return rows


def _network_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, loss_fn: LossFn, y: torch.Tensor
) -> Callable[[], None]:
    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return run


def time_training_step(
    model: nn.Module,
    spec: LossSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_rows: List[TimingRow],
    device: torch.device,
    budget_s: float,
) -> Dict[str, object]:
    """What a training step at the demo's batch is made of, and the step per contender where the loss matters.

    The network part (forward, backward, Adam) is timed with a free stand-in loss; the
    loss part is the loss-alone median at this batch. Whole steps are timed (each
    contender training its own copy of the model) only if some contender's loss is at
    least REAL_SHARE of the step; otherwise the network dominates and comparing the
    steps would measure noise.
    """

    def copy_with_opt():
        m = copy.deepcopy(model)
        return m, torch.optim.Adam(m.parameters(), lr=lr)

    m, opt = copy_with_opt()
    network = statistics.median(
        interleaved_times(
            {"network": _network_step(m, opt, x, lambda e, _: e.square().mean(), y)},
            device,
            budget_s=budget_s / 2,
            min_rounds=3,
        )["network"]
    )
    here = [r for r in loss_rows if r.batch == len(y) and r.seconds is not None]
    loss_seconds = {r.library: r.seconds for r in here}
    shares = {lib: t / (network + t) for lib, t in loss_seconds.items()}
    out: Dict[str, object] = {
        "network_seconds": network,
        "loss_seconds": loss_seconds,
        "loss_share": shares,
        "steps": None,
    }
    if max(shares.values()) >= REAL_SHARE:
        builders = {c.library: c.build for c in (spec.trained,) + spec.others if c.library in shares}
        runs = {}
        for lib, build in builders.items():
            m, opt = copy_with_opt()
            runs[lib] = _network_step(m, opt, x, build(), y)
        out["steps"] = interleaved_times(runs, device, budget_s=budget_s, min_rounds=3)
    return out
