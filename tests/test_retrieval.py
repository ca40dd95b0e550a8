import numpy as np
import pytest
import torch

import metricops
from metricops import reference, retrieval
from common import LAYOUTS, METRICS, assert_close, cpu_and_cuda, make_layout


def brute_force(q, db, k, metric):
    """Independent check: pairwise distances, then numpy's stable argsort (ties -> lower index, NaN last)."""
    d = metricops.pairwise_distance(q.double(), None if db is None else db.double(), metric=metric).cpu().numpy()
    idx = np.tile(np.arange(d.shape[1]), (d.shape[0], 1))
    if db is None:
        keep = ~np.eye(d.shape[0], dtype=bool)
        d = d[keep].reshape(d.shape[0], -1)
        idx = idx[keep].reshape(d.shape[0], -1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)


def check_knn(q, db, k, metric, chunk=0, tol=None):
    d, i = metricops.knn(q, db, k=k, metric=metric, _chunk_size=chunk)
    assert d.shape == (q.shape[0], k) and i.shape == (q.shape[0], k)
    assert d.dtype == q.dtype and i.dtype == torch.int64
    d_ref, i_ref = reference.knn(q.double(), None if db is None else db.double(), k=k, metric=metric)
    if metric == "cosine":
        # 1 - cos is not exact (a sqrt, and FMA contraction differs between
        # kernels), so cosine "ties" of parallel integer vectors are near-ties
        # that rounding may order either way: check that the
        # returned rows really are a top-k (their true distances equal the k
        # smallest) and are sorted, up to rounding.
        full = reference.pairwise_distance(q.double(), None if db is None else db.double(), metric=metric)
        true_d = full.gather(1, i)
        assert_close(true_d, d_ref, atol=1e-12, rtol=0)
        assert (true_d[:, 1:] >= true_d[:, :-1] - 1e-12).all()
        if db is None:
            assert (i != torch.arange(q.shape[0], device=i.device)[:, None]).all()
        assert all(len(set(row)) == k for row in i.tolist())
    else:
        assert torch.equal(i.cpu(), i_ref.cpu()), (i, i_ref)
    assert_close(d, d_ref, dtype=q.dtype, atol=tol, rtol=tol)
    return d, i


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("self_search", [False, True])
def test_knn_matches_reference_integer_ties(device, metric, self_search):
    # Integer coordinates: the Gram entries are exact, so the many ties (and
    # duplicate points) are real ties and must be broken by the lower index.
    q = torch.randint(-2, 3, (37, 3), device=device).double()
    db = None if self_search else torch.randint(-2, 3, (53, 3), device=device).double()
    n = 36 if self_search else 53
    for k in (1, 5, n):
        for chunk in (0, 1, 7, 16):
            check_knn(q, db, k, metric, chunk)
    if metric != "cosine":  # exact ties (see check_knn): numpy's stable argsort agrees too
        d, i = metricops.knn(q, db, k=n, metric=metric, _chunk_size=7)
        d_np, i_np = brute_force(q, db, n, metric)
        assert np.array_equal(i.cpu().numpy(), i_np)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_random(device, dtype, metric):
    q = torch.randn(70, 9, device=device, dtype=dtype)
    db = torch.randn(301, 9, device=device, dtype=dtype)
    tol = None if dtype == torch.float64 else 1e-4
    for chunk in (0, 13, 64):
        d, i = metricops.knn(q, db, k=10, metric=metric, _chunk_size=chunk)
        # float32 rounding may swap near-ties: compare indices against a float64 search of the same inputs
        d64, i64 = reference.knn(q.double(), db.double(), k=10, metric=metric)
        assert_close(d, d64, dtype=dtype, atol=tol, rtol=tol)
        if dtype == torch.float64:
            assert torch.equal(i, i64)
        else:
            assert (i == i64).float().mean() > 0.97
        # whatever the precision, the returned distances are those of the returned indices
        full = metricops.pairwise_distance(q, db, metric=metric)
        assert_close(d, full.gather(1, i), dtype=dtype, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_matches_cdist_topk(device):
    q = torch.randn(40, 16, device=device, dtype=torch.float64)
    db = torch.randn(500, 16, device=device, dtype=torch.float64)
    d, i = metricops.knn(q, db, k=7, _chunk_size=100)
    d_ref, i_ref = torch.topk(torch.cdist(q, db), 7, dim=1, largest=False, sorted=True)
    assert torch.equal(i, i_ref)
    assert_close(d, d_ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_knn_edge_sizes(device, metric):
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    check_knn(x[:1], x, 1, metric)  # Q=1
    check_knn(x[:1], x, 6, metric)  # Q=1, k=N
    check_knn(x, x[:1], 1, metric)  # N=1
    check_knn(x[:2], None, 1, metric)  # self-search of two points
    check_knn(x, None, 5, metric, chunk=4)  # k = N - 1 with self-exclusion
    d, i = metricops.knn(x[:0], x, k=2, metric=metric)  # Q=0
    assert d.shape == (0, 2) and i.shape == (0, 2)
    check_knn(torch.zeros(5, 0, dtype=torch.float64, device=device), None, 3, metric)  # D=0: all ties


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_self_exclusion_with_duplicates(device):
    # Five copies of one point: each must return the other four (distance 0), never itself.
    x = torch.randn(1, 3, device=device).repeat(5, 1)
    x = torch.cat([x, torch.randn(4, 3, device=device) + 10])
    for chunk in (0, 2, 3):
        d, i = metricops.knn(x, k=4, _chunk_size=chunk)
        for r in range(5):
            assert r not in i[r].tolist()
            assert sorted(i[r].tolist()) == [j for j in range(5) if j != r]
            assert i[r].tolist() == sorted(i[r].tolist())  # ties by lower index
        assert (i != torch.arange(9, device=device)[:, None]).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_knn_layouts(device, layout):
    q = torch.randn(11, 6, dtype=torch.float64, device=device)
    db = torch.randn(23, 6, dtype=torch.float64, device=device)
    for metric in METRICS:
        expected = reference.knn(q, db, k=5, metric=metric)
        got = metricops.knn(make_layout(q, layout), make_layout(db, layout), k=5, metric=metric, _chunk_size=4)
        assert torch.equal(got[1], expected[1])
        assert_close(got[0], expected[0])
        expected_self = reference.knn(q, k=4, metric=metric)
        got_self = metricops.knn(make_layout(q, layout), k=4, metric=metric, _chunk_size=5)
        assert torch.equal(got_self[1], expected_self[1])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_knn_nan_sorted_last_valid_indices(device, metric):
    db = torch.randn(30, 4, dtype=torch.float64, device=device)
    db[[3, 7, 20]] = float("nan")
    q = torch.randn(8, 4, dtype=torch.float64, device=device)
    q[2, 0] = float("nan")  # a query whose every distance is NaN
    for chunk in (0, 4, 7):
        d, i = metricops.knn(q, db, k=30, metric=metric, _chunk_size=chunk)
        assert ((i >= 0) & (i < 30)).all()
        for r in range(8):
            assert sorted(i[r].tolist()) == list(range(30))  # a permutation: every row returned once
        ok = [r for r in range(8) if r != 2]
        assert torch.isnan(d[ok, -3:]).all() and not torch.isnan(d[ok, :-3]).any()
        assert i[ok, -3:].tolist() == [[3, 7, 20]] * len(ok)  # NaNs by index
        assert i[2].tolist() == list(range(30))
        d_ref, i_ref = reference.knn(q, db, k=30, metric=metric)
        assert torch.equal(i, i_ref)
        assert_close(d, d_ref)
        d5, i5 = metricops.knn(q, db, k=5, metric=metric, _chunk_size=chunk)
        assert not {3, 7, 20} & set(i5[ok].flatten().tolist())
    # self-search with a NaN row still excludes self and stays in range
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    x[1] = float("nan")
    d, i = metricops.knn(x, k=5, metric=metric, _chunk_size=2)
    assert ((i >= 0) & (i < 6)).all() and (i != torch.arange(6, device=device)[:, None]).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_progress_matches(device, monkeypatch):
    monkeypatch.setattr(retrieval, "_PROGRESS_QUERY_CHUNK", 16)
    x = torch.randint(-2, 3, (50, 3), device=device).double()  # many ties across the Python chunks
    db = torch.randn(40, 3, dtype=torch.float64, device=device)
    for y, k in ((None, 49), (None, 6), (db, 40), (db, 3)):
        expected = metricops.knn(x, y, k=k)
        got = metricops.knn(x, y, k=k, progress=True)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_retrieval_metrics_progress_matches(monkeypatch, capsys):
    monkeypatch.setattr(retrieval, "_PROGRESS_QUERY_CHUNK", 8)
    x = torch.randn(30, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,))
    expected = metricops.retrieval_metrics(x, labels, ks=(1, 5))
    assert metricops.retrieval_metrics(x, labels, ks=(1, 5), progress=True) == expected
    assert "knn" in capsys.readouterr().err  # the bar was shown


def test_knn_no_gradient():
    x = torch.randn(10, 3, requires_grad=True)
    d, i = metricops.knn(x, k=3)
    assert not d.requires_grad and not i.requires_grad


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_knn_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def fn(q, db):
        d, i = metricops.knn(q, db, k=5, metric="cosine")
        return d.sum(dim=1), i + 1

    compiled = torch.compile(fn, fullgraph=True)
    q = torch.randn(12, 8, device=device)
    db = torch.randn(30, 8, device=device)
    out_c, out_e = compiled(q, db), fn(q, db)
    assert_close(out_c[0], out_e[0])
    assert torch.equal(out_c[1], out_e[1])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_low_precision_cuda(dtype):
    q = torch.randn(64, 32, device="cuda").to(dtype)
    db = torch.randn(500, 32, device="cuda").to(dtype)
    d, i = metricops.knn(q, db, k=10, _chunk_size=100)
    assert d.dtype == dtype
    d_full = metricops.pairwise_distance(q.float(), db.float())  # same rounded inputs, float32 math
    d_ref, i_ref = torch.topk(d_full, 10, dim=1, largest=False)
    assert (i == i_ref).float().mean() > 0.95
    assert_close(d.float(), d_ref, atol=1e-2, rtol=1e-2)


@pytest.mark.needs_cuda
def test_knn_memory_bounded_cuda():
    # The full 20k x 300k float32 distance matrix would take 24 GB.
    q = torch.randn(20000, 16, device="cuda")
    db = torch.randn(300000, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    d, i = metricops.knn(q, db, k=5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**30
    sample = torch.arange(0, 20000, 997, device="cuda")
    d_ref, i_ref = torch.topk(metricops.pairwise_distance(q[sample], db), 5, dim=1, largest=False)
    assert (i[sample] == i_ref).float().mean() > 0.95


# --------------------------------------------------------------------------- metrics


def test_average_precision_hand_computed():
    rel = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    nr = torch.tensor([4])  # one more relevant item beyond the first five
    ap = lambda div: retrieval.average_precision_at_k(rel, nr, 5, ap_divisor=div).item()  # noqa: E731
    s = 1 / 2 + 2 / 3 + 3 / 5
    assert ap("retrieved") == pytest.approx(53 / 90)
    assert ap("relevant") == pytest.approx(s / 4)
    assert ap("min_k_relevant") == pytest.approx(s / 4)
    assert retrieval.average_precision_at_k(
        rel, torch.tensor([7]), 5, ap_divisor="min_k_relevant"
    ).item() == pytest.approx(s / 5)
    assert retrieval.average_precision_at_k(rel, nr, 2).item() == pytest.approx(1 / 2)
    assert retrieval.average_precision_at_k(rel, nr, 1).item() == 0.0  # nothing relevant in the top 1
    assert retrieval.recall_at_k(rel, nr, 3).item() == pytest.approx(2 / 4)
    assert retrieval.precision_at_k(rel, nr, 3).item() == pytest.approx(2 / 3)
    assert retrieval.hit_at_k(rel, nr, 1).item() == 0.0 and retrieval.hit_at_k(rel, nr, 2).item() == 1.0
    # k larger than the ranking: missing ranks are not relevant
    assert retrieval.precision_at_k(rel, nr, 10).item() == pytest.approx(3 / 10)
    assert retrieval.recall_at_k(rel, nr, 10).item() == pytest.approx(3 / 4)
    # R = 4: first four ranks 0,1,1,0 -> (1/2 + 2/3) / 4 ; r_precision 2/4
    assert retrieval.map_at_r(rel, nr).item() == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert retrieval.r_precision(rel, nr).item() == pytest.approx(2 / 4)


def test_metrics_without_relevant_and_all_relevant():
    rel = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    nr = torch.tensor([0, 3, 1])  # the first query has nothing relevant: left out of the means
    assert retrieval.recall_at_k(rel, nr, 2).item() == pytest.approx((2 / 3 + 1) / 2)
    assert retrieval.map_at_r(rel, nr).item() == pytest.approx(1.0)
    assert retrieval.r_precision(rel, nr).item() == pytest.approx(1.0)
    assert retrieval.precision_at_k(rel, nr, 3).item() == pytest.approx((1 + 1 / 3) / 2)
    per_query = retrieval.recall_at_k(rel, nr, 2, reduction="none")
    assert per_query.tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    for div in retrieval.AP_DIVISORS:
        assert retrieval.average_precision_at_k(rel, nr, 3, ap_divisor=div).item() == pytest.approx(1.0)
    none, nothing = torch.tensor([0, 0, 0]), torch.zeros_like(rel)  # (hits beyond num_relevant are refused)
    assert retrieval.map_at_r(nothing, none).item() == 0.0 and retrieval.recall_at_k(nothing, none, 1).item() == 0.0


def test_large_num_relevant_and_k_allocate_nothing_extra():
    # Ranks past the ranking's end are not relevant: R or k far beyond it must not
    # pad the (Q, K) ranking to R or k columns (10**12 float64 columns are 8 TB).
    rel = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    huge = 10**12
    nr = torch.tensor([huge])
    assert retrieval.r_precision(rel, nr).item() == pytest.approx(3 / huge)
    assert retrieval.map_at_r(rel, nr).item() == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / huge)
    assert retrieval.precision_at_k(rel, None, huge).item() == pytest.approx(3 / huge)
    assert retrieval.recall_at_k(rel, None, huge).item() == 1.0
    assert retrieval.hit_at_k(rel, None, huge).item() == 1.0
    for div, den in (("retrieved", 3), ("relevant", huge), ("min_k_relevant", huge)):
        ap = retrieval.average_precision_at_k(rel, nr, huge, ap_divisor=div).item()
        assert ap == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / den)
    # An empty ranking (K = 0) scores 0 for every metric.
    empty = torch.zeros(2, 0, dtype=torch.bool)
    assert retrieval.average_precision_at_k(empty, torch.tensor([1, 2]), 3).item() == 0.0
    assert retrieval.map_at_r(empty, torch.tensor([1, 2])).item() == 0.0


SINGLE_METRICS = [
    lambda rel, nr: retrieval.precision_at_k(rel, nr, 2),
    lambda rel, nr: retrieval.recall_at_k(rel, nr, 5),
    lambda rel, nr: retrieval.hit_at_k(rel, nr, 1),
    lambda rel, nr: retrieval.average_precision_at_k(rel, nr, 3),
    lambda rel, nr: retrieval.map_at_r(rel, nr),
    lambda rel, nr: retrieval.r_precision(rel, nr),
]


@pytest.mark.parametrize("metric", SINGLE_METRICS)
def test_single_metrics_validate_relevance_and_num_relevant(metric):
    rel = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    # More relevant items in the ranking than num_relevant says exist (recall 3.0 before).
    with pytest.raises(ValueError, match="num_relevant must be at least the number of relevant items"):
        metric(rel, torch.tensor([1, 1]))
    # Graded or non-binary relevance (AP > 1 before), NaN included.
    for bad in (2.0, 0.5, -1.0, float("nan")):
        graded = rel.double()
        graded[0, 0] = bad
        with pytest.raises(ValueError, match=r"relevance must hold only 0 \(not relevant\) and 1 \(relevant\)"):
            metric(graded, torch.tensor([3, 1]))
    bad_counts = [[3.5, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0]]  # inf equals its floor
    for bad_nr in map(torch.tensor, bad_counts):
        with pytest.raises(ValueError, match=r"num_relevant must hold finite whole numbers >= 0"):
            metric(torch.zeros(2, 5), bad_nr)
    with pytest.raises(TypeError, match="num_relevant must be an integer or floating tensor, got torch.bool"):
        metric(rel, torch.tensor([True, True]))
    # Consistent inputs in every accepted dtype give the same score, all in [0, 1].
    nr = torch.tensor([4, 1])
    expected = metric(rel, nr)
    assert 0.0 <= expected.item() <= 1.0
    for same_rel, same_nr in ((rel.int(), nr), (rel.float(), nr.double()), (rel.double(), nr.int())):
        assert metric(same_rel, same_nr).item() == pytest.approx(expected.item())


def test_retrieval_metrics_hand_built():
    # 1-D points: the ranking of each query is fixed by construction.
    db = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    db_labels = torch.tensor([9, 7, 7, 9, 7, 5])
    q = torch.tensor([[0.0], [50.0]])
    q_labels = torch.tensor([7, 6])  # the second query has no relevant item
    out = metricops.retrieval_metrics(q, q_labels, db, db_labels, ks=(1, 5, 8), ap_divisor="retrieved")
    # query 0 ranks 0,1,1,0,1,0 -> AP@5 = 53/90
    assert out["map@5"] == pytest.approx(53 / 90)
    assert out["recall@5"] == pytest.approx(1.0) and out["recall@1"] == 0.0
    assert out["precision@5"] == pytest.approx(3 / 5) and out["precision@8"] == pytest.approx(3 / 8)
    assert out["hit@1"] == 0.0 and out["hit@5"] == 1.0
    assert out["map@r"] == pytest.approx((1 / 2 + 2 / 3) / 3) and out["r_precision"] == pytest.approx(2 / 3)
    assert out["num_queries"] == 2 and out["queries_without_relevant"] == 1
    rel_out = metricops.retrieval_metrics(q, q_labels, db, db_labels, ks=(5,), ap_divisor="relevant")
    assert rel_out["map@5"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    for div in retrieval.AP_DIVISORS:
        expected = reference.retrieval_metrics(q, q_labels, db, db_labels, ks=(1, 5, 8), ap_divisor=div)
        got = metricops.retrieval_metrics(q, q_labels, db, db_labels, ks=(1, 5, 8), ap_divisor=div)
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("self_search", [True, False])
@pytest.mark.parametrize("ap_divisor", ["retrieved", "relevant", "min_k_relevant"])
def test_retrieval_metrics_matches_reference(device, self_search, ap_divisor):
    q = torch.randn(60, 5, dtype=torch.float64, device=device)
    ql = torch.randint(0, 6, (60,), device=device)
    db = None if self_search else torch.randn(45, 5, dtype=torch.float64, device=device)
    dl = (
        None if self_search else torch.randint(0, 7, (45,), device=device)
    )  # label 6: queries without relevant in q? no: db only
    ql[0] = 99  # a query with no relevant item
    for metric in ("euclidean", "cosine"):
        got = metricops.retrieval_metrics(q, ql, db, dl, ks=(1, 3, 10, 50), metric=metric, ap_divisor=ap_divisor)
        expected = reference.retrieval_metrics(q, ql, db, dl, ks=(1, 3, 10, 50), metric=metric, ap_divisor=ap_divisor)
        assert got == pytest.approx(expected)
        assert got["queries_without_relevant"] >= 1


def test_retrieval_metrics_empty_cases():
    x = torch.randn(1, 3)
    out = metricops.retrieval_metrics(x, torch.tensor([1]))  # self-search of one point: nothing to rank
    assert out["num_queries"] == 1 and out["queries_without_relevant"] == 1 and out["map@r"] == 0.0
    out = metricops.retrieval_metrics(x[:0], torch.tensor([], dtype=torch.int64), x, torch.tensor([1]))
    assert out["num_queries"] == 0 and out["recall@1"] == 0.0


def test_against_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.retrieval")
    q = torch.randn(40, 6, dtype=torch.float64)
    db = torch.randn(120, 6, dtype=torch.float64)
    ql, dl = torch.randint(0, 8, (40,)), torch.randint(0, 8, (120,))
    d = metricops.pairwise_distance(q, db)
    for k in (1, 5, 20):
        out = metricops.retrieval_metrics(q, ql, db, dl, ks=(k,))
        aps, recalls = [], []
        for r in range(40):
            target = dl == ql[r]
            if not target.any():
                continue
            score = 1.0 / (1.0 + d[r])  # torchmetrics ignores targets whose score is <= 0
            aps.append(tm.retrieval_average_precision(score, target, top_k=k))
            recalls.append(tm.retrieval_recall(score, target, top_k=k))
        assert out[f"map@{k}"] == pytest.approx(torch.stack(aps).mean().item(), abs=1e-6)
        assert out[f"recall@{k}"] == pytest.approx(torch.stack(recalls).mean().item(), abs=1e-6)


def test_against_pytorch_metric_learning():
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x = torch.randn(150, 8)
    labels = torch.randint(0, 5, (150,))
    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision", "precision_at_1"), device=torch.device("cpu")
    )
    pml = calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)
    ours = metricops.retrieval_metrics(x, labels, ks=(1,))
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-5)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-5)
    assert ours["precision@1"] == pytest.approx(pml["precision_at_1"], abs=1e-5)


