"""Triplet losses: metricops vs the plain-torch reference vs pytorch-metric-learning."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import metricops
from metricops import reference

from ..harness import Case

# The references and PML's all-triplet paths hold B³ elements; past this many
# they would need tens of GiB (recorded as skipped, not run).
_MAX_CUBE = 2**27


def _pml():
    try:
        from pytorch_metric_learning import distances, losses, miners

        return distances, losses, miners
    except ImportError:  # pragma: no cover - test dependency
        return None


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x, labels) -> Callable[[], None]:
    def run():
        x.grad = None
        loss_fn(x, labels).backward()

    return run


def plain_torch_batch_hard(embeddings, labels, margin=0.2):
    """Batch-hard as one would write it in plain torch: cdist + masked max/min."""
    x = torch.nn.functional.normalize(embeddings, dim=1)
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    hardest_pos = torch.where(pos, d, torch.zeros_like(d)).max(1).values
    hardest_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).min(1).values
    valid = pos.any(1) & neg.any(1)
    terms = torch.relu(margin + hardest_pos - hardest_neg)[valid]
    return terms.sum() / (terms > 0).sum().clamp_min(1)


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
        params = {"B": B, "D": D, "classes": B // 8, "dtype": str(dtype).replace("torch.", "")}
        small = B**3 <= _MAX_CUBE  # the O(B³) references
        pml_ok = B <= 1024  # PML's all-triplet paths take ~2 GiB at B=1024, and grow as B³

        # Batch-hard (+ the GEMM floor that the target is stated against).
        c: Dict[str, Callable] = {
            "metricops": _fwd_bwd(
                lambda e, l: metricops.batch_hard_triplet_loss(e, l, normalize=True, reduction="mean_nonzero"), x, labels
            ),
            "x @ x.T (floor)": (lambda t=x.detach(): t @ t.T),
        }
        c["plain torch (cdist)"] = _fwd_bwd(plain_torch_batch_hard, x, labels)
        if B * B * D <= _MAX_CUBE:  # metricops.reference builds (B, B, D) differences
            c["reference"] = _fwd_bwd(lambda e, l: reference.batch_hard_triplet_loss(e, l, normalize=True), x, labels)
        if pml is not None:
            distances, losses, miners = pml
            bh_miner, bh_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)
            c["pml BatchHardMiner+TML"] = _fwd_bwd(lambda e, l, f=bh_loss, m=bh_miner: f(e, l, m(e, l)), x, labels)
        cases.append(Case("batch_hard_triplet_loss", "forward+backward", dict(params), c))

        # Semi-hard.
        c = {"metricops": _fwd_bwd(lambda e, l: metricops.semihard_triplet_loss(e, l, normalize=True), x, labels)}
        if small:
            c["reference"] = _fwd_bwd(lambda e, l: reference.semihard_triplet_loss(e, l, normalize=True), x, labels)
        if pml is not None and pml_ok:
            distances, losses, miners = pml
            sh_miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
            sh_loss = losses.TripletMarginLoss(margin=0.2)
            c["pml TMMiner(semihard)+TML"] = _fwd_bwd(lambda e, l, f=sh_loss, m=sh_miner: f(e, l, m(e, l)), x, labels)
        cases.append(Case("semihard_triplet_loss", "forward+backward", dict(params), c))

        # Batch-all.
        c = {"metricops": _fwd_bwd(lambda e, l: metricops.batch_all_triplet_loss(e, l, normalize=True), x, labels)}
        if small:
            c["reference"] = _fwd_bwd(lambda e, l: reference.batch_all_triplet_loss(e, l, normalize=True), x, labels)
        if pml is not None and pml_ok:
            distances, losses, miners = pml
            all_loss = losses.TripletMarginLoss(margin=0.2)
            c["pml TripletMarginLoss"] = _fwd_bwd(lambda e, l, f=all_loss: f(e, l), x, labels)
        cases.append(Case("batch_all_triplet_loss", "forward+backward", dict(params), c))
    return cases
