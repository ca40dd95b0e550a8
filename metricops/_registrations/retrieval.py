"""Fake (meta) kernel for knn, so that it traces under torch.compile(fullgraph=True).

knn has no autograd formula on purpose: its outputs are not differentiable
(the Python wrapper detaches the inputs), and its Autograd kernel says so
(``register_not_differentiable``).
"""

from __future__ import annotations

import torch

from ._autograd import register_not_differentiable
from ._common import LIB, check_embeddings, check_metric, check_same_device_dtype


@torch.library.register_fake(LIB + "knn")
def _knn_fake(queries, database, k, metric, chunk_size=0):
    db = queries if database is None else database
    check_metric(metric)
    check_embeddings(queries, "queries")
    if database is not None:
        check_embeddings(database, "database")
        check_same_device_dtype(queries, "queries", database, "database")
    torch._check_value(
        queries.shape[1] == db.shape[1],
        lambda: f"database must have the same embedding size D as queries ({queries.shape[1]}), got shape {tuple(db.shape)}",
    )
    available = max(db.shape[0] - (1 if database is None else 0), 0)  # (an empty self-search: 0, not -1)
    what = "" if database is not None else ", self excluded"
    torch._check_value(
        k >= 1 and k <= available,
        lambda: f"k must be between 1 and the number of database rows a query can return ({available}{what}), got k={k}",
    )
    torch._check_value(chunk_size >= 0, lambda: f"chunk_size must be >= 0 (0 picks it automatically), got {chunk_size}")
    q = queries.shape[0]
    return queries.new_empty((q, k)), queries.new_empty((q, k), dtype=torch.int64)


register_not_differentiable("knn")  # the public knn detaches its inputs: the search is not differentiable
