"""Plain-PyTorch reference implementations: the ground truth for tests.

Written for clarity, not speed (some use O(B³) memory); every native op is
checked against these in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) at 0."""
    positive = sq > 0
    rest = torch.where(torch.isnan(sq), sq, torch.zeros_like(sq))  # NaN stays NaN
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), rest)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ row-wise, with zero rows mapped to zero (and zero gradient)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    nonzero = norm != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return x * inv


def pairwise_distance(
    x: torch.Tensor, y: Optional[torch.Tensor] = None, *, metric: str = "euclidean", normalize: bool = False
) -> torch.Tensor:
    """Reference for :func:`metricops.pairwise_distance`, by explicit differences."""
    self_distance = y is None
    if normalize:
        x = F.normalize(x, p=2, dim=1)
        y = None if y is None else F.normalize(y, p=2, dim=1)
    if y is None:
        y = x
    if metric in ("euclidean", "sqeuclidean"):
        diff = x[:, None, :] - y[None, :, :]
        sq = (diff * diff).sum(-1)
        d = _safe_sqrt(sq) if metric == "euclidean" else sq
        if self_distance:
            d = d * (1 - torch.eye(x.shape[0], dtype=d.dtype, device=d.device))
        return d
    if metric == "cosine":
        # 1 − cos = ‖x̂ − ŷ‖²/2 from explicit differences (exactly 0 for parallel
        # rows, never negative); below the resolution of the normalised rows,
        # tol², it is 0; cos with a zero row is 0 (distance 1).
        ux, uy = _unit_rows(x), _unit_rows(y)
        diff = ux[:, None, :] - uy[None, :, :]
        half_sq = 0.5 * (diff * diff).sum(-1)
        tol = (2 * x.shape[1] + 8) * torch.finfo(x.dtype).eps
        half_sq = torch.where(half_sq <= tol * tol, torch.zeros_like(half_sq), half_sq)
        zero_row = (torch.linalg.vector_norm(x, dim=1) == 0)[:, None] | (torch.linalg.vector_norm(y, dim=1) == 0)[
            None, :
        ]
        return torch.where(zero_row, torch.ones_like(half_sq), half_sq)
    raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")


# --------------------------------------------------------------------------
# Triplet losses and mining on a labelled batch (O(B³) memory: small inputs).
# --------------------------------------------------------------------------


def _triplet_masks(labels: torch.Tensor):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive (a != p, same label), negative


