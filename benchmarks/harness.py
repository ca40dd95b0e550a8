"""Timing harness: contenders for one case are timed interleaved, in one run.

Machines here are noisy, so every contender of a case is timed in the same
round-robin loop (one call of each per round) and the median per contender is
reported; ratios are against the first contender (metricops).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    op: str  # e.g. "pairwise_distance"
    mode: str  # "forward" or "forward+backward"
    params: Dict[str, object]  # sizes etc.
    contenders: Dict[str, Callable[[], object]]  # name -> zero-arg callable; first is metricops
    results: Dict[str, Optional[float]] = field(default_factory=dict)  # name -> median seconds (None: failed)
    errors: Dict[str, str] = field(default_factory=dict)
    peak_bytes: Dict[str, Optional[int]] = field(default_factory=dict)


def _release_freed_cpu_memory() -> None:
    """Make RSS track live memory: glibc otherwise keeps freed blocks mapped.

    A fixed mmap threshold sends every allocation above 128 KiB to its own
    mapping, returned to the OS when freed (glibc's default threshold grows
    after frees, and freed heap memory then hides later peaks from RSS).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS is then a rougher bound
        pass


class PeakMemory:
    """Peak extra memory of one call: CUDA allocator stats, or sampled RSS on CPU.

    On CPU a thread samples the process RSS every ~0.2 ms while the call runs,
    so the value is a lower bound on the true peak (short spikes can be missed).
    """

    def __init__(self, device: str):
        self.device = device

    def measure(self, fn: Callable[[], object]) -> int:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        import threading

        _release_freed_cpu_memory()
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        base = rss()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.0002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], rss()) - base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(
    case: Case,
    device: str,
    *,
    min_rounds: int = 5,
    max_rounds: int = 50,
    budget_s: float = 3.0,
    measure_memory: bool = False,
) -> Case:
    alive = dict(case.contenders)
    # Warm-up (and weed out contenders that fail, e.g. out of memory).
    for name, fn in list(alive.items()):
        try:
            fn()
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            case.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            case.results[name] = None
            del alive[name]
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    samples: Dict[str, List[float]] = {n: [] for n in alive}
    start = time.perf_counter()
    rounds = 0
    while alive and rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in alive.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    for name, s in samples.items():
        case.results[name] = statistics.median(s)
    if measure_memory:
        measure_case_memory(case, device)
    return case


def measure_case_memory(case: Case, device: str) -> Case:
    """Peak extra memory of one call of each contender that ran.

    On CPU this changes glibc's allocation policy for the rest of the process
    (see _release_freed_cpu_memory), so run it after all timing is done.
    """
    meter = PeakMemory(device)
    for name, fn in case.contenders.items():
        if case.results.get(name) is not None:
            case.peak_bytes[name] = meter.measure(fn)
    return case


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import metricops

        env["metricops"] = metricops.__version__
    except Exception:  # pragma: no cover
        pass
    return env


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "fail"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} us"


def _fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return ""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.0f} MiB"


def format_table(cases: List[Case]) -> str:
    lines = []
    header = (
        f"{'op':<28} {'mode':<17} {'sizes':<30} {'contender':<24} {'time':>10} {'x metricops':>12} {'peak mem':>10}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for case in cases:
        names = list(case.contenders)
        base = case.results.get(names[0])
        sizes = " ".join(f"{k}={v}" for k, v in case.params.items())
        for i, name in enumerate(names):
            t = case.results.get(name)
            ratio = "" if i == 0 or t is None or base is None else f"{t / base:.2f}x"
            first = i == 0
            lines.append(
                f"{case.op if first else '':<28} {case.mode if first else '':<17} {sizes if first else '':<30} "
                f"{name:<24} {_fmt_time(t):>10} {ratio:>12} {_fmt_bytes(case.peak_bytes.get(name)):>10}"
            )
            if name in case.errors:
                lines.append(f"{'':<77} ({case.errors[name]})")
    return "\n".join(lines)


def to_json(cases: List[Case], device: str) -> dict:
    rows = []
    for case in cases:
        names = list(case.contenders)
        base = case.results.get(names[0])
        rows.append(
            {
                "op": case.op,
                "mode": case.mode,
                "params": case.params,
                "seconds": case.results,
                "ratio_vs_metricops": {
                    n: (None if case.results.get(n) is None or not base else case.results[n] / base) for n in names
                },
                "errors": case.errors,
                "peak_bytes": case.peak_bytes,
            }
        )
    return {"environment": environment(device), "results": rows}


def write_json(cases: List[Case], device: str, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(cases, device), f, indent=2)
