"""Timing harness: contenders for one case are timed interleaved, in one run.

Machines here are noisy, so every contender of a case is timed in the same
interleaved loop (one call of each per round, each round in its own seeded
order) and the median per contender is reported; ratios are against the first
contender (metricops).

A ratio means something only if both sides do the same work, so each
contender returns its output (forward+backward: the loss value, then the
gradients) and the outputs of the warm-up call are compared with the first
contender's (``compare_outputs``): the verdict is recorded per contender, and
rows that disagree are flagged in the table and the JSON. Yardsticks (e.g. one
GEMM, forward only) are timed for scale and never compared.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from metricops.demo.timing import interleaved_times
from metricops.info import cpu_capability, cpu_model

# Agreement tolerances, relative to the first contender's output. Values (the
# loss, distances): max |a - b| <= VALUE_RTOL * max |b| (torch.cdist's x-vs-x
# diagonal is sqrt(rounding of ‖x‖²), up to ~1e-3 of the largest distance, not
# 0). Gradients: the same in the Frobenius norm with GRAD_RTOL, which is loose
# on purpose: at large B, float32 rounding of two GEMMs flips a few near-tied
# selections (semi-hard's "farther than the positive", a streaming block vs
# the whole matrix; 2e-2 at B=1024), which moves those rows' gradients; a
# different loss or a missing backward term moves them by O(1).
# tests/test_benchmark_contenders.py checks every row at small sizes with
# tight tolerances for both.
VALUE_RTOL = 3e-3
GRAD_RTOL = 0.25


@dataclass
class Case:
    op: str  # e.g. "pairwise_distance"
    mode: str  # "forward" or "forward+backward"
    params: Dict[str, object]  # sizes etc.
    # name -> zero-arg callable returning its output (forward+backward: (loss, *grads)); the first is metricops.
    contenders: Dict[str, Callable[[], object]]
    # Contenders timed for scale only, doing other work (one GEMM, no top-k): never compared, never a speed-up.
    yardsticks: Tuple[str, ...] = ()
    # name -> maps that contender's output to the first contender's form (e.g. FAISS's squared distances).
    canonical: Dict[str, Callable[[object], object]] = field(default_factory=dict)
    # The tensors the contenders read, by role ("embeddings", "labels", ...): tests overwrite them in place.
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    results: Dict[str, Optional[float]] = field(default_factory=dict)  # name -> median seconds (None: failed)
    errors: Dict[str, str] = field(default_factory=dict)
    peak_bytes: Dict[str, Optional[int]] = field(default_factory=dict)
    # name -> {"agrees": bool, "value_rel_err": float, "grad_rel_err": float | None} (yardsticks: absent)
    agreement: Dict[str, dict] = field(default_factory=dict)

    def disagreeing(self) -> List[str]:
        return [n for n, a in self.agreement.items() if not a["agrees"]]


def _tensors(output) -> List[torch.Tensor]:
    """An output as a flat list of tensors (numpy arrays, e.g. FAISS's, converted; None dropped)."""
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if output is None:
        return []
    if isinstance(output, torch.Tensor):
        return [output.detach()]
    return [torch.as_tensor(output)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, *, frobenius: bool) -> float:
    """|actual - expected| / |expected| in the max norm (or the Frobenius norm); NaN against NaN counts as equal."""
    if actual.shape != expected.shape:
        return float("inf")
    a, b = actual.double().cpu(), expected.double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, torch.zeros_like(a), a - b).nan_to_num(nan=float("inf"))
    b = torch.where(both_nan, torch.zeros_like(b), b)
    if frobenius:
        num, den = torch.linalg.vector_norm(diff).item(), torch.linalg.vector_norm(b).item()
    else:
        num = diff.abs().max().item() if diff.numel() else 0.0
        den = b.abs().max().item() if b.numel() else 0.0
    if num == 0:
        return 0.0
    return num / den if den > 0 else float("inf")


