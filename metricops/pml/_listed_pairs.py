"""Listed pairs (an ``indices_tuple``) for the similarity drop-ins: torch ops over the listed (anchor, other)
pairs only, O(#pairs) memory: each pair's similarity or distance by a chunked gather, per-row log-sum-exps by
segment reductions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distances import BaseDistance, CosineSimilarity

# Elements (rows × R) of one block of PML's matrix on the dense path.
_DENSE_BLOCK_ELEMENTS = 2**20
# Elements (pairs × D) gathered at once by _pair_values.
_GATHER_ELEMENTS = 2**22


class _PairValues(torch.autograd.Function):
    """s_k = <x[i_k], y[j_k]> (kind "dot"), ‖x[i_k] − y[j_k]‖ ("euclidean", gradient 0 at 0) or its square
    ("sqeuclidean"), gathered in chunks so that neither pass holds more than a chunk of (pairs, D) rows."""

    @staticmethod
    def forward(ctx, x, y, i, j, kind):
        ctx.save_for_backward(x, y, i, j)
        ctx.kind = kind
        out = torch.empty(i.shape[0], dtype=x.dtype, device=x.device)
        step = max(1, _GATHER_ELEMENTS // max(1, x.shape[1]))
        for start in range(0, i.shape[0], step):
            xi, yj = x[i[start : start + step]], y[j[start : start + step]]
            if kind == "dot":
                val = (xi * yj).sum(dim=1)
            else:
                val = ((xi - yj) ** 2).sum(dim=1)
                if kind == "euclidean":
                    val = val.sqrt()
            out[start : start + step] = val
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, i, j = ctx.saved_tensors
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gy = torch.zeros_like(y) if ctx.needs_input_grad[1] else None
        step = max(1, _GATHER_ELEMENTS // max(1, x.shape[1]))
        for start in range(0, i.shape[0], step):
            ii, jj = i[start : start + step], j[start : start + step]
            g = grad[start : start + step, None]
            xi, yj = x[ii], y[jj]
            if ctx.kind == "dot":
                dxi, dyj = g * yj, g * xi
            else:
                diff = xi - yj
                if ctx.kind == "euclidean":
                    norm = diff.norm(dim=1, keepdim=True)
                    g = torch.where(norm > 0, g / torch.where(norm > 0, norm, torch.ones_like(norm)), 0.0)
                else:
                    g = 2 * g
                dxi, dyj = g * diff, -g * diff
            if gx is not None:
                gx.index_add_(0, ii, dxi)
            if gy is not None:
                gy.index_add_(0, jj, dyj)
        return gx, gy, None, None, None


def _pair_values(distance: BaseDistance, x, y, i, j):
    """PML's ``distance(x, y)[i, j]`` for the listed pairs only (CosineSimilarity: the cosine similarity)."""
    if isinstance(distance, CosineSimilarity):
        x, y = F.normalize(x, p=2, dim=1), F.normalize(y, p=2, dim=1)
        kind = "dot"
    else:
        if distance.normalize_embeddings:
            x, y = F.normalize(x, p=2, dim=1), F.normalize(y, p=2, dim=1)
        kind = "euclidean" if distance.power == 1 else "sqeuclidean"
    return _PairValues.apply(x, y, i, j, kind)


def _segment_lse(values, rows, n_rows: int, *, add_one: bool = False, empty: float = 0.0):
    """Per row, log-sum-exp of the ``values`` whose ``rows`` entry is that row (log(1 + Σ) with
    ``add_one``); ``empty`` for a row without values (PML: 0)."""
    neg_inf = torch.full((n_rows,), float("-inf"), dtype=values.dtype, device=values.device)
    row_max = neg_inf.scatter_reduce(0, rows, values.detach(), reduce="amax", include_self=True)
    if add_one:
        row_max = row_max.clamp_min(0)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, rows, torch.exp(values - shift[rows]))
    if add_one:
        sums = sums + torch.exp(-shift)
    counts = torch.zeros(n_rows, dtype=torch.int64, device=values.device).index_add(0, rows, torch.ones_like(rows))
    out = torch.log(torch.where(counts > 0, sums, torch.ones_like(sums))) + shift
    return torch.where(counts > 0, out, torch.full_like(out, empty)), counts


def _unique_pairs(a, b, n_cols: int):
    """The distinct (a, b) pairs (PML's masks: a pair listed twice counts once), in row-major order."""
    if a.numel() == 0:
        return a, b
    key = torch.unique(a * n_cols + b)
    return key // n_cols, key % n_cols


def _pair_blocks(labels, ref_labels, n_cols: int):
    """All pairs from labels in row blocks: [(rows, (a1, p, a2, n) with a1/a2 local to the block)], and the
    numbers of positive and negative pairs. (i, i) is no pair when the reference labels are the batch's own
    (PML: ``ref_labels is labels``)."""
    self_ref = ref_labels is None or ref_labels is labels
    ref_lab = labels if ref_labels is None else ref_labels
    b = labels.shape[0]
    step = max(1, _DENSE_BLOCK_ELEMENTS // max(1, n_cols))
    blocks, n_pos, n_neg = [], 0, 0
    for start in range(0, b, step):
        rows = torch.arange(start, min(start + step, b), device=labels.device)
        same = labels[rows, None] == ref_lab[None, :]
        matches = same.clone()
        if self_ref:
            matches[torch.arange(len(rows), device=rows.device), rows] = False
        a1, p = torch.where(matches)
        a2, n = torch.where(~same)
        blocks.append((rows, (a1, p, a2, n)))
        n_pos, n_neg = n_pos + a1.numel(), n_neg + a2.numel()
    return blocks, n_pos, n_neg


def _no_terms():
    return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}


def _element(losses, n_rows, device):
    return {"loss": {"losses": losses, "indices": torch.arange(n_rows, device=device), "reduction_type": "element"}}
