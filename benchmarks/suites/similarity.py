"""Similarity losses (SupCon, NT-Xent, Multi-Similarity, Circle, lifted structure) and InfoNCE/CLIP.

Each labelled-batch row times metricops' functional op against its metricops.pml drop-in, pytorch-metric-learning's
class with its defaults (the same loss: the harness checks values and gradients each run) and metricops.reference;
one `x @ x.T` is timed as a yardstick. Batches have 8 embeddings per class. InfoNCE is timed against torch's CLIP
loss (normalize, q @ kᵀ / τ, cross-entropy both ways). Contenders certain to exhaust memory are recorded as skipped.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import metricops
from metricops import reference

from ..harness import Case
from .contrastive import _fwd_bwd
from .triplet import _pml

GEMM_YARDSTICK = "x @ x.T (one GEMM, forward only)"
CLIP_YARDSTICK = "q @ k.T (one GEMM, forward only)"

# op -> (PML / metricops.pml class name, sizes (B, D) full, quick, tiny)
LABELLED = {
    "supcon_loss": "SupConLoss",
    "ntxent_loss": "NTXentLoss",
    "multi_similarity_loss": "MultiSimilarityLoss",
    "circle_loss": "CircleLoss",
    "generalized_lifted_structure_loss": "GeneralizedLiftedStructureLoss",
    "lifted_structure_loss": "LiftedStructureLoss",
}

# PML's NT-Xent and LiftedStructureLoss build |P|×|N| tensors (B·7 positive pairs × B·(B−8) negative pairs
# with 8 per class; several float32 copies with autograd): past this many elements PML is recorded as
# skipped. NT-Xent at B=512 (0.93e9) runs, as measured in the issue; LiftedStructureLoss holds more copies
# (a quick run at B=512 was OOM-killed on 24 GiB), so it stops at B=256 (0.11e9).
_PML_PAIR_TENSOR_MAX_ELEMENTS = {"ntxent_loss": 2**30, "lifted_structure_loss": 2**28}
# The references and PML hold ~15 B×B float32 matrices; torch's CLIP loss several N×N ones.
_MATRIX_BYTES_LIMIT = 2 * 2**30


def _skip(reason: str) -> Callable[[], None]:
    def run():
        raise MemoryError(reason)

    return run


def _native(op: str) -> Callable[..., torch.Tensor]:
    """metricops' op, looked up at each call (so a build without it fails this contender, never silently)."""
    return lambda *args, **kwargs: getattr(metricops, op)(*args, **kwargs)