def compare_outputs(
    case: Case, outputs: Dict[str, object], *, value_rtol: float = VALUE_RTOL, grad_rtol: float = GRAD_RTOL
) -> Case:
    """Record in ``case.agreement`` whether each contender's output equals the first contender's.

    The first tensor of an output is its value (max-norm tolerance); in a
    forward+backward case the rest are gradients (Frobenius tolerance), in a
    forward case further values.
    """
    names = list(case.contenders)
    base_name = names[0]
    if base_name not in outputs:
        return case
    base = _tensors(case.canonical.get(base_name, lambda o: o)(outputs[base_name]))
    for name in names[1:]:
        if name in case.yardsticks or name not in outputs:
            continue
        got = _tensors(case.canonical.get(name, lambda o: o)(outputs[name]))
        value_err, grad_err = 0.0, None
        if len(got) != len(base):
            value_err = float("inf")
        for i, (g, b) in enumerate(zip(got, base)):
            is_grad = i > 0 and case.mode == "forward+backward"
            err = relative_error(g, b, frobenius=is_grad)
            if is_grad:
                grad_err = max(grad_err or 0.0, err)
            else:
                value_err = max(value_err, err)
        agrees = value_err <= value_rtol and (grad_err is None or grad_err <= grad_rtol)
        case.agreement[name] = {"agrees": agrees, "value_rel_err": value_err, "grad_rel_err": grad_err}
    return case


def check_agreement(case: Case, **tolerances) -> Case:
    """Run each compared contender once and record whether its output equals the first contender's."""
    outputs = {n: fn() for n, fn in case.contenders.items() if n not in case.yardsticks}
    return compare_outputs(case, outputs, **tolerances)


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
    case.results.update({name: None for name in alive})  # the contenders' order, whichever fail
    # Warm-up (and weed out contenders that fail, e.g. out of memory); its outputs are compared.
    outputs: Dict[str, object] = {}
    for name, fn in list(alive.items()):
        try:
            out = fn()
            _sync(device)
            if name not in case.yardsticks:  # a yardstick's output can be a Q×N matrix: not kept
                outputs[name] = out
            del out
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            case.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            case.results[name] = None
            del alive[name]
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    compare_outputs(case, outputs)
    del outputs
    # Round-robin, one call of each per round (the warm-up above was the untimed call).
    samples = interleaved_times(
        alive, torch.device(device), budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds, warm_up=False
    )
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
        # The model and vector ISA, not only the architecture: the same code's ratios differ by CPU (measured on
        # two 2-core x86_64 machines: one x @ x.T at B = 2048, D = 128 took 2.7 ms with AVX-512, 6.6 ms on an
        # AVX2 AMD EPYC, where pytorch-metric-learning's SupCon slowed by only 1.4x).
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
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
    # The other libraries' versions, for the README's column headers.
    from importlib import metadata

    env["libraries"] = {}
    for dist in ("pytorch-metric-learning", "faiss-cpu"):
        try:
            env["libraries"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
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


def fmt_bytes(b: Optional[int]) -> str:
    """ "" for no measurement, else MiB, or GiB from 1 GiB (a sampled RSS delta can dip below 0: shown as 0)."""
    if b is None:
        return ""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{max(b, 0) / 2**20:.0f} MiB"


def _agreement_note(case: Case, name: str) -> str:
    """ "same" / "DIFFERS (...)" / "yardstick" / "" (the first contender, or not run)."""
    if name in case.yardsticks:
        return "yardstick"
    a = case.agreement.get(name)
    if a is None:
        return ""
    if a["agrees"]:
        return "same"
    grad = "" if a["grad_rel_err"] is None else f", grad {a['grad_rel_err']:.1e}"
    return f"DIFFERS (value {a['value_rel_err']:.1e}{grad})"


def format_table(cases: List[Case]) -> str:
    lines = []
    header = (
        f"{'op':<28} {'mode':<17} {'sizes':<30} {'contender':<30} {'time':>10} {'x metricops':>12} {'peak mem':>10}"
        "  output"
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
                f"{name:<30} {_fmt_time(t):>10} {ratio:>12} {fmt_bytes(case.peak_bytes.get(name)):>10}"
                f"  {_agreement_note(case, name)}".rstrip()
            )
            if name in case.errors:
                lines.append(f"{'':<83} ({case.errors[name]})")
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
                "seconds": {n: case.results.get(n) for n in names},
                "ratio_vs_metricops": {
                    n: (None if case.results.get(n) is None or not base else case.results[n] / base) for n in names
                },
                "errors": case.errors,
                "peak_bytes": case.peak_bytes,
                # Whether each contender's output (value, gradients) equals the first's: a ratio is
                # only a speed-up of the same work where "agrees" is true. Yardsticks are not compared.
                "agreement": case.agreement,
                "yardsticks": list(case.yardsticks),
            }
        )
    return {
        "environment": environment(device),
        "agreement_tolerance": {"value_rtol": VALUE_RTOL, "grad_rtol": GRAD_RTOL},
        "results": rows,
    }
