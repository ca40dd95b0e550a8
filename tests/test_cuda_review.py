"""Findings of the CUDA review, one section each.

CPU cases run everywhere and pin the logic the CPU and CUDA kernels share; CUDA cases (needs_cuda) skip
cleanly without a GPU and run under `make gpu-check`.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import metricops
from metricops import _memory
from common import assert_close, cpu_and_cuda

ops = torch.ops.metricops

# --------------------------------------------------------------------------- 1. mixed devices


def _mixed_device_calls(first, second):
    """(call, text) pairs: each op with its first tensor on `first` and another tensor on `second`."""
    x, x2 = torch.randn(6, 3, device=first), torch.randn(6, 3, device=second)
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=second)
    idx = torch.tensor([1, 0, 3, 2, 5, 4], device=second)
    per_anchor = torch.ones(6, device=second)
    on_labels = "labels must be on the embeddings' device"
    return [
        (lambda: ops.pairwise_distance(x, x2, "euclidean"), "y must be on the same device as x"),
        (
            lambda: ops.pairwise_distance_backward(
                torch.ones(6, 6, device=second), x, None, torch.ones(6, 6, device=second), "euclidean"
            ),
            "grad must be on the same device as x",
        ),
        (lambda: ops.knn(x, x2, 2, "euclidean", 0), "database must be on the same device as queries"),
        (
            lambda: ops.l2_normalize_backward(torch.ones(6, 3, device=second), x, torch.ones(6, device=second), 1e-12),
            "l2_normalize_backward",
        ),
        (lambda: ops.contrastive_loss(x, labels, 0.0, 1.0, "euclidean", False, "mean"), on_labels),
        (lambda: ops.contrastive_loss_streaming(x, labels, 0.0, 1.0, "euclidean", False, "mean", 2), on_labels),
        (
            lambda: ops.contrastive_loss_streaming_backward(
                torch.ones((), device=second), x, labels, torch.ones((), device=second), 0.0, 1.0, "euclidean", False, 2
            ),
            on_labels,
        ),
        (
            lambda: ops.pair_contrastive_loss(
                x, x2, torch.ones(6, dtype=torch.bool, device=second), 1.0, "euclidean", False
            ),
            "x1 must be on the same device as x0",
        ),
        (
            lambda: ops.triplet_margin_loss(x, x2, x2, 1.0, 2.0, 1e-6, False, False),
            "positive must be on the same device as anchor",
        ),
        (lambda: ops.batch_hard_triplet(x, labels, 0.2, "euclidean", False, 0), on_labels),
        (
            lambda: ops.batch_hard_triplet_backward(
                per_anchor, per_anchor, per_anchor, x, idx, idx, per_anchor, per_anchor, 0.2, "euclidean", False
            ),
            "inputs must be on",
        ),
        (lambda: ops.semihard_triplet(x, labels, 0.2, "euclidean"), on_labels),
        (lambda: ops.semihard_triplet_streaming(x, labels, 0.2, "euclidean", 2), on_labels),
        (
            lambda: ops.semihard_triplet_streaming_backward(
                torch.ones(6, device=second), x, labels, 0.2, "euclidean", 2
            ),
            on_labels,
        ),
        (lambda: ops.batch_all_triplet(x, labels, 0.2, "euclidean"), on_labels),
        (lambda: ops.batch_all_triplet_streaming(x, labels, 0.2, "euclidean", 2), on_labels),
        (
            lambda: ops.batch_all_triplet_streaming_backward(
                torch.ones((), device=second), x, labels, 0.2, "euclidean", 2
            ),
            on_labels,
        ),
        (lambda: ops.triplet_statistics(x, labels, 0.2, "euclidean"), on_labels),
        (lambda: ops.mine_triplets(x, labels, "all", 0.2, "euclidean"), on_labels),
    ]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("first, second", [("cpu", "cuda"), ("cuda", "cpu")])
def test_mixed_devices_name_the_argument(first, second):
    """A CPU tensor among CUDA ones dispatches to the CUDA kernel, whose device guard must not throw
    before the input checks name the argument (CUDAGuard on a CPU device used to)."""
    for call, text in _mixed_device_calls(first, second):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert text in str(info.value), str(info.value)
        assert "non-CUDA DeviceType" not in str(info.value)


# --------------------------------------------------------------------------- 2. streaming contrastive block_rows <= 0


def _largest_cpu_allocation(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty")


def test_contrastive_streaming_default_block_is_bounded_cpu():
    """block_rows <= 0 picks a bounded block (256 rows on CPU), never the B×B matrix (it used to)."""
    B = 600
    x = torch.randn(B, 8)
    labels = torch.randint(0, 5, (B,))
    full_matrix = B * B * x.element_size()
    args = (x, labels, 0.0, 1.0, "euclidean", False, "mean", 0)
    biggest = _largest_cpu_allocation(lambda: ops.contrastive_loss_streaming(*args))
    assert biggest <= 256 * B * x.element_size() < full_matrix
    loss, denom = ops.contrastive_loss_streaming(*args)
    grad_args = (torch.ones(()), x, labels, denom, 0.0, 1.0, "euclidean", False, 0)
    biggest = _largest_cpu_allocation(lambda: ops.contrastive_loss_streaming_backward(*grad_args))
    assert biggest <= 256 * B * x.element_size() < full_matrix
    # The same result as an explicit block size.
    assert_close(loss, ops.contrastive_loss_streaming(*args[:-1], 256)[0])
    assert_close(
        ops.contrastive_loss_streaming_backward(*grad_args),
        ops.contrastive_loss_streaming_backward(*grad_args[:-1], 256),
    )


@pytest.mark.needs_cuda
def test_contrastive_streaming_default_block_is_bounded_cuda():
    # B² float32 = 400 MB: over the 256 MiB budget, so the default block must hold fewer than B rows.
    B = 10_000
    x = torch.randn(B, 8, device="cuda")
    labels = torch.randint(0, 50, (B,), device="cuda")
    full_matrix = B * B * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, denom = ops.contrastive_loss_streaming(x, labels, 0.0, 1.0, "euclidean", False, "mean", 0)
    ops.contrastive_loss_streaming_backward(
        torch.ones((), device="cuda"), x, labels, denom, 0.0, 1.0, "euclidean", False, 0
    )
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 256 * 2**20 + 64 * 2**20 < full_matrix
    assert_close(loss, ops.contrastive_loss_streaming(x, labels, 0.0, 1.0, "euclidean", False, "mean", 1000)[0])


# --------------------------------------------------------------------------- 3. contrastive W in float32


def test_contrastive_saved_weights_are_float32_for_half_inputs():
    """The fake kernel states the real CUDA kernel's contract: W (the saved matrix of the scalar reductions) is
    in the accumulation dtype, since 2·slope/d and 2·slope/(‖x_i‖‖x_j‖) pass float16's range."""
    with FakeTensorMode():
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.empty(5, 3, device="cuda", dtype=dtype)
            labels = torch.zeros(5, dtype=torch.int64, device="cuda")
            _, mat, row_coef, _ = ops.contrastive_loss(x, labels, 0.0, 1.0, "cosine", False, "mean")
            assert mat.dtype == torch.float32 and row_coef.dtype == torch.float32
            _, dist, _, _ = ops.contrastive_loss(x, labels, 0.0, 1.0, "cosine", False, "none")
            assert dist.dtype == dtype  # "none" keeps the distances in the input dtype


