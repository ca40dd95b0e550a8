"""Fake (meta) kernel for knn, so that it traces under torch.compile(fullgraph=True).

knn has no autograd formula on purpose: its outputs are not differentiable
(the Python wrapper detaches the inputs).
"""

from __future__ import annotations

import torch

_LIB = "metricops::"


@torch.library.register_fake(_LIB + "knn")
def _knn_fake(queries, database, k, metric, chunk_size=0):
    db = queries if database is None else database
    torch._check(queries.dim() == 2, lambda: f"queries must be a 2-D tensor of shape (B, D), got {queries.dim()}-D")
    torch._check(db.dim() == 2, lambda: f"database must be a 2-D tensor of shape (B, D), got {db.dim()}-D")
    torch._check(
        queries.shape[1] == db.shape[1],
        lambda: f"database must have the same embedding size D as queries ({queries.shape[1]}), got shape {tuple(db.shape)}",
    )
    available = db.shape[0] - (1 if database is None else 0)
    torch._check(k >= 1 and k <= available, lambda: f"k must be between 1 and {available}, got k={k}")
    q = queries.shape[0]
    return queries.new_empty((q, k)), queries.new_empty((q, k), dtype=torch.int64)
