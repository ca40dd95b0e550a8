"""Reference k-nearest-neighbour retrieval and its metrics."""

from __future__ import annotations

from typing import Optional

import torch

from .distance import pairwise_distance


def knn(queries: torch.Tensor, database: Optional[torch.Tensor] = None, *, k: int, metric: str = "euclidean") -> tuple:
    """Reference for :func:`metricops.knn`: all distances, then a stable sort.

    torch.sort puts NaN last, and a stable sort of the columns in index order
    breaks ties by the lower index, which is exactly knn's order.
    """
    self_search = database is None
    d = pairwise_distance(queries, database, metric=metric)
    # A NaN coordinate makes every distance of its row NaN (pairwise_distance's
    # reference maps a NaN squared distance to 0 under its safe sqrt).
    db = queries if self_search else database
    nan_pair = torch.isnan(queries).any(dim=1)[:, None] | torch.isnan(db).any(dim=1)[None, :]
    d = torch.where(nan_pair, torch.full_like(d, float("nan")), d)
    q, n = d.shape
    idx = torch.arange(n, device=d.device).expand(q, n)
    if self_search:  # drop each query's own column
        keep = ~torch.eye(q, dtype=torch.bool, device=d.device)
        d = d[keep].view(q, n - 1)
        idx = idx[keep].view(q, n - 1)
    if not 1 <= k <= d.shape[1]:
        raise ValueError(f"k must be between 1 and {d.shape[1]}, got k={k}")
    d_sorted, order = torch.sort(d, dim=1, stable=True)
    return d_sorted[:, :k], torch.gather(idx, 1, order[:, :k])


def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    database: Optional[torch.Tensor] = None,
    database_labels: Optional[torch.Tensor] = None,
    *,
    ks=(1, 5, 10),
    metric: str = "euclidean",
    ap_divisor: str = "retrieved",
) -> dict:
    """Reference for :func:`metricops.retrieval_metrics`: a full ranking and a loop per query."""
    self_search = database is None
    if self_search:
        database, database_labels = queries, query_labels
    n = database.shape[0] - (1 if self_search else 0)
    sums = {}
    counted = 0
    without = 0
    ranking = knn(queries, None if self_search else database, k=n, metric=metric)[1] if n > 0 else None
    for qi in range(queries.shape[0]):
        label = query_labels[qi].item()
        r = sum(
            1 for j in range(database.shape[0]) if database_labels[j].item() == label and not (self_search and j == qi)
        )
        if r == 0:
            without += 1
            continue
        counted += 1
        rel = [database_labels[j].item() == label for j in ranking[qi].tolist()] if ranking is not None else []

        def rel_at(i):  # 1-based rank; ranks past the end are not relevant
            return 1.0 if i <= len(rel) and rel[i - 1] else 0.0

        def hits(upto):
            return sum(rel_at(i) for i in range(1, upto + 1))

        scores = {}
        for k in ks:
            h = hits(k)
            ap_sum = sum(rel_at(i) * hits(i) / i for i in range(1, k + 1))
            divisor = {"retrieved": h, "relevant": r, "min_k_relevant": min(k, r)}[ap_divisor]
            scores[f"recall@{k}"] = h / r
            scores[f"map@{k}"] = ap_sum / divisor if h > 0 else 0.0
            scores[f"precision@{k}"] = h / k
            scores[f"hit@{k}"] = 1.0 if h > 0 else 0.0
        scores["map@r"] = sum(rel_at(i) * hits(i) / i for i in range(1, r + 1)) / r
        scores["r_precision"] = hits(r) / r
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + value
    out = {}
    for k in ks:
        for name in ("recall", "map", "precision", "hit"):
            out[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) / counted if counted else 0.0
    out["map@r"] = sums.get("map@r", 0.0) / counted if counted else 0.0
    out["r_precision"] = sums.get("r_precision", 0.0) / counted if counted else 0.0
    out["num_queries"] = queries.shape[0]
    out["queries_without_relevant"] = without
    return out
