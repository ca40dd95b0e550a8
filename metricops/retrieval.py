"""Retrieval: exact k-nearest-neighbour search and retrieval metrics.

``knn`` is a native operator that fuses the distance GEMM with a running
top-k, chunked over queries and database, so its memory is O(Q·k + chunk)
however large Q × N is. ``retrieval_metrics`` ranks the database with it and
scores the ranking with the single-metric functions below, which take a ranked
relevance matrix and also work with a search of your own (e.g. faiss):

    relevance = db_labels[indices] == query_labels[:, None]   # (Q, K), rank order
    num_relevant = ...                                          # (Q,) relevant items per query
    metricops.retrieval.average_precision_at_k(relevance, num_relevant, 10)

Conventions of the single-metric functions: ``relevance`` is a bool, integer or
float ``(Q, K)`` tensor of 0s and 1s whose column ``i`` is the item ranked ``i + 1``;
ranks beyond ``K`` count as not relevant (a k or R past ``K`` costs no memory).
``num_relevant`` is the ``(Q,)`` number of relevant items in the whole database,
whole numbers at least each row's sum (``None``: the row sums of ``relevance``,
i.e. the ranking covers the whole database); other values raise ``ValueError``.
A query with ``num_relevant == 0`` has no defined score: with ``reduction="none"``
it scores 0, and ``reduction="mean"`` leaves it out of the mean (0.0 when no
query has a relevant item); nothing is ever divided by zero.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from . import _validation as v
from ._ops import ops

__all__ = [
    "knn",
    "retrieval_metrics",
    "precision_at_k",
    "recall_at_k",
    "hit_at_k",
    "average_precision_at_k",
    "map_at_r",
    "r_precision",
    "AP_DIVISORS",
]

AP_DIVISORS = ("retrieved", "relevant", "min_k_relevant")

# Query rows per native call when progress=True. Without a progress bar the
# whole search is one native call (it chunks internally, and stays one node
# under torch.compile); with one, Python splits the queries so that the bar
# can advance between calls. 1024 rows keep each call GEMM-efficient.
_PROGRESS_QUERY_CHUNK = 1024


def knn(
    queries: torch.Tensor,
    database: Optional[torch.Tensor] = None,
    *,
    k: int,
    metric: str = "euclidean",
    progress: bool = False,
    _chunk_size: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every query row among the database rows.

    Args:
        queries: ``(Q, D)`` floating tensor (float32/float64; also float16/bfloat16
            on CUDA, ranked in float32 and returned in the input dtype).
        database: ``(N, D)`` tensor on the same device with the same dtype, or
            ``None`` to search the queries against themselves; then query ``i``
            never returns index ``i``.
        k: neighbours per query, ``1 <= k <= N`` (``N - 1`` when ``database`` is None).
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"`` (as in
            :func:`metricops.pairwise_distance`; smaller is closer).
        progress: show a tqdm bar over chunks of queries (for long searches).

    Returns:
        ``(distances, indices)``, both ``(Q, k)``: distances in the input dtype and
        int64 database indices, sorted by distance ascending with ties broken by
        the lower index. A NaN distance (NaN in the inputs) counts as larger than
        any number, +inf included: NaN results come last, ordered by index, and
        every index is a valid database row.

    Not differentiable: the inputs are detached and the outputs carry no
    gradient (gather distances from :func:`metricops.pairwise_distance` or your
    own computation at the returned indices if you need one).

    Memory is O(Q·k + chunk): the Q × N distance matrix is computed block by
    block (one GEMM per block) and never materialized. (On CPU, a search with
    few queries splits the database over threads, each with its own Q × k
    top-k, merged at the end.)
    """
    v.check_embeddings_pair(queries, "queries", database, "database")
    v.check_metric(metric)
    v.check_flag(progress, "progress")
    n = max(queries.shape[0] - 1, 0) if database is None else database.shape[0]  # (empty self-search: 0)
    k = _check_k(k, n, self_excluded=database is None)
    queries = queries.detach()
    database = None if database is None else database.detach()
    if not progress or queries.shape[0] <= _PROGRESS_QUERY_CHUNK:
        return ops.knn(queries, database, k, metric, _chunk_size)
    return _knn_with_progress(queries, database, k, metric, _chunk_size)


