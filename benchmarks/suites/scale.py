"""Scale: batch-hard, semi-hard, batch-all and contrastive as B grows, matrix vs streaming vs plain torch vs PML,
with peak memory.

Each contender computes the row's loss (the harness checks values and
gradients). Each contender that fails (out of memory, or skipped as certain
to) is recorded, so the table shows where each one stops.
"""

from __future__ import annotations

from typing import List

import torch

import metricops

from ..harness import Case
from .plain_torch import plain_torch_batch_hard, plain_torch_contrastive, plain_torch_semihard
from .triplet import _fwd_bwd, _pml

# Above this many bytes for one B×B float32 matrix, contenders that hold
# several of them are recorded as skipped instead of being run into the OOM
# killer (this machine has 24 GiB; PML holds ~5 B×B matrices plus autograd's).
_MATRIX_BYTES_LIMIT = 2 * 2**30


# The plain-torch semi-hard peaks at about 16 B×B float32 matrices' worth of
# memory (sorts, int64 indices, their gradients; 1 GiB at B=4096, measured):
# past this B it is skipped.
_PLAIN_SEMIHARD_MAX_B = 4096

# Semi-hard and batch-all sort (or scan) every anchor's row: on 2 CPU cores
# B=32768 takes minutes per call, so the CPU rows stop at 16384.
_SORTING_MAX_B = {"cpu": 16384}


def _skip(reason: str):
    def run():
        raise MemoryError(reason)

    return run


def scale_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    if quick == "tiny":
        sizes = [(64, 16)]
    elif quick:
        sizes = [(1024, 128)]
    elif device.startswith("cuda"):
        sizes = [(1024, 256), (8192, 256), (32768, 256), (65536, 256)]
    else:
        sizes = [(1024, 128), (4096, 128), (16384, 128), (32768, 128)]
    pml = _pml()
    cases = []
    for B, D in sizes:
        gen = torch.Generator().manual_seed(B)
        x = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
        labels = torch.randint(0, max(1, B // 8), (B,), generator=gen).to(device)
        matrix_bytes = B * B * 4
        too_big = matrix_bytes > _MATRIX_BYTES_LIMIT
        params = {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", "")}
        inputs = {"embeddings": x, "labels": labels}
        too_big_reason = f"skipped: several {matrix_bytes / 2**30:.0f} GiB matrices"
        # Mean over the non-zero terms: what PML's AvgNonZeroReducer and the plain-torch version compute.
        c = {
            "metricops streaming": _fwd_bwd(
                lambda e, labels: metricops.batch_hard_triplet_loss(
                    e, labels, normalize=True, memory="streaming", reduction="mean_nonzero"
                ),
                x,
                labels,
            ),
            "metricops matrix": _fwd_bwd(
                lambda e, labels: metricops.batch_hard_triplet_loss(
                    e, labels, normalize=True, memory="matrix", reduction="mean_nonzero"
                ),
                x,
                labels,
            ),
        }
        c["plain torch (cdist + masks)"] = (
            _skip(too_big_reason) if too_big else _fwd_bwd(plain_torch_batch_hard, x, labels)
        )
        if pml is not None:
            _, losses, miners = pml
            if too_big:
                c["pml BatchHardMiner+TML"] = _skip(too_big_reason)
            else:
                miner, loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)
                c["pml BatchHardMiner+TML"] = _fwd_bwd(
                    lambda e, labels, f=loss, m=miner: f(e, labels, m(e, labels)), x, labels
                )
        cases.append(Case("batch_hard_triplet_loss (scale)", "forward+backward", dict(params), c, inputs=inputs))

        c = {
            "metricops streaming": _fwd_bwd(
                lambda e, labels: metricops.contrastive_loss(
                    e, labels, normalize=True, memory="streaming", reduction="mean_nonzero"
                ),
                x,
                labels,
            ),
            "metricops matrix": _fwd_bwd(
                lambda e, labels: metricops.contrastive_loss(
                    e, labels, normalize=True, memory="matrix", reduction="mean_nonzero"
                ),
                x,
                labels,
            ),
        }
        c["plain torch (cdist + masks)"] = (
            _skip(too_big_reason)
            if too_big
            else _fwd_bwd(lambda e, labels: plain_torch_contrastive(e, labels, normalize=True), x, labels)
        )
        cases.append(Case("contrastive_loss (scale)", "forward+backward", dict(params), c, inputs=inputs))

        # Semi-hard and batch-all: O(B² log B) work, so the largest CPU size is left out.
        if B > _SORTING_MAX_B.get(device.split(":")[0], B):
            continue
        for name in ("semihard_triplet_loss", "batch_all_triplet_loss"):
            fn = getattr(metricops, name)
            c = {
                "metricops streaming": _fwd_bwd(
                    lambda e, labels, f=fn: f(e, labels, normalize=True, memory="streaming"), x, labels
                ),
                "metricops matrix": _fwd_bwd(
                    lambda e, labels, f=fn: f(e, labels, normalize=True, memory="matrix"), x, labels
                ),
            }
            if name == "semihard_triplet_loss":
                # PML has no FaceNet-rule semi-hard loss (its semi-hard miner + loss is another loss; see triplet.py).
                c["plain torch (sort + searchsorted)"] = (
                    _skip(f"skipped: needs ~{16 * matrix_bytes / 2**30:.0f} GiB, about 16 B×B float32 matrices")
                    if B > _PLAIN_SEMIHARD_MAX_B
                    else _fwd_bwd(plain_torch_semihard, x, labels)
                )
            elif pml is not None:  # batch-all: PML's TripletMarginLoss without a miner
                distances, losses, miners = pml
                if B > 1024:
                    c["pml TripletMarginLoss"] = _skip(
                        "skipped: PML materialises every triplet (O(B³); ~1.2 GiB at B=1024)"
                    )
                else:
                    loss = losses.TripletMarginLoss(margin=0.2)
                    c["pml TripletMarginLoss"] = _fwd_bwd(lambda e, labels, f=loss: f(e, labels), x, labels)
            cases.append(Case(f"{name} (scale)", "forward+backward", dict(params), c, inputs=inputs))
    return cases
