"""Benchmark cases for retrieval: knn against FAISS and chunked cdist + topk, with one q @ db.T as a yardstick."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import metricops

from ..harness import Case


_GEMM_ONLY = "q @ db.T (Q×N matrix, no top-k)"


def _chunked_cdist_topk(q: torch.Tensor, db: torch.Tensor, k: int, chunk: int = 1024):
    out_d, out_i = [], []
    for q0 in range(0, q.shape[0], chunk):
        d, i = torch.topk(torch.cdist(q[q0 : q0 + chunk], db), k, dim=1, largest=False)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def _exact_distances(q: torch.Tensor, db: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float64 distances from each query to the database rows it returned: equal for two correct top-k lists
    even where near-ties swap indices."""
    q64, db64 = q.double(), db.double()
    return torch.linalg.vector_norm(q64[:, None, :] - db64[idx.long()], dim=-1)


def _knn_output(q: torch.Tensor, db: torch.Tensor):
    """(returned distances, float64 distances of the returned indices) of a (distances, indices) output."""

    def canonical(out):
        d, i = (torch.as_tensor(t) for t in out)
        return d, _exact_distances(q.cpu(), db.cpu(), i.cpu())

    return canonical


def _faiss_output(q: torch.Tensor, db: torch.Tensor):
    """FAISS returns squared L2 distances: their square roots, then as _knn_output."""
    canonical = _knn_output(q, db)
    return lambda out: canonical((torch.as_tensor(out[0]).clamp_min(0).sqrt(), out[1]))


def knn_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    # (Q, N, D, k). The yardstick is the GEMM alone, materialised: one q @ db.T,
    # the whole Q×N matrix (4 GB at full size) with no top-k. It is not a knn.
    if quick == "tiny":
        sizes = [(100, 1000, 32, 5)]
    else:
        sizes = [(1000, 10000, 128, 10)] if quick else [(1000, 10000, 128, 10), (10000, 100000, 128, 10)]
    cases = []
    for Q, N, D, k in sizes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(Q, D, generator=g, dtype=dtype).to(device)
        db = torch.randn(N, D, generator=g, dtype=dtype).to(device)
        contenders: Dict[str, Callable[[], object]] = {
            "metricops": lambda q=q, db=db, k=k: metricops.knn(q, db, k=k),
            _GEMM_ONLY: lambda q=q, db=db: q @ db.T,
            "cdist+topk (chunked)": lambda q=q, db=db, k=k: _chunked_cdist_topk(q, db, k),
        }
        canonical = {"metricops": _knn_output(q, db), "cdist+topk (chunked)": _knn_output(q, db)}
        if device == "cpu":
            try:
                import faiss

                index = faiss.IndexFlatL2(D)
                index.add(db.numpy())
                qn = q.numpy()
                contenders["faiss IndexFlatL2"] = lambda index=index, qn=qn, k=k: index.search(qn, k)
                canonical["faiss IndexFlatL2"] = _faiss_output(q, db)
            except ImportError:
                pass
        params = {"Q": Q, "N": N, "D": D, "k": k, "dtype": str(dtype).replace("torch.", ""), "metric": "euclidean"}
        cases.append(
            Case(
                "knn",
                "forward",
                params,
                contenders,
                yardsticks=(_GEMM_ONLY,),
                canonical=canonical,
                inputs={"queries": q, "database": db},
            )
        )
    return cases
