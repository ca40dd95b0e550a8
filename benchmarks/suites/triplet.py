"""Triplet losses: metricops vs plain torch, metricops.reference and pytorch-metric-learning, on the same loss.

Every contender of a row computes the same loss (values and gradients; the
harness checks each run). pytorch-metric-learning has no FaceNet-rule
semi-hard loss: its semi-hard pipeline (TripletMarginMiner("semihard") +
TripletMarginLoss, every semi-hard triplet averaged) is a different loss, so
it has its own row against metricops.pml's drop-in of the same pipeline.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import metricops
from metricops import reference

from ..harness import Case
from .plain_torch import plain_torch_batch_hard, plain_torch_semihard

# The references and PML's all-triplet paths hold B³ elements; past this many
# they would need tens of GiB (recorded as skipped, not run).
_MAX_CUBE = 2**27


def _pml():
    try:
        from pytorch_metric_learning import distances, losses, miners

        return distances, losses, miners
    except ImportError:  # pragma: no cover - test dependency
        return None


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x, labels) -> Callable[[], tuple]:
    """One forward+backward; returns (loss, gradient) for the harness's agreement check."""

    def run():
        x.grad = None
        loss = loss_fn(x, labels)
        loss.backward()
        return loss.detach(), x.grad

    return run


def triplet_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    if quick == "tiny":
        sizes = [(64, 32)]
    elif quick:
        sizes = [(256, 128)]
    else:
        sizes = [(256, 128), (1024, 128), (1024, 512), (4096, 128), (4096, 512)]
        if device.startswith("cuda"):
            sizes += [(8192, 512), (16384, 512)]
    pml = _pml()
    cases = []
    for B, D in sizes:
        gen = torch.Generator().manual_seed(B + D)
        x = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
        labels = torch.randint(0, max(1, B // 8), (B,), generator=gen).to(device)
        inputs = {"embeddings": x, "labels": labels}
        params = {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", "")}
        small = B**3 <= _MAX_CUBE  # the O(B³) references
        pml_ok = B <= 1024  # PML's all-triplet paths take ~2 GiB at B=1024, and grow as B³

        # Batch-hard, mean over the non-zero terms (PML's AvgNonZeroReducer), + one GEMM as a yardstick.
        c: Dict[str, Callable] = {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.batch_hard_triplet_loss(
                    e, labels, normalize=True, reduction="mean_nonzero"
                ),
                x,
                labels,
            ),
            "x @ x.T (one GEMM, forward only)": (lambda t=x.detach(): t @ t.T),
            "plain torch (cdist + masks)": _fwd_bwd(plain_torch_batch_hard, x, labels),
        }
        if B * B * D <= _MAX_CUBE:  # metricops.reference builds (B, B, D) differences
            c["reference"] = _fwd_bwd(
                lambda e, labels: reference.batch_hard_triplet_loss(
                    e, labels, normalize=True, reduction="mean_nonzero"
                ),
                x,
                labels,
            )
        if pml is not None:
            distances, losses, miners = pml
            bh_miner, bh_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)
            c["pml BatchHardMiner+TML"] = _fwd_bwd(
                lambda e, labels, f=bh_loss, m=bh_miner: f(e, labels, m(e, labels)), x, labels
            )
        cases.append(
            Case(
                "batch_hard_triplet_loss",
                "forward+backward",
                dict(params),
                c,
                yardsticks=("x @ x.T (one GEMM, forward only)",),
                inputs=inputs,
            )
        )

        # Semi-hard, FaceNet / TensorFlow-Addons rule (one negative per positive pair), mean over the pairs.
        c = {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.semihard_triplet_loss(e, labels, normalize=True), x, labels
            ),
            "plain torch (sort + searchsorted)": _fwd_bwd(plain_torch_semihard, x, labels),
        }
        if small:
            c["reference"] = _fwd_bwd(
                lambda e, labels: reference.semihard_triplet_loss(e, labels, normalize=True), x, labels
            )
        cases.append(Case("semihard_triplet_loss", "forward+backward", dict(params), c, inputs=inputs))

        # PML's miner pipelines (every mined triplet, mean over the non-zero terms): the drop-in against PML.
        # Semi-hard at every size; "all" and "hard" (each a different interval of m) at D=128.
        if pml is not None and pml_ok:
            distances, losses, miners = pml
            from metricops.pml import losses as mo_losses, miners as mo_miners

            for kind in ("semihard", "all", "hard") if params["D"] == 128 else ("semihard",):
                c = {}
                for name, lib_miners, lib_losses in (
                    ("metricops.pml", mo_miners, mo_losses),
                    ("pytorch-metric-learning", miners, losses),
                ):
                    miner = lib_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)
                    loss = lib_losses.TripletMarginLoss(margin=0.2)
                    c[name] = _fwd_bwd(lambda e, labels, f=loss, m=miner: f(e, labels, m(e, labels)), x, labels)
                cases.append(
                    Case(
                        f"pml.TripletMarginMiner({kind})+TripletMarginLoss",
                        "forward+backward",
                        dict(params),
                        c,
                        inputs=inputs,
                    )
                )

        # Batch-all, mean over the non-zero terms (PML's TripletMarginLoss without a miner).
        c = {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.batch_all_triplet_loss(e, labels, normalize=True), x, labels
            )
        }
        if small:
            c["reference"] = _fwd_bwd(
                lambda e, labels: reference.batch_all_triplet_loss(e, labels, normalize=True), x, labels
            )
        if pml is not None and pml_ok:
            distances, losses, miners = pml
            all_loss = losses.TripletMarginLoss(margin=0.2)
            c["pml TripletMarginLoss"] = _fwd_bwd(lambda e, labels, f=all_loss: f(e, labels), x, labels)
        cases.append(Case("batch_all_triplet_loss", "forward+backward", dict(params), c, inputs=inputs))
    return cases
