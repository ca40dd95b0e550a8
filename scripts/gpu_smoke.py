"""Every native op once, forward and backward, at small sizes: the reduced suite that `make gpu-check` runs
under compute-sanitizer (memcheck, racecheck), where the full test suite would take too long.

    python scripts/gpu_smoke.py [--device cuda|cpu] [--quick]

Covers each metric, float32 and (on CUDA) float16/bfloat16, the matrix and streaming paths with blocks that
cross boundaries and end ragged, normalize=True, NaN rows, the sort-free scan path of semi-hard, batch-all and
statistics (METRICOPS_CUDA_TRIPLET_PATH=scan, up to and past 32 positives an anchor), and direct backward
calls with -1 (no triplet) entries. Exits non-zero when an op raises or gives a non-finite result
where a finite one is expected. On CPU (the dry run of `make gpu-check`) it runs the same calls in float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metricops  # noqa: E402

METRICS = ("euclidean", "sqeuclidean", "cosine")


def _check(name, value, failures, finite=True):
    tensors = value if isinstance(value, (tuple, list)) else (value,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and finite and not torch.isfinite(t).all():
            failures.append(f"{name}: non-finite result")
            return


def run(device: str, quick: bool) -> list:
    failures, done = [], []
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    gen = torch.Generator().manual_seed(0)
    B, D = (37, 16) if quick else (97, 24)
    labels = torch.randint(0, 7, (B,), generator=gen).to(device)
    ops = torch.ops.metricops

    def step(name, fn, finite=True):
        done.append(name)
        try:
            _check(name, fn(), failures, finite)
        except Exception as exc:  # noqa: BLE001 - the smoke run reports every failure, then exits non-zero
            failures.append(f"{name}: {type(exc).__name__}: {exc}")

    for dtype in dtypes:
        x = torch.randn(B, D, generator=gen).to(device, dtype)
        for metric in METRICS:
            tag = f"{dtype}/{metric}"

            def fwd_bwd(loss_fn):
                def go():
                    xr = x.detach().requires_grad_()
                    loss = loss_fn(xr)
                    (grad,) = torch.autograd.grad(loss.float().sum(), xr)
                    return loss.detach(), grad

                return go

            step(f"pairwise_distance {tag}", fwd_bwd(lambda t: metricops.pairwise_distance(t, metric=metric)))
            step(
                f"pairwise_distance xy {tag}",
                fwd_bwd(lambda t: metricops.pairwise_distance(t[:20], t[5:], metric=metric)),
            )
            for memory, rows in (("matrix", None), ("streaming", 5), ("streaming", B - 1)):
                kw = dict(metric=metric, memory=memory)
                sub = f"{tag}/{memory}{rows or ''}"
                metricops._memory._FORCED_STREAM_BLOCK_ROWS = rows
                try:
                    step(f"batch_hard {sub}", fwd_bwd(lambda t: metricops.batch_hard_triplet_loss(t, labels, **kw)))
                    step(
                        f"batch_hard normalize {sub}",
                        fwd_bwd(lambda t: metricops.batch_hard_triplet_loss(t, labels, normalize=True, **kw)),
                    )
                    step(f"semihard {sub}", fwd_bwd(lambda t: metricops.semihard_triplet_loss(t, labels, **kw)))
                    step(f"batch_all {sub}", fwd_bwd(lambda t: metricops.batch_all_triplet_loss(t, labels, **kw)))
                    step(
                        f"contrastive {sub}",
                        fwd_bwd(lambda t: metricops.contrastive_loss(t, labels, neg_margin=1.5, **kw)),
                    )
                finally:
                    metricops._memory._FORCED_STREAM_BLOCK_ROWS = None
            step(
                f"contrastive none {tag}",
                fwd_bwd(lambda t: metricops.contrastive_loss(t, labels, reduction="none", metric=metric)),
            )
            step(
                f"semihard none {tag}",
                fwd_bwd(lambda t: metricops.semihard_triplet_loss(t, labels, reduction="none", metric=metric)),
            )
            step(
                f"triplet_statistics {tag}",
                lambda: torch.stack(list(metricops.triplet_statistics(x, labels, metric=metric).values())).float(),
            )
            for strategy in metricops.triplet.STRATEGIES:
                step(
                    f"mine_triplets {strategy} {tag}",
                    lambda: metricops.mine_triplets(x, labels, strategy=strategy, metric=metric)[0].float(),
                )
            step(f"knn {tag}", lambda: metricops.knn(x, k=5, metric=metric)[0].float())
            step(f"knn db chunked {tag}", lambda: ops.knn(x[:11], x, 7, metric, 3)[0].float())
        step(
            f"pair_contrastive {dtype}",
            fwd_bwd(lambda t: metricops.pair_contrastive_loss(t[:-1], t[1:], (labels[:-1] == labels[1:]).long())),
        )
        for swap in (False, True):
            step(
                f"triplet_margin swap={swap} {dtype}",
                fwd_bwd(lambda t: metricops.triplet_margin_loss(t, t.roll(1, 0), t.roll(2, 0), swap=swap)),
            )
        # NaN rows propagate (non-finite results expected).
        xn = x.clone()
        xn[3, 2] = float("nan")
        step(f"batch_hard nan {dtype}", lambda: metricops.batch_hard_triplet_loss(xn, labels), finite=False)
        step(
            f"semihard nan {dtype}",
            lambda: metricops.semihard_triplet_loss(xn, labels, memory="streaming"),
            finite=False,
        )
    # The sort-free scan path (METRICOPS_CUDA_TRIPLET_PATH=scan), with few positives and with more than 32 an
    # anchor (several passes), matrix and streaming.
    os.environ["METRICOPS_CUDA_TRIPLET_PATH"] = "scan"
    try:
        for classes in (7, 2):
            scan_labels = torch.randint(0, classes, (B,), generator=gen).to(device)
            for dtype in dtypes[:2]:
                x = torch.randn(B, D, generator=gen).to(device, dtype)
                for memory, rows in (("matrix", None), ("streaming", 5)):
                    metricops._memory._FORCED_STREAM_BLOCK_ROWS = rows
                    try:
                        for name in ("semihard_triplet_loss", "batch_all_triplet_loss"):
                            loss_fn = getattr(metricops, name)

                            def go():
                                xr = x.detach().requires_grad_()
                                loss = loss_fn(xr, scan_labels, memory=memory)
                                return loss.detach(), torch.autograd.grad(loss.float(), xr)[0]

                            step(f"scan {name} {dtype} classes={classes} {memory}", go)
                    finally:
                        metricops._memory._FORCED_STREAM_BLOCK_ROWS = None
                step(
                    f"scan triplet_statistics {dtype} classes={classes}",
                    lambda: torch.stack(list(metricops.triplet_statistics(x, scan_labels).values())).float(),
                )
    finally:
        os.environ.pop("METRICOPS_CUDA_TRIPLET_PATH", None)
    # Direct backward calls: -1 (no triplet) entries are skipped without reading through them.
    x = torch.randn(B, D, generator=gen).to(device)
    _, pos, neg, d_ap, d_an = ops.batch_hard_triplet(x, labels, 0.2, "euclidean", False, 0)
    pos[::3] = -1
    g = torch.ones(B, device=device)
    step(
        "batch_hard_backward -1",
        lambda: ops.batch_hard_triplet_backward(g, g * 0, g * 0, x, pos, neg, d_ap, d_an, 0.2, "euclidean", False),
    )
    print(f"gpu_smoke: {len(done)} calls")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller batch (for racecheck, which is slow)")
    args = parser.parse_args(argv)
    t0 = time.time()
    failures = run(args.device, args.quick)
    if args.device == "cuda":
        torch.cuda.synchronize()
    for f in failures:
        print("FAIL", f)
    print(f"gpu_smoke: {len(failures)} failure(s) on {args.device} in {time.time() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