def clip_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """torch's CLIP loss as written in open_clip: normalize, logits = q @ kᵀ / τ, mean of both cross-entropies."""
    q, k = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _batch(b: int, d: int, device: str, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=dtype).to(device).requires_grad_()
    labels = (torch.randperm(b, generator=gen) % max(1, b // 8)).to(device)  # 8 per class
    return x, labels


def _sizes(quick):
    """(B, D) per op ("default": the others), N, D for InfoNCE. The losses whose PML version holds |P|×|N|
    tensors run smaller in quick mode."""
    if quick == "tiny":
        return {"default": (64, 32), "info_nce": (96, 16)}
    if quick:
        small = [(128, 64)]
        return {"default": (512, 64), "ntxent_loss": small, "lifted_structure_loss": small, "info_nce": (2048, 128)}
    # Common training batches too (B = 128, 512), where fixed per-call costs weigh most.
    small_and_large = [(128, 128), (512, 128), (2048, 128)]
    return {
        "default": (2048, 128),
        "supcon_loss": small_and_large,
        "multi_similarity_loss": small_and_large,
        "circle_loss": small_and_large,
        "generalized_lifted_structure_loss": small_and_large,
        "ntxent_loss": [(512, 128), (2048, 128)],
        "lifted_structure_loss": [(256, 128), (2048, 128)],
        "info_nce": (16384, 256),
    }


def similarity_cases(device: str, quick, dtype=torch.float32) -> List[Case]:
    pml = _pml()
    from metricops.pml import losses as mo_losses
    from metricops.pml import miners as mo_miners

    sizes = _sizes(quick)
    cases = []
    for op, cls in LABELLED.items():
        for B, D in sizes.get(op, [sizes["default"]]):
            x, labels = _batch(B, D, device, dtype, seed=B + D)
            matrix_bytes = B * B * 4
            contenders: Dict[str, Callable[[], object]] = {}
            if hasattr(metricops, op):  # else (lifted structure, for now) the drop-in, on the engine, is first
                contenders["metricops"] = _fwd_bwd(lambda e, lab, f=_native(op): f(e, lab), x, labels)
            contenders["metricops.pml"] = _fwd_bwd(lambda e, lab, f=getattr(mo_losses, cls)(): f(e, lab), x, labels)
            if pml is not None:
                if (B * 7) * B * (B - 8) > _PML_PAIR_TENSOR_MAX_ELEMENTS.get(op, float("inf")):
                    contenders["pytorch-metric-learning"] = _skip(
                        f"skipped: its |P|×|N| tensor needs ~{(B * 7) * B * (B - 8) * 4 / 2**30:.0f} GiB"
                    )
                else:
                    contenders["pytorch-metric-learning"] = _fwd_bwd(
                        lambda e, lab, f=getattr(pml[1], cls)(): f(e, lab), x, labels
                    )
            contenders["reference"] = (
                _skip(f"skipped: several {matrix_bytes / 2**30:.0f} GiB matrices")
                if 15 * matrix_bytes > _MATRIX_BYTES_LIMIT
                else _fwd_bwd(lambda e, lab, f=getattr(reference, op): f(e, lab), x, labels)
            )
            contenders[GEMM_YARDSTICK] = lambda x=x: x.detach() @ x.detach().T
            params = {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", "")}
            inputs = {"embeddings": x, "labels": labels}
            cases.append(Case(op, "forward+backward", params, contenders, (GEMM_YARDSTICK,), inputs=inputs))

    # Multi-Similarity with PML's miner fused in (mining_epsilon) vs MultiSimilarityMiner + MultiSimilarityLoss.
    B, D = sizes["default"]
    x, labels = _batch(B, D, device, dtype, seed=B + D + 1)
    eps = 0.1
    mo_miner, mo_loss = mo_miners.MultiSimilarityMiner(eps), mo_losses.MultiSimilarityLoss()
    contenders = {
        "metricops": _fwd_bwd(lambda e, lab: _native("multi_similarity_loss")(e, lab, mining_epsilon=eps), x, labels),
        "metricops.pml": _fwd_bwd(lambda e, lab: mo_loss(e, lab, mo_miner(e, lab)), x, labels),
    }
    if pml is not None:
        miner, loss = pml[2].MultiSimilarityMiner(eps), pml[1].MultiSimilarityLoss()
        contenders["pytorch-metric-learning"] = _fwd_bwd(lambda e, lab: loss(e, lab, miner(e, lab)), x, labels)
    contenders["reference"] = _fwd_bwd(
        lambda e, lab: reference.multi_similarity_loss(e, lab, mining_epsilon=eps), x, labels
    )
    contenders[GEMM_YARDSTICK] = lambda x=x: x.detach() @ x.detach().T
    params = {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", ""), "epsilon": eps}
    cases.append(
        Case(
            "multi_similarity_loss + miner",
            "forward+backward",
            params,
            contenders,
            (GEMM_YARDSTICK,),
            inputs={"embeddings": x, "labels": labels},
        )
    )

    # InfoNCE, symmetric (CLIP), against torch's CLIP loss.
    N, D = sizes["info_nce"]
    gen = torch.Generator().manual_seed(N + D)
    q = torch.randn(N, D, generator=gen, dtype=dtype).to(device).requires_grad_()
    k = torch.randn(N, D, generator=gen, dtype=dtype).to(device).requires_grad_()
    contenders = {
        "metricops": _fwd_bwd(lambda a, b: _native("info_nce_loss")(a, b, temperature=0.05, symmetric=True), q, k),
        "torch CLIP loss": (
            _skip(f"skipped: several {N * N * 4 / 2**30:.0f} GiB matrices")
            if 6 * N * N * 4 > 4 * _MATRIX_BYTES_LIMIT
            else _fwd_bwd(clip_loss, q, k)
        ),
        CLIP_YARDSTICK: lambda q=q, k=k: q.detach() @ k.detach().T,
    }
    params = {"N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "symmetric": True}
    cases.append(
        Case(
            "info_nce_loss", "forward+backward", params, contenders, (CLIP_YARDSTICK,), inputs={"queries": q, "keys": k}
        )
    )
    if not quick:
        cases += _large_batch_cases(device, dtype)
    return cases


def _large_batch_cases(device: str, dtype) -> List[Case]:
    """SupCon and CLIP's InfoNCE at 65536 rows, D=128: metricops alone (every other implementation here holds
    65536² matrices, 16 GiB each), for its time and its peak memory (the issue's bound: under 1 GiB)."""
    B, D = 65536, 128
    x, labels = _batch(B, D, device, dtype, seed=B + D)
    supcon = Case(
        "supcon_loss",
        "forward+backward",
        {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", "")},
        {"metricops": _fwd_bwd(lambda e, lab: metricops.supcon_loss(e, lab), x, labels)},
        inputs={"embeddings": x, "labels": labels},
    )
    gen = torch.Generator().manual_seed(B + D + 1)
    q = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
    k = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
    clip = Case(
        "info_nce_loss",
        "forward+backward",
        {"N": B, "D": D, "dtype": str(dtype).replace("torch.", ""), "symmetric": True},
        {"metricops": _fwd_bwd(lambda a, b: metricops.info_nce_loss(a, b, temperature=0.05, symmetric=True), q, k)},
        inputs={"queries": q, "keys": k},
    )
    return [supcon, clip]
