"""Ops called concurrently from several Python threads on CPU give
the same results as the same calls run serially (4 threads, each with its own inputs)."""

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import metricops
from metricops import reference as ref


def _work(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 6, (64,), generator=g)
    results = []
    for _ in range(2):
        parts = [
            metricops.pairwise_distance(x, metric="cosine").sum(),
            metricops.batch_hard_triplet_loss(x, labels),
            metricops.batch_hard_triplet_loss(x, labels, memory="streaming"),
            metricops.semihard_triplet_loss(x, labels),
            metricops.batch_all_triplet_loss(x, labels, metric="sqeuclidean"),
            metricops.contrastive_loss(x, labels),
            metricops.pair_contrastive_loss(x, x.flip(0), labels % 2),
            metricops.triplet_margin_loss(x, x.roll(1, 0), x.roll(2, 0)),
        ]
        (grad,) = torch.autograd.grad(sum(parts), x)
        d, i = metricops.knn(x.detach(), k=5, _chunk_size=13)
        mined = metricops.mine_triplets(x, labels, strategy="hard")
        stats = torch.stack(list(metricops.triplet_statistics(x, labels).values()))
        results.append([p.detach() for p in parts] + [grad, d, i, *mined, stats])
    return results


def _same(a, b):
    return all(torch.equal(u, v) for ra, rb in zip(a, b) for u, v in zip(ra, rb))


def test_concurrent_calls_match_serial():
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    serial = [_work(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(_work, seeds))
    for s, c, seed in zip(serial, concurrent, seeds):
        assert _same(s, c), f"seed {seed}"
        assert _same(s[:1], s[1:2])  # repeated calls inside one thread agree too


def test_concurrent_calls_with_one_intra_op_thread():
    # Inter-op concurrency only (each op single-threaded): still identical.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seeds = [21, 22, 23, 24]
        serial = [_work(s) for s in seeds]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(_work, seeds))
    finally:
        torch.set_num_threads(prev)
    for s, c in zip(serial, concurrent):
        assert _same(s, c)


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


def test_triangle_rows_split_across_threads():
    """The self mode's triangular loops hand out rows in pairs (i, n - 1 - i) (csrc/cpu/triangle.h): at sizes where
    they split into several tasks, with an odd count, every row is done exactly once (values against torch and the
    reference), and the result does not depend on the thread count."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(301, 8, generator=g, dtype=torch.float64)
    for metric in ("euclidean", "cosine"):

        def dist(metric=metric):
            return metricops.pairwise_distance(x, metric=metric)

        one, two = _with_threads(1, dist), _with_threads(2, dist)
        assert torch.equal(one, two)
        assert torch.equal(two, two.T)
        # the difference form (torch.cdist's Gram form leaves ~1e-8 on its diagonal)
        want = (
            (x[:, None] - x[None]).norm(dim=-1)
            if metric == "euclidean"
            else 1 - F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
        )
        torch.testing.assert_close(two, want, rtol=1e-12, atol=1e-12)
    # the engine's diagonal blocks (128 rows by default, 64 pairs in tasks of 8)
    labels = torch.randint(0, 40, (301,), generator=g)
    for loss, reference in ((metricops.supcon_loss, ref.supcon_loss), (metricops.circle_loss, ref.circle_loss)):

        def grad(loss=loss):
            xg = x.clone().requires_grad_()
            return torch.autograd.grad(loss(xg, labels), xg)[0]

        one, two = _with_threads(1, grad), _with_threads(2, grad)
        assert torch.equal(one, two)
        xr = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(reference(xr, labels), xr)
        torch.testing.assert_close(two, want, rtol=1e-10, atol=1e-12)