def _knn_with_progress(queries, database, k, metric, chunk_size):
    from tqdm.auto import tqdm

    self_search = database is None
    db = queries if self_search else database
    # A chunk of queries is searched against the whole (explicit) database.
    # For self-search it asks for k + 1 and drops the query itself: the top k
    # of "everything but i" is the top k + 1 of everything without i when i is
    # among them, and its first k otherwise (the (distance, index) order is total).
    kk = k + 1 if self_search else k
    dists, idxs = [], []
    q_total = queries.shape[0]
    with tqdm(total=q_total, desc="knn", unit="query") as bar:
        for q0 in range(0, q_total, _PROGRESS_QUERY_CHUNK):
            chunk = queries[q0 : q0 + _PROGRESS_QUERY_CHUNK]
            d, i = ops.knn(chunk, db, kk, metric, chunk_size)
            if self_search:
                rows = torch.arange(q0, q0 + chunk.shape[0], device=i.device)
                drop = i == rows[:, None]
                drop[:, -1] |= ~drop.any(dim=1)  # self not in the top k + 1: drop the last
                keep = ~drop
                d = d[keep].view(chunk.shape[0], k)
                i = i[keep].view(chunk.shape[0], k)
            dists.append(d)
            idxs.append(i)
            bar.update(chunk.shape[0])
    return torch.cat(dists), torch.cat(idxs)


def _check_k(k, n: int, *, self_excluded: bool = False, name: str = "k") -> int:
    k = v.check_int(k, name)
    if k < 1 or k > n:
        # Same wording as the C++ check and the fake kernel.
        what = ", self excluded" if self_excluded else ""
        raise ValueError(
            f"{name} must be between 1 and the number of database rows a query can return ({n}{what}), got {name}={k}"
        )
    return k


# --------------------------------------------------------------------------
# Single metrics on a ranked relevance matrix
# --------------------------------------------------------------------------


def _prepare(relevance, num_relevant, k, name_k="k"):
    """(relevance as float64 truncated to its first k columns (all when k is None), num_relevant as float64).

    Validated as retrieval_metrics' own inputs are: relevance holds only 0 and 1,
    num_relevant whole numbers >= 0 and at least the relevant items the ranking
    holds. Ranks past the ranking's end are not relevant, so a k beyond it needs no
    padding: every metric below sums over the ranks it has (memory O(Q·K) for any k).
    """
    v.check_tensor(relevance, "relevance")
    if relevance.dim() != 2:
        raise ValueError(f"relevance must be a 2-D (Q, K) tensor in rank order, got shape {tuple(relevance.shape)}")
    if relevance.is_complex():
        raise TypeError(f"relevance must be a bool, integer or floating tensor, got {relevance.dtype}")
    rel = relevance.to(torch.float64)
    checking = not torch.compiler.is_compiling() and rel.device.type != "meta"
    if checking and rel.numel() > 0 and not bool(((rel == 0) | (rel == 1)).all()):
        raise ValueError("relevance must hold only 0 (not relevant) and 1 (relevant)")
    hits = rel.sum(dim=1)
    if num_relevant is None:
        num_relevant = hits
    else:
        v.check_tensor(num_relevant, "num_relevant")
        if num_relevant.shape != (rel.shape[0],):
            raise ValueError(
                f"num_relevant must have shape (Q,) = ({rel.shape[0]},) matching relevance, got {tuple(num_relevant.shape)}"
            )
        if num_relevant.is_complex() or num_relevant.dtype == torch.bool:
            raise TypeError(f"num_relevant must be an integer or floating tensor, got {num_relevant.dtype}")
        num_relevant = num_relevant.to(device=rel.device, dtype=torch.float64)
        if checking and num_relevant.numel() > 0:
            whole = (num_relevant >= 0) & (num_relevant == num_relevant.floor()) & torch.isfinite(num_relevant)
            if not bool(whole.all()):  # (inf equals its floor)
                raise ValueError("num_relevant must hold finite whole numbers >= 0 (relevant items per query)")
            if not bool((hits <= num_relevant).all()):
                raise ValueError(
                    "num_relevant must be at least the number of relevant items in each row of relevance "
                    "(it counts every relevant item in the database)"
                )
    if k is not None:
        k = v.check_int(k, name_k, min_value=1)
        rel = rel[:, :k]
    return rel, num_relevant, k