def test_knn_against_faiss():
    faiss = pytest.importorskip("faiss")
    q = torch.randn(50, 16)
    db = torch.randn(2000, 16)
    index = faiss.IndexFlatL2(16)
    index.add(db.numpy())
    d_f, i_f = index.search(q.numpy(), 10)
    d, i = metricops.knn(q, db, k=10, metric="sqeuclidean")
    assert (i.numpy() == i_f).mean() > 0.98  # float32 near-ties may swap
    assert_close(d, torch.from_numpy(d_f), atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------- bad input

_X = torch.randn(5, 3)
_L = torch.tensor([0, 1, 0, 1, 2])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: metricops.knn(_X, k=0), ValueError, "k must be between 1"),
        (lambda: metricops.knn(_X, k=-2), ValueError, "k must be between 1"),
        (lambda: metricops.knn(_X, k=5), ValueError, r"k must be .*self excluded.*got k=5"),
        (lambda: metricops.knn(_X, torch.randn(4, 3), k=5), ValueError, "k must be between 1.*got k=5"),
        (lambda: metricops.knn(_X, k=2.0), TypeError, "k must be an int"),
        (lambda: metricops.knn(_X, torch.randn(4, 2), k=1), ValueError, "database must have the same embedding size D"),
        (lambda: metricops.knn(_X, k=1, metric="manhattan"), ValueError, "metric must be one of"),
        (lambda: metricops.knn(_X.long(), k=1), TypeError, "queries must be float32 or float64"),
        (lambda: metricops.knn(_X, _X.double(), k=1), TypeError, "database must have the same dtype"),
        (lambda: metricops.knn(torch.randn(3), k=1), ValueError, "queries must be a 2-D tensor"),
        (lambda: metricops.knn(_X, k=1, progress="yes"), TypeError, "progress must be a bool"),
        (
            lambda: metricops.retrieval_metrics(_X, _L[:4]),
            ValueError,
            "query_labels must be a 1-D tensor of length B=5",
        ),
        (lambda: metricops.retrieval_metrics(_X, _L, _X, _L[:3]), ValueError, "database_labels must be a 1-D tensor"),
        (lambda: metricops.retrieval_metrics(_X, _L, _X), ValueError, "database_labels is None"),
        (lambda: metricops.retrieval_metrics(_X, _L, None, _L), ValueError, "database is None"),
        (lambda: metricops.retrieval_metrics(_X, _L.float()), TypeError, "query_labels must be int32 or int64"),
        (
            lambda: metricops.retrieval_metrics(_X, _L, torch.randn(5, 4), _L),
            ValueError,
            "database must have the same embedding size D",
        ),
        (lambda: metricops.retrieval_metrics(_X, _L, metric="l1"), ValueError, "metric must be one of"),
        (lambda: metricops.retrieval_metrics(_X, _L, ap_divisor="all"), ValueError, "ap_divisor must be one of"),
        (lambda: metricops.retrieval_metrics(_X, _L, ks=(0, 5)), ValueError, "ks must hold ints >= 1"),
        (lambda: metricops.retrieval_metrics(_X.half(), _L), TypeError, "queries must be float32 or float64"),
        (lambda: retrieval.average_precision_at_k(torch.ones(2, 3), None, 2, ap_divisor="x"), ValueError, "ap_divisor"),
        (lambda: retrieval.recall_at_k(torch.ones(2, 3), torch.ones(3), 2), ValueError, "num_relevant must have shape"),
        (lambda: retrieval.recall_at_k(torch.ones(2, 3), None, 0), ValueError, "k must be >= 1"),
        (lambda: retrieval.recall_at_k(torch.ones(3), None, 1), ValueError, "relevance must be a 2-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "args, match",
    [
        ((_X, None, 5, "euclidean", 0), "k must be between 1"),
        ((_X, None, 0, "euclidean", 0), "k must be between 1"),
        ((_X, torch.randn(4, 2), 1, "euclidean", 0), "same embedding size D"),
        ((_X.long(), None, 1, "euclidean", 0), "queries must be float32 or float64"),
        ((_X, None, 1, "manhattan", 0), "metric must be one of"),
        ((_X, None, 1, "euclidean", -1), "chunk_size must be >= 0"),
    ],
)
def test_bad_input_reaches_native_checks(args, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.metricops.knn(*args)


@pytest.mark.parametrize("threads", [1, 3])
def test_knn_thread_counts(threads):
    # The CPU kernel splits queries or database per thread (then merges the
    # per-thread top-k); the result must not depend on the thread count.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = torch.randint(-2, 3, (20, 3)).double()
        db = torch.randint(-2, 3, (90, 3)).double()
        db[5] = float("nan")
        for chunk, k in ((0, 7), (8, 7), (8, 90), (30, 40)):
            d, i = metricops.knn(q, db, k=k, _chunk_size=chunk)
            d_ref, i_ref = reference.knn(q, db, k=k)
            assert torch.equal(i, i_ref)
            assert_close(d, d_ref)
    finally:
        torch.set_num_threads(old)


def test_knn_property_exact_ties():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(
        q_rows=st.integers(1, 12),
        n_rows=st.integers(1, 30),
        dim=st.integers(0, 4),
        chunk=st.integers(0, 9),
        self_search=st.booleans(),
        metric=st.sampled_from(["euclidean", "sqeuclidean"]),
        seed=st.integers(0, 2**16),
        data=st.data(),
    )
    def check(q_rows, n_rows, dim, chunk, self_search, metric, seed, data):
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(-1, 2, (q_rows, dim), generator=g).double()  # few distinct points: many exact ties
        db = None if self_search else torch.randint(-1, 2, (n_rows, dim), generator=g).double()
        available = q_rows - 1 if self_search else n_rows
        hypothesis.assume(available >= 1)
        k = data.draw(st.integers(1, available))
        d, i = metricops.knn(q, db, k=k, metric=metric, _chunk_size=chunk)
        d_ref, i_ref = reference.knn(q, db, k=k, metric=metric)
        assert torch.equal(i, i_ref)
        assert_close(d, d_ref)

    check()
