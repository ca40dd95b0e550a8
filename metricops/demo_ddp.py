"""Distributed metric learning on CPU: 2 processes, DDP, a global batch-hard triplet loss.

``python -m metricops.demo_ddp [--epochs 5] [--world-size 2]`` trains a small
MLP on scikit-learn's digits 0-4 with ``DistributedDataParallel`` (gloo) and
``DistributedLoss(BatchHardTripletLoss())``: each process embeds its shard of
every batch, and its anchors are mined against the whole global batch. Rank 0
prints the per-epoch loss (summed over ranks: the global batch's loss) and
retrieval quality on held-out digits. Needs scikit-learn; runs in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metricops
from metricops.distributed import DistributedLoss


def _data(seed: int):
    from sklearn.datasets import load_digits  # a demo dependency, not a runtime one

    x, y = load_digits(return_X_y=True)
    keep = y < 5
    x = torch.tensor(x[keep], dtype=torch.float32) / 16.0
    y = torch.tensor(y[keep], dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def _worker(rank: int, args, port: int) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        (x_train, y_train), (x_test, y_test) = _data(args.seed)
        torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # DDP averages gradients over ranks; scale_by_world_size makes that average
        # the gradient of the single-process loss on the global batch.
        loss_fn = DistributedLoss(
            metricops.nn.BatchHardTripletLoss(margin=0.2, normalize=True), scale_by_world_size=True
        )
        opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
        global_batch = args.batch_size * args.world_size
        start = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            # Same permutation on every rank; each takes its contiguous slice of every global batch.
            perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
            total, batches = torch.zeros(()), 0
            for b in range(0, len(perm) - global_batch + 1, global_batch):
                idx = perm[b + rank * args.batch_size : b + (rank + 1) * args.batch_size]
                loss = loss_fn(ddp(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach() / args.world_size
                batches += 1
            dist.all_reduce(total)  # sum of shares: the global batch loss
            if rank == 0:
                print(
                    f"epoch {epoch}: loss {total.item() / max(batches, 1):.4f} "
                    f"({batches} global batches of {global_batch}, {time.perf_counter() - start:.1f}s)",
                    flush=True,
                )
        if rank == 0:
            model.eval()
            with torch.no_grad():
                emb = torch.nn.functional.normalize(model(x_test), dim=1)
            m = metricops.retrieval_metrics(emb, y_test, ks=(1,))
            print(f"held-out digits 0-4: hit@1 {m['hit@1']:.3f}, map@r {m['map@r']:.3f}", flush=True)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        raise SystemExit("demo_ddp needs torch.distributed with the gloo backend")
    import sklearn.datasets  # noqa: F401  (imported once here: forked workers inherit it)

    # fork where available: workers inherit the imported torch/metricops/sklearn
    # instead of re-importing them (seconds each). The parent has run no torch
    # op that starts thread pools, so forking is safe.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(args, _free_port()), nprocs=args.world_size, join=True, start_method=method)


if __name__ == "__main__":
    main()