def _safe_div(num, den):
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _reduce(scores, num_relevant, reduction):
    v.check_reduction(reduction, ("mean", "none"))
    if reduction == "none":
        return scores
    valid = num_relevant > 0
    if not bool(valid.any()):
        return scores.new_zeros(())
    return scores[valid].mean()


def precision_at_k(relevance, num_relevant=None, k: int = 1, *, reduction: str = "mean") -> torch.Tensor:
    """Precision@k: relevant items among the first k, divided by k."""
    rel, nr, k = _prepare(relevance, num_relevant, k)
    return _reduce(rel.sum(dim=1) / k, nr, reduction)


def recall_at_k(relevance, num_relevant=None, k: int = 1, *, reduction: str = "mean") -> torch.Tensor:
    """Recall@k: relevant items among the first k, divided by all relevant items."""
    rel, nr, _ = _prepare(relevance, num_relevant, k)
    return _reduce(_safe_div(rel.sum(dim=1), nr), nr, reduction)


def hit_at_k(relevance, num_relevant=None, k: int = 1, *, reduction: str = "mean") -> torch.Tensor:
    """Hit@k: 1 if any of the first k is relevant (what metric-learning papers call Recall@K)."""
    rel, nr, _ = _prepare(relevance, num_relevant, k)
    return _reduce((rel.sum(dim=1) > 0).to(rel.dtype), nr, reduction)


def average_precision_at_k(
    relevance, num_relevant=None, k: int = 10, *, ap_divisor: str = "retrieved", reduction: str = "mean"
) -> torch.Tensor:
    """AP@k = Σ_{i≤k} rel_i · P@i / divisor, and 0 when the first k hold nothing relevant.

    ``ap_divisor``: ``"retrieved"`` (the relevant items among the first k; torchmetrics,
    OML), ``"relevant"`` (all relevant items R; pytorch-metric-learning's
    ``mean_average_precision``) or ``"min_k_relevant"`` (min(k, R)).
    The ranking 0, 1, 1, 0, 1 gives AP@5 = (1/2 + 2/3 + 3/5) / 3 = 53/90.
    """
    if not isinstance(ap_divisor, str) or ap_divisor not in AP_DIVISORS:
        raise ValueError(f"ap_divisor must be one of {', '.join(map(repr, AP_DIVISORS))}, got {ap_divisor!r}")
    rel, nr, k = _prepare(relevance, num_relevant, k)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
    hits = rel.cumsum(dim=1)
    summed = (rel * hits / ranks).sum(dim=1)
    if ap_divisor == "retrieved":
        den = rel.sum(dim=1)
    elif ap_divisor == "relevant":
        den = nr
    else:
        den = torch.clamp(nr, max=k)
    return _reduce(_safe_div(summed, den), nr, reduction)


def _top_r(rel, nr):
    """Relevance masked to each query's first R ranks (R = num_relevant), and the ranks 1..K.

    Ranks past the ranking's end are not relevant, so nothing is padded to R:
    memory stays O(Q·K) however large R is.
    """
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
    return rel * (ranks <= nr[:, None]), ranks


def map_at_r(relevance, num_relevant=None, *, reduction: str = "mean") -> torch.Tensor:
    """MAP@R ("A Metric Learning Reality Check"): Σ_{i≤R} rel_i · P@i / R, R = num_relevant.

    Ranks past ``relevance``'s last column count as not relevant, so the score is
    exact when ``relevance`` covers each query's first R ranks (more columns are ignored).
    """
    rel, nr, _ = _prepare(relevance, num_relevant, None)
    rel, ranks = _top_r(rel, nr)
    summed = (rel * rel.cumsum(dim=1) / ranks).sum(dim=1)
    return _reduce(_safe_div(summed, nr), nr, reduction)


def r_precision(relevance, num_relevant=None, *, reduction: str = "mean") -> torch.Tensor:
    """R-precision: relevant items among the first R, divided by R (R = num_relevant).

    Ranks past ``relevance``'s last column count as not relevant, as for :func:`map_at_r`.
    """
    rel, nr, _ = _prepare(relevance, num_relevant, None)
    rel, _ = _top_r(rel, nr)
    return _reduce(_safe_div(rel.sum(dim=1), nr), nr, reduction)


# --------------------------------------------------------------------------
# All metrics from embeddings
# --------------------------------------------------------------------------


