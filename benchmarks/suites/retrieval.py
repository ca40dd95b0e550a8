"""Benchmark cases for retrieval: knn against faiss, chunked cdist + topk, and the GEMM floor."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import metricops

from ..harness import Case


def _chunked_cdist_topk(q: torch.Tensor, db: torch.Tensor, k: int, chunk: int = 1024):
    out_d, out_i = [], []
    for q0 in range(0, q.shape[0], chunk):
        d, i = torch.topk(torch.cdist(q[q0 : q0 + chunk], db), k, dim=1, largest=False)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def knn_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    # (Q, N, D, k). The full-size case's plain q @ db.T is a 4 GB matrix: it is
    # the floor (the GEMM alone) that a fused knn should come close to.
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
            "matmul floor (q @ db.T)": lambda q=q, db=db: q @ db.T,
            "cdist+topk (chunked)": lambda q=q, db=db, k=k: _chunked_cdist_topk(q, db, k),
        }
        if device == "cpu":
            try:
                import faiss

                index = faiss.IndexFlatL2(D)
                index.add(db.numpy())
                qn = q.numpy()
                contenders["faiss IndexFlatL2"] = lambda index=index, qn=qn, k=k: index.search(qn, k)
            except ImportError:
                pass
        params = {"Q": Q, "N": N, "D": D, "k": k, "dtype": str(dtype).replace("torch.", ""), "metric": "euclidean"}
        cases.append(Case("knn", "forward", params, contenders))
    return cases
