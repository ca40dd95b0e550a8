"""Timings and peak memory of the paths the CUDA review changed, for `make gpu-check`.

    python scripts/gpu_review_bench.py [--device cuda|cpu] [--tiny] [--json PATH]

Each case runs forward+backward (or the op alone) a few times after a warm-up and reports the median time
(CUDA events on a GPU) and the peak extra memory. Cases: batch-hard (keys, matrix and streaming), the
streaming semi-hard / batch-all / statistics sort path at the default block budget, contrastive in
float16 (W kept in float32) and streaming contrastive with the default block. `--tiny` (the dry run on
CPU) uses small sizes so that every case runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metricops  # noqa: E402


def _timed(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_bytes(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _fwd_bwd(loss_fn, x, labels):
    def go():
        xr = x.detach().requires_grad_()
        loss = loss_fn(xr, labels)
        loss.float().backward()
        return loss.detach()

    return go


def _with_env(name, value, fn):
    """fn under the environment variable name=value (the CUDA kernels read it at each call)."""

    def go():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name)
            else:
                os.environ[name] = old

    return go


def _with_path(path, fn):
    """fn under METRICOPS_CUDA_TRIPLET_PATH=path."""
    return _with_env("METRICOPS_CUDA_TRIPLET_PATH", path, fn)


def cases(device, tiny):
    big, mid = (512, 256) if tiny else (16384, 4096)
    D = 32 if tiny else 128
    gen = torch.Generator().manual_seed(0)

    def batch(B, dtype=torch.float32):
        x = torch.randn(B, D, generator=gen).to(device, dtype)
        return x, torch.randint(0, max(B // 8, 1), (B,), generator=gen).to(device)

    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        for B in (mid, big):
            x, labels = batch(B, dtype)
            for memory in ("matrix", "streaming"):
                yield (
                    f"batch_hard {memory}",
                    dict(B=B, D=D, dtype=str(dtype)),
                    _fwd_bwd(lambda t, lab: metricops.batch_hard_triplet_loss(t, lab, memory=memory), x, labels),
                )
    # The sort path against the scan path (METRICOPS_CUDA_TRIPLET_PATH): few positives (B/8 classes) and
    # many (4 classes: B/4 positives an anchor, the scan's worst case, at the smaller B). Equal "value"s
    # across the two paths are the comparison of results.
    for size, classes in ((big, big // 8), (mid, 4)):
        x, _ = batch(size)
        labels = torch.randint(0, classes, (size,), generator=gen).to(device)
        for path in ("sort", "scan"):
            params = dict(B=size, D=D, classes=classes, path=path)
            for name in ("semihard_triplet_loss", "batch_all_triplet_loss"):
                fn = getattr(metricops, name)
                yield (
                    f"{name} streaming",
                    params,
                    _with_path(path, _fwd_bwd(lambda t, lab: fn(t, lab, memory="streaming"), x, labels)),
                )
            yield (
                "triplet_statistics",
                params,
                _with_path(
                    path, lambda: torch.stack(list(metricops.triplet_statistics(x, labels).values())).float().sum()
                ),
            )
    x, labels = batch(big)
    yield (
        "contrastive streaming (default block)",
        dict(B=big, D=D),
        _fwd_bwd(lambda t, lab: metricops.contrastive_loss(t, lab, memory="streaming"), x, labels),
    )
    for dtype in [torch.float16] if device == "cuda" else [torch.float32]:
        xh, labels_h = batch(mid, dtype)
        yield (
            "contrastive matrix",
            dict(B=mid, D=D, dtype=str(dtype)),
            _fwd_bwd(lambda t, lab: metricops.contrastive_loss(t, lab, memory="matrix"), xh, labels_h),
        )
    # The review's other new kernels, old and new side by side (equal "value"s across them are the comparison
    # of results): the backwards that sum norm terms over rows and columns (METRICOPS_CUDA_COLUMN_SUMS: "serial"
    # writes an M×N buffer of them for the pairwise distance and sums the contrastive matrix's columns one
    # thread each; "chunked" is cuda/reductions.cuh), the semi-hard matrix backward's coefficients
    # (METRICOPS_CUDA_SEMIHARD_COEFFICIENTS thread|warp) and the knn top-k insertion (METRICOPS_CUDA_KNN_INSERT
    # lane|warp, k = 100: mAP@100's).
    x, labels = batch(mid)
    for path in ("serial", "chunked"):
        params = dict(B=mid, D=D, column_sums=path)
        yield (
            "pairwise_distance self backward",
            params,
            _with_env(
                "METRICOPS_CUDA_COLUMN_SUMS",
                path,
                _fwd_bwd(lambda t, lab: metricops.pairwise_distance(t).sum(), x, labels),
            ),
        )
        yield (
            "contrastive_loss none backward",
            params,
            _with_env(
                "METRICOPS_CUDA_COLUMN_SUMS",
                path,
                _fwd_bwd(
                    lambda t, lab: metricops.contrastive_loss(t, lab, reduction="none", memory="matrix").sum(),
                    x,
                    labels,
                ),
            ),
        )
    for how in ("thread", "warp"):
        yield (
            "semihard_triplet_loss matrix",
            dict(B=mid, D=D, coefficients=how),
            _with_env(
                "METRICOPS_CUDA_SEMIHARD_COEFFICIENTS",
                how,
                _fwd_bwd(lambda t, lab: metricops.semihard_triplet_loss(t, lab, memory="matrix"), x, labels),
            ),
        )
    queries, _ = batch(mid)
    database, _ = batch(big)
    for how in ("lane", "warp"):
        yield (
            "knn k=100",
            dict(Q=mid, N=big, D=D, insert=how),
            _with_env(
                "METRICOPS_CUDA_KNN_INSERT",
                how,
                lambda: metricops.knn(queries, database, k=min(100, database.shape[0]))[0].float().sum(),
            ),
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    for name, params, fn in cases(args.device, args.tiny):
        entry = dict(case=name, **params)
        try:
            value = fn()
            entry["value"] = float(value.float().sum()) if isinstance(value, torch.Tensor) else None
            entry["median_s"] = _timed(fn, args.device, args.reps)
            entry["peak_bytes"] = _peak_bytes(fn, args.device)
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others' numbers
            entry["error"] = f"{type(exc).__name__}: {exc}"
        results.append(entry)
        print(json.dumps(entry), flush=True)
    report = dict(
        device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        torch=torch.__version__,
        metricops_build=metricops.build_info(),
        cases=results,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