def test_contrastive_backward_checks_saved_matrix_dtype():
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    loss, mat, row_coef, denom = ops.contrastive_loss(x, labels, 0.0, 1.0, "euclidean", False, "mean")
    with pytest.raises(TypeError, match="saved matrix must have dtype Float"):
        ops.contrastive_loss_backward(
            torch.ones(()), x, labels, mat.double(), row_coef, denom, 0.0, 1.0, "euclidean", False, "mean"
        )


def _half_cases():
    gen = torch.Generator().manual_seed(11)
    # cosine on rows of norm 3e-3: 1/‖x‖ ≈ 333, W = 2·slope/(‖x_i‖‖x_j‖) ≈ 2.2e5 > 65504.
    x = torch.randn(16, 8, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * 3e-3
    yield "cosine", x, torch.randint(0, 3, (16,), generator=gen)
    # euclidean with near pairs of different labels (d ≈ 1e-5): W = 2/d ≈ 2e5.
    base = torch.randn(8, 8, generator=gen) * 1e-3
    near = base + 1e-5 * torch.randn(8, 8, generator=gen).sign()
    yield "euclidean", torch.cat([base, near]), torch.cat([torch.zeros(8), torch.ones(8)]).long()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contrastive_half_gradients_stay_finite(dtype):
    for metric, x, labels in _half_cases():
        xh = x.to("cuda", dtype).requires_grad_()
        x32 = xh.detach().float().requires_grad_()  # the same rounded values in float32
        labels = labels.cuda()
        for reduction in ("mean", "sum", "mean_nonzero"):
            kw = dict(metric=metric, pos_margin=0.0, neg_margin=1.0, reduction=reduction, memory="matrix")
            (gh,) = torch.autograd.grad(metricops.contrastive_loss(xh, labels, **kw), xh)
            (g32,) = torch.autograd.grad(metricops.contrastive_loss(x32, labels, **kw), x32)
            assert torch.isfinite(gh).all(), (metric, reduction)
            assert_close(gh.float(), g32, atol=2e-2 * g32.abs().max().item(), rtol=2e-2)


# --------------------------------------------------------------------------- 4. foreign indices in direct backwards

E = torch.randn(4, 3)


def test_batch_hard_backward_foreign_index_is_a_value_error():
    ones = torch.ones(4)
    for positive, negative, name in (
        ([1, 0, 3, 40], [2, 2, 0, 0], "positive"),
        ([1, 0, 3, 2], [2, -7, 0, 0], "negative"),
    ):
        with pytest.raises(ValueError, match=rf"{name} must hold indices in \[-1, 4\)"):
            ops.batch_hard_triplet_backward(
                ones,
                ones * 0,
                ones * 0,
                E,
                torch.tensor(positive),
                torch.tensor(negative),
                ones,
                ones,
                0.2,
                "euclidean",
                False,
            )


def _bad_index_calls(device):
    """Direct backward calls with one foreign index, and the same calls with that index as 'no term' (-1)."""
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    _, positive, negative, d_ap, d_an = ops.batch_hard_triplet(x, labels, 0.2, "euclidean", False, 0)
    g = torch.ones(6, dtype=torch.float64, device=device)
    bad_p, none_p = positive.clone(), positive.clone()
    bad_p[2], none_p[2] = 6, -1
    none_n = negative.clone()
    none_n[2] = -1  # an anchor with one index out of range has no term at all

    def batch_hard(pos, neg):
        return ops.batch_hard_triplet_backward(g, g * 0, g * 0, x, pos, neg, d_ap, d_an, 0.2, "euclidean", False)

    losses, sh_negative, dist = ops.semihard_triplet(x, labels, 0.2, "euclidean")
    bad_n, none_n2 = sh_negative.clone(), sh_negative.clone()
    bad_n[0, 1], none_n2[0, 1] = 1000, -1

    def semihard(neg):
        return ops.semihard_triplet_backward(torch.ones_like(losses), None, x, losses + 1, neg, dist, "euclidean")

    return [
        (lambda: batch_hard(bad_p, negative), lambda: batch_hard(none_p, none_n)),
        (lambda: semihard(bad_n), lambda: semihard(none_n2)),
    ]


@pytest.mark.needs_cuda
def test_foreign_index_refused_without_poisoning_the_context():
    """A ValueError, not a device-side assert: the CUDA context stays usable afterwards."""
    for bad, _ in _bad_index_calls("cuda"):
        with pytest.raises(ValueError, match="must hold indices in"):
            bad()
        torch.cuda.synchronize()
    x = torch.randn(8, 4, device="cuda")
    assert torch.isfinite(metricops.pairwise_distance(x)).all()


@pytest.mark.needs_cuda
def test_foreign_index_under_graph_capture_is_no_term():
    """During a CUDA graph capture the host check (a sync) is skipped; the kernels then treat a foreign index
    as 'no term' and never read or write through it."""
    for bad, as_none in _bad_index_calls("cuda"):
        expected = as_none()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            as_none()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = bad()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(got, expected)


# --------------------------------------------------------------------------- 5. batch-hard selects on keys


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batch_hard_selects_on_squared_keys(device):
    """Two positives whose squared distances differ (16e6 + 1 < 16e6 + 2, exact in float32) but whose roots
    round to the same float32: the farther key wins on both devices. CUDA compared the roots and took the
    tie's lower index, 1."""
    x = torch.tensor([[0.0, 0, 0], [4000, 1, 0], [4000, 1, 1], [0, 0, 5000]], device=device)
    assert torch.sqrt(torch.tensor(16e6 + 1)) == torch.sqrt(torch.tensor(16e6 + 2))
    labels = torch.tensor([0, 0, 0, 1], device=device)
    for block_rows in (0, 1):
        losses, positive, negative, d_ap, d_an = ops.batch_hard_triplet(x, labels, 0.2, "euclidean", False, block_rows)
        assert positive[0].item() == 2
        assert negative[0].item() == 3
        assert d_ap[0].item() == torch.sqrt(torch.tensor(16e6 + 2)).item()
        assert d_an[0].item() == 5000.0


# --------------------------------------------------------------------------- 6. streaming block budget


@pytest.mark.parametrize("batch", [4096, 65536, 10**6])
def test_cuda_stream_blocks_stay_within_budget(batch):
    """The CUDA row block respects the 256 MiB budget at any B (a 64-row minimum gave ~5 GiB at B = 10⁶)."""
    with FakeTensorMode():
        x = torch.empty(batch, 128, device="cuda")
    for bytes_per_entry in (4, _memory.SORTING_BYTES_PER_ENTRY):
        rows = _memory.block_rows("streaming", x, bytes_per_entry)
        assert rows >= 1
        assert rows * batch * bytes_per_entry <= _memory.CUDA_STREAM_BLOCK_BYTES


def test_sorting_scratch_estimate_covers_the_sort_path():
    """batch-all's block holds at its peak (bytes per entry): distances 4, masks 2, sorted negatives and
    their indices 12, shifted positives 4 and their sort (keys, indices) 12, float64 prefix sums with the
    cumsum's temporaries 24, multiplicity 4, float64 term sums 8, int64 counts 8, plus the stable sorts'
    own temporaries (~24): about 100. The estimate must not be below it (a GPU measures it: see
    test_sorting_scratch_measured_on_gpu)."""
    assert _memory.SORTING_BYTES_PER_ENTRY >= 100


@pytest.mark.needs_cuda
def test_sorting_scratch_measured_on_gpu():
    B, rows = 4096, 256
    x = torch.randn(B, 32, device="cuda")
    labels = torch.randint(0, B // 8, (B,), device="cuda")
    calls = {
        "semihard": lambda: ops.semihard_triplet_streaming(x, labels, 0.2, "euclidean", rows),
        "semihard_backward": lambda: ops.semihard_triplet_streaming_backward(
            torch.ones(B, device="cuda"), x, labels, 0.2, "euclidean", rows
        ),
        "batch_all": lambda: ops.batch_all_triplet_streaming(x, labels, 0.2, "euclidean", rows),
        "batch_all_backward": lambda: ops.batch_all_triplet_streaming_backward(
            torch.ones((), device="cuda"), x, labels, 0.2, "euclidean", rows
        ),
    }
    for name, call in calls.items():
        call()  # warm-up: cuBLAS workspaces and the like are not the block's scratch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        per_entry = (torch.cuda.max_memory_allocated() - base) / (rows * B)
        print(f"sorting scratch {name}: {per_entry:.1f} bytes per block entry")
        assert per_entry <= _memory.SORTING_BYTES_PER_ENTRY, (name, per_entry)


# --------------------------------------------------------------------------- 8. sort-free scan path


def _scan_batches(device):
    """Few positives (the scan's case), many positives (several 32-positive passes), a NaN row, and anchors
    without a positive or without a negative."""
    gen = torch.Generator().manual_seed(8)
    for B, classes in ((40, 10), (23, 4), (100, 2), (70, 1), (9, 9)):
        x = torch.randn(B, 6, generator=gen, dtype=torch.float64)
        yield x.to(device), torch.randint(0, classes, (B,), generator=gen).to(device)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    x[4, 1] = float("nan")
    yield x.to(device), torch.randint(0, 6, (30,), generator=gen).to(device)


@pytest.mark.parametrize("margin", [0.3, 0.0, -0.2])
def test_statistics_few_positives_path_matches_reference(margin):
    """The CPU's sort-free statistics path (common/triplet.h's classify_negative, which the CUDA scan path
    runs) counts what the sorted classify_negatives and the reference count."""
    for x, labels in _scan_batches("cpu"):
        if torch.isnan(x).any():
            continue  # the reference's comparisons differ on NaN rows; the NaN row is compared across paths below
        got = metricops.triplet_statistics(x, labels, margin=margin)
        expected = metricops.reference.triplet_statistics(x, labels, margin=margin)
        for key in ("total", "easy", "semihard", "hard"):
            assert int(got[key]) == int(expected[key]), (key, x.shape, margin)


SCANNED = {
    "semihard": lambda x, labels, memory, metric: metricops.semihard_triplet_loss(
        x, labels, memory=memory, metric=metric, margin=0.3, reduction="sum"
    ),
    "batch_all": lambda x, labels, memory, metric: metricops.batch_all_triplet_loss(
        x, labels, memory=memory, metric=metric, margin=0.3, reduction="sum"
    ),
}


@pytest.mark.needs_cuda
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_scan_path_matches_sort_path(monkeypatch, metric):
    """METRICOPS_CUDA_TRIPLET_PATH=scan gives the sort path's losses, gradients, counts and statistics."""
    monkeypatch.setattr(_memory, "_FORCED_STREAM_BLOCK_ROWS", 7)  # streaming crosses block boundaries
    for x, labels in _scan_batches("cuda"):
        for memory in ("matrix", "streaming"):
            for name, fn in SCANNED.items():
                results = {}
                for path in ("sort", "scan"):
                    monkeypatch.setenv("METRICOPS_CUDA_TRIPLET_PATH", path)
                    xr = x.detach().requires_grad_()
                    loss = fn(xr, labels, memory, metric)
                    (grad,) = torch.autograd.grad(loss.sum(), xr)
                    stats = torch.stack(
                        list(metricops.triplet_statistics(x, labels, metric=metric, margin=0.3).values())
                    )
                    results[path] = (loss.detach(), grad, stats)
                assert_close(results["scan"][0], results["sort"][0])
                assert_close(results["scan"][1], results["sort"][1])
                assert torch.equal(results["scan"][2], results["sort"][2]), (name, memory)
            # reduction="none": the same chosen negatives, pair by pair
            monkeypatch.setenv("METRICOPS_CUDA_TRIPLET_PATH", "sort")
            sort_out = torch.ops.metricops.semihard_triplet(x, labels, 0.3, metric)
            monkeypatch.setenv("METRICOPS_CUDA_TRIPLET_PATH", "scan")
            scan_out = torch.ops.metricops.semihard_triplet(x, labels, 0.3, metric)
            assert torch.equal(scan_out[1], sort_out[1])
            assert_close(scan_out[0], sort_out[0])


@pytest.mark.needs_cuda
def test_triplet_path_setting_is_checked(monkeypatch):
    monkeypatch.setenv("METRICOPS_CUDA_TRIPLET_PATH", "fast")
    x = torch.randn(8, 3, device="cuda")
    with pytest.raises(ValueError, match="METRICOPS_CUDA_TRIPLET_PATH must be 'sort' or 'scan'"):
        metricops.triplet_statistics(x, torch.zeros(8, dtype=torch.int64, device="cuda"))


def _column_sum_cases(device):
    g = torch.Generator().manual_seed(11)
    # more rows than one chunk of reductions.cuh (kColumnSumRows = 128), a ragged last chunk, N != M
    for m, n in ((300, 70), (129, 129), (5, 3)):
        x = torch.randn(m, 6, generator=g, dtype=torch.float64).to(device)
        y = torch.randn(n, 6, generator=g, dtype=torch.float64).to(device)
        labels = torch.randint(0, 4, (m,), generator=g).to(device)
        yield x, y, labels


def _norm_term_backwards(x, y, labels, metric, dtype):
    """Gradients of the two backwards that reduce norm terms over rows and columns: pairwise distance (self and
    two-set) and the contrastive matrix (reduction="none")."""
    out = []
    for other in (None, y):
        xr = x.to(dtype).requires_grad_()
        yr = None if other is None else other.to(dtype).requires_grad_()
        d = metricops.pairwise_distance(xr, yr, metric=metric)
        w = torch.linspace(-1, 1, d.numel(), dtype=torch.float64).view_as(d).to(d)
        leaves = (xr,) if yr is None else (xr, yr)
        out.extend(torch.autograd.grad((d * w).sum(), leaves))
    xr = x.to(dtype).requires_grad_()
    loss = metricops.contrastive_loss(xr, labels, metric=metric, reduction="none", memory="matrix")
    w = torch.linspace(-1, 1, loss.numel(), dtype=torch.float64).view_as(loss).to(loss)
    out.extend(torch.autograd.grad((loss * w).sum(), xr))
    return out


@pytest.mark.needs_cuda
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_chunked_column_sums_match_serial(monkeypatch, metric, dtype):
    """METRICOPS_CUDA_COLUMN_SUMS=chunked (no B×B buffer of norm terms, row chunks for the column sums) gives the
    serial path's gradients, and the CPU's."""
    for x, y, labels in _column_sum_cases("cuda"):
        results = {}
        for path in ("serial", "chunked"):
            monkeypatch.setenv("METRICOPS_CUDA_COLUMN_SUMS", path)
            results[path] = _norm_term_backwards(x, y, labels, metric, dtype)
        cpu = _norm_term_backwards(x.cpu(), y.cpu(), labels.cpu(), metric, torch.float64)
        tol = {} if dtype != torch.float16 else dict(rtol=2e-2, atol=2e-2)
        for chunked, serial, expected in zip(results["chunked"], results["serial"], cpu):
            assert_close(chunked, serial, **tol)
            assert_close(chunked.double().cpu(), expected, **tol)


@pytest.mark.needs_cuda
def test_column_sums_setting_is_checked(monkeypatch):
    monkeypatch.setenv("METRICOPS_CUDA_COLUMN_SUMS", "fast")
    x = torch.randn(8, 3, device="cuda", requires_grad=True)
    with pytest.raises(ValueError, match="METRICOPS_CUDA_COLUMN_SUMS must be 'serial' or 'chunked'"):
        metricops.pairwise_distance(x).sum().backward()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("k", [1, 5, 32, 33, 100])
def test_knn_warp_insert_matches_lane_insert(monkeypatch, k):
    """METRICOPS_CUDA_KNN_INSERT=warp (ballot-counted slot, chunked shifts) builds exactly the lane-0 top-k lists:
    ties (duplicated database rows), NaN rows, the self search, chunk boundaries."""
    g = torch.Generator().manual_seed(k)
    db = torch.randn(300, 8, generator=g)
    db[10:20] = db[0]  # ties: equal distances, ordered by index
    db[5] = float("nan")
    q = torch.randn(40, 8, generator=g)
    q[3] = db[0]
    for metric in ("euclidean", "cosine"):
        for database, chunk in ((db, 0), (db, 64), (None, 0)):
            queries = db if database is None else q
            out = {}
            for how in ("lane", "warp"):
                monkeypatch.setenv("METRICOPS_CUDA_KNN_INSERT", how)
                d, i = metricops.knn(
                    queries.cuda(), None if database is None else database.cuda(), k=k, metric=metric, _chunk_size=chunk
                )
                out[how] = (d.cpu(), i.cpu())
            assert torch.equal(out["warp"][1], out["lane"][1]), (metric, chunk, database is None)
            assert torch.equal(out["warp"][0].nan_to_num(-1.0), out["lane"][0].nan_to_num(-1.0))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_semihard_warp_coefficients_match_thread(monkeypatch, dtype):
    """METRICOPS_CUDA_SEMIHARD_COEFFICIENTS=warp gives the thread-per-row kernel's gradient bit for bit (the same
    additions in the same order for every entry)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 7, generator=g).to("cuda", dtype)
    labels = torch.randint(0, 9, (150,), generator=g).cuda()
    grads = {}
    for how in ("thread", "warp"):
        monkeypatch.setenv("METRICOPS_CUDA_SEMIHARD_COEFFICIENTS", how)
        xr = x.detach().requires_grad_()
        losses = metricops.semihard_triplet_loss(xr, labels, margin=0.3, reduction="none", memory="matrix")
        w = torch.linspace(-1, 1, losses.numel(), device="cuda").view_as(losses).to(losses.dtype)
        (grads[how],) = torch.autograd.grad((losses * w).sum(), xr)
    assert torch.equal(grads["warp"], grads["thread"])


@pytest.mark.needs_cuda
def test_review_path_settings_are_checked(monkeypatch):
    x = torch.randn(8, 3, device="cuda", requires_grad=True)
    labels = torch.arange(8, device="cuda") // 2
    monkeypatch.setenv("METRICOPS_CUDA_KNN_INSERT", "fast")
    with pytest.raises(ValueError, match="METRICOPS_CUDA_KNN_INSERT must be 'lane' or 'warp'"):
        metricops.knn(x.detach(), k=2)
    monkeypatch.delenv("METRICOPS_CUDA_KNN_INSERT")
    monkeypatch.setenv("METRICOPS_CUDA_SEMIHARD_COEFFICIENTS", "fast")
    with pytest.raises(ValueError, match="METRICOPS_CUDA_SEMIHARD_COEFFICIENTS must be 'thread' or 'warp'"):
        metricops.semihard_triplet_loss(x, labels, memory="matrix").backward()