def _reduce(terms: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(int(valid.sum()), 1)
    if reduction == "mean_nonzero":
        return terms.sum() / max(int((terms > 0).sum()), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def batch_hard_triplet_loss(
    embeddings, labels, *, margin=0.2, metric="euclidean", soft=False, normalize=False, reduction="mean", memory="auto"
):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos.any(1) & neg.any(1)
    if d.shape[0] == 0:  # max over an empty dim is undefined
        return _reduce(d.sum(1), valid, reduction)
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    hardest_pos = torch.where(pos, d, -inf).max(1).values
    hardest_neg = torch.where(neg, d, inf).min(1).values
    if soft:
        terms = F.softplus(hardest_pos - hardest_neg)
    else:
        terms = F.relu(margin + hardest_pos - hardest_neg)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def _semihard_negative_distances(d, pos, neg):
    """(B, B) distance d[a, n*(a, p)] under the TensorFlow-Addons rule."""
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    d_an = d[:, None, :]  # (a, ., n)
    d_ap = d[:, :, None]  # (a, p, .)
    candidate = neg[:, None, :] & (d_an > d_ap)  # farther than the positive
    nearest_farther = torch.where(candidate, d_an, inf).min(-1).values
    farthest = torch.where(neg, d, -inf).max(-1).values[:, None].expand_as(d)
    return torch.where(candidate.any(-1), nearest_farther, farthest)


def semihard_triplet_loss(embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False, reduction="mean"):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos & neg.any(1)[:, None]
    if d.shape[0] == 0:
        return _reduce(d, valid, reduction)
    d_an_star = _semihard_negative_distances(d, pos, neg)
    terms = F.relu(margin + d - d_an_star)
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def semihard_negatives(embeddings, labels, *, metric="euclidean", normalize=False):
    """(B, B) int64 index n*(a, p) (-1 off valid pairs), ties to the lowest index."""
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    B = d.shape[0]
    out = torch.full((B, B), -1, dtype=torch.int64, device=d.device)
    for a in range(B):
        negs = [n for n in range(B) if neg[a, n]]
        if not negs:
            continue
        for p in range(B):
            if not pos[a, p]:
                continue
            farther = [n for n in negs if d[a, n] > d[a, p]]
            if farther:
                out[a, p] = min(farther, key=lambda n: (float(d[a, n]), n))
            else:
                out[a, p] = min(negs, key=lambda n: (-float(d[a, n]), n))
    return out


def _all_triplets(embeddings, labels, metric, normalize):
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    pos, neg = _triplet_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # (a, p, n)
    return d, valid


def batch_all_triplet_loss(
    embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False, reduction="mean_nonzero"
):
    if reduction == "none":
        raise ValueError("reduction must be one of 'mean', 'sum', 'mean_nonzero', got 'none'")
    d, valid = _all_triplets(embeddings, labels, metric, normalize)
    terms = F.relu(margin + d[:, :, None] - d[:, None, :])
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce(terms, valid, reduction)


def triplet_statistics(embeddings, labels, *, margin=0.2, metric="euclidean", normalize=False):
    with torch.no_grad():
        d, valid = _all_triplets(embeddings, labels, metric, normalize)
        m = d[:, None, :] - d[:, :, None]  # d[a, n] - d[a, p]
        count = lambda mask: (valid & mask).sum().to(torch.int64)  # noqa: E731
        return {
            "total": valid.sum().to(torch.int64),
            "easy": count(m > margin),
            "semihard": count((m > 0) & (m <= margin)),
            "hard": count(m <= 0),
        }


def mine_triplets(embeddings, labels, *, strategy, margin=0.2, metric="euclidean", normalize=False):
    with torch.no_grad():
        d, valid = _all_triplets(embeddings, labels, metric, normalize)
        if strategy == "batch_hard":
            pos, neg = _triplet_masks(labels)
            inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
            anchors = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
            if d.shape[0] == 0:
                return anchors, anchors.clone(), anchors.clone()
            p = torch.where(pos, d, -inf).argmax(1)[anchors]
            n = torch.where(neg, d, inf).argmin(1)[anchors]
            return anchors, p, n
        m = d[:, None, :] - d[:, :, None]
        select = {
            "all": torch.ones_like(valid),
            "violating": m <= margin,
            "semihard": (m > 0) & (m <= margin),
            "hard": m <= 0,
            "easy": m > margin,
        }[strategy]
        a, p, n = torch.nonzero(valid & select, as_tuple=True)
        return a, p, n


def _reduce_terms(terms: torch.Tensor, reduction: str, count: int) -> torch.Tensor:
    """mean over `count` items, sum, mean over terms > 0, or none; 0 when there is no item."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(count, 1)
    if reduction == "mean_nonzero":
        return terms.sum() / (terms > 0).sum().clamp_min(1).to(terms.dtype)
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got {reduction!r}")


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference for :func:`metricops.contrastive_loss`: explicit (B, B) terms, masked."""
    b = embeddings.shape[0]
    d = pairwise_distance(embeddings, metric=metric, normalize=normalize)
    same = labels[:, None] == labels[None, :]
    terms = torch.where(same, F.relu(d - pos_margin), F.relu(neg_margin - d))
    if squared:
        terms = terms * terms
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=embeddings.device)
    terms = torch.where(off_diagonal, terms, torch.zeros_like(terms))
    return _reduce_terms(terms, reduction, b * (b - 1))


def _row_distance(x0: torch.Tensor, x1: torch.Tensor, metric: str) -> torch.Tensor:
    if metric in ("euclidean", "sqeuclidean"):
        diff = x0 - x1
        sq = (diff * diff).sum(-1)
        return _safe_sqrt(sq) if metric == "euclidean" else sq
    if metric == "cosine":
        return 1 - (_unit_rows(x0) * _unit_rows(x1)).sum(-1)
    raise ValueError(f"metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got {metric!r}")


def pair_contrastive_loss(
    x0: torch.Tensor,
    x1: torch.Tensor,
    y: torch.Tensor,
    *,
    margin: float = 1.0,
    metric: str = "euclidean",
    squared: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference for :func:`metricops.pair_contrastive_loss`: y·d^q + (1−y)·relu(margin − d)^q."""
    d = _row_distance(x0, x1, metric)
    yf = y.to(d.dtype)
    q = 2 if squared else 1
    terms = yf * d**q + (1 - yf) * F.relu(margin - d) ** q
    return _reduce_terms(terms, reduction, x0.shape[0])


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 1.0,
    p: float = 2.0,
    eps: float = 1e-6,
    swap: bool = False,
    reduction: str = "mean",
    squared: bool = False,
) -> torch.Tensor:
    """Reference for :func:`metricops.triplet_margin_loss`, written out as torch's formula.

    Distances are ‖x − y + eps‖_p (torch's pairwise_distance) or, with
    squared=True, ‖x − y‖² without eps.
    """

    def dist(x, y):
        if squared:
            diff = x - y
            return (diff * diff).sum(-1)
        return torch.linalg.vector_norm(x - y + eps, ord=p, dim=-1)

    d_ap = dist(anchor, positive)
    d_an = dist(anchor, negative)
    if swap:
        d_an = torch.minimum(d_an, dist(positive, negative))
    terms = torch.clamp_min(margin + d_ap - d_an, 0)
    if reduction == "mean" and terms.numel() > 0:
        return terms.mean()
    return _reduce_terms(terms, reduction, terms.numel())


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