def _count_relevant(query_labels: torch.Tensor, database_labels: torch.Tensor, self_excluded: bool) -> torch.Tensor:
    """(Q,) int64: database items sharing each query's label (itself left out when self_excluded)."""
    uniq, counts = torch.unique(database_labels.to(torch.int64), return_counts=True)
    ql = query_labels.to(torch.int64)
    if uniq.numel() == 0:
        return torch.zeros_like(ql)
    pos = torch.searchsorted(uniq, ql).clamp(max=uniq.numel() - 1)
    found = uniq[pos] == ql
    num = torch.where(found, counts[pos], torch.zeros_like(counts[pos]))
    return num - 1 if self_excluded else num


def _check_ks(ks) -> Tuple[int, ...]:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be an iterable of ints, got {type(ks).__name__}") from None
    checked = []
    for k in ks:
        try:
            checked.append(v.check_int(k, "ks", min_value=1))
        except (TypeError, ValueError):
            raise ValueError(f"ks must hold ints >= 1, got {k!r} in ks={ks}") from None
    return tuple(checked)


def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    database: Optional[torch.Tensor] = None,
    database_labels: Optional[torch.Tensor] = None,
    *,
    ks: Iterable[int] = (1, 5, 10),
    metric: str = "euclidean",
    ap_divisor: str = "retrieved",
    progress: bool = False,
) -> Dict[str, float]:
    """Retrieval quality of embeddings: each query ranks the database by distance.

    A relevant item has the query's label. ``database=None`` searches the queries
    against themselves, each query leaving itself out.

    Returns a dict of floats: ``recall@k``, ``map@k`` (AP@k with ``ap_divisor``, see
    :func:`average_precision_at_k`), ``precision@k`` and ``hit@k`` for each k in
    ``ks``; ``map@r`` and ``r_precision``; and two ints, ``num_queries`` and
    ``queries_without_relevant``. Queries without any relevant item are left out
    of every mean (a metric is 0.0 when no query has one). A k larger than the
    database ranks everything, and the ranks past its end count as not relevant
    (precision@k still divides by k).

    The ranking comes from :func:`knn` (ties broken by the lower index) with
    k = the larger of max(ks) and the largest R, bounded by the database size,
    so memory is O(Q · that k) for the ranking plus the search's chunk.
    """
    v.check_embeddings(queries, "queries")
    v.check_labels(query_labels, queries, "query_labels", "queries")
    if (database is None) != (database_labels is None):
        missing = "database_labels" if database_labels is None else "database"
        raise ValueError(f"database and database_labels must be given together; {missing} is None")
    if database is not None:
        v.check_embeddings_pair(queries, "queries", database, "database")
        v.check_labels(database_labels, database, "database_labels", "database")
    v.check_metric(metric)
    ks = _check_ks(ks)
    if not isinstance(ap_divisor, str) or ap_divisor not in AP_DIVISORS:
        raise ValueError(f"ap_divisor must be one of {', '.join(map(repr, AP_DIVISORS))}, got {ap_divisor!r}")
    v.check_flag(progress, "progress")

    self_search = database is None
    db_labels = query_labels if self_search else database_labels
    n_avail = queries.shape[0] - 1 if self_search else database.shape[0]
    num_relevant = _count_relevant(query_labels, db_labels, self_search)
    q = queries.shape[0]
    depth = 0
    if q > 0 and n_avail > 0:
        depth = min(n_avail, max(max(ks, default=1), int(num_relevant.max().item())))
    if depth > 0:
        _, indices = knn(queries, database, k=depth, metric=metric, progress=progress)
        relevance = db_labels[indices] == query_labels[:, None]
    else:
        relevance = torch.zeros(q, 0, dtype=torch.bool, device=queries.device)

    out: Dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(relevance, num_relevant, k).item()
        out[f"map@{k}"] = average_precision_at_k(relevance, num_relevant, k, ap_divisor=ap_divisor).item()
        out[f"precision@{k}"] = precision_at_k(relevance, num_relevant, k).item()
        out[f"hit@{k}"] = hit_at_k(relevance, num_relevant, k).item()
    out["map@r"] = map_at_r(relevance, num_relevant).item()
    out["r_precision"] = r_precision(relevance, num_relevant).item()
    out["num_queries"] = int(q)
    out["queries_without_relevant"] = int((num_relevant <= 0).sum().item())
    return out
