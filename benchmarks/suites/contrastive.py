"""Benchmark cases for the contrastive and explicit-triplet losses."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import metricops
from metricops import reference

from ..harness import Case
from .plain_torch import plain_torch_contrastive


def _fwd_bwd(fn: Callable[..., torch.Tensor], *leaves: torch.Tensor) -> Callable[[], tuple]:
    """One forward+backward; returns (loss, *gradients) for the harness's agreement check."""

    def run():
        for t in leaves:
            t.grad = None
        loss = fn(*leaves)
        loss.backward()
        return (loss.detach(), *(t.grad for t in leaves))

    return run


def triplet_margin_loss_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    sizes = [(1024, 32)] if quick == "tiny" else [(8192, 128)] if quick else [(65536, 128)]
    cases = []
    for N, D in sizes:
        leaves = [torch.randn(N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        for swap in (False, True):
            contenders: Dict[str, Callable[[], None]] = {
                "metricops": _fwd_bwd(
                    lambda a, p, n, swap=swap: metricops.triplet_margin_loss(a, p, n, swap=swap), *leaves
                ),
                "torch": _fwd_bwd(lambda a, p, n, swap=swap: F.triplet_margin_loss(a, p, n, swap=swap), *leaves),
            }
            params = {"N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "swap": swap}
            inputs = dict(zip(("anchor", "positive", "negative"), leaves))
            cases.append(Case("triplet_margin_loss", "forward+backward", params, contenders, inputs=inputs))
    return cases


def contrastive_loss_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    sizes = [(64, 32)] if quick == "tiny" else [(256, 128)] if quick else [(256, 128), (1024, 128)]
    cases = []
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError:  # a test dependency only
        pml_losses = None
    for B, D in sizes:
        x = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, max(2, B // 8), (B,), device=device)
        inputs = {"embeddings": x, "labels": labels}
        contenders = {
            "metricops": _fwd_bwd(
                lambda t, labels=labels: metricops.contrastive_loss(t, labels, reduction="mean_nonzero"), x
            ),
            "plain torch (cdist + masks)": _fwd_bwd(lambda t, labels=labels: plain_torch_contrastive(t, labels), x),
            "reference": _fwd_bwd(
                lambda t, labels=labels: reference.contrastive_loss(t, labels, reduction="mean_nonzero"), x
            ),
        }
        params = {"B": B, "D": D, "dtype": str(dtype).replace("torch.", ""), "metric": "euclidean"}
        cases.append(Case("contrastive_loss", "forward+backward", params, contenders, inputs=inputs))
        # pytorch-metric-learning's ContrastiveLoss (normalized LpDistance, separate
        # positive/negative AvgNonZero) against its metricops.pml drop-in.
        from metricops.pml import losses as mo_pml

        pml_contenders = {"metricops.pml": _fwd_bwd(lambda t, labels=labels: mo_pml.ContrastiveLoss()(t, labels), x)}
        if pml_losses is not None:
            pml_contenders["pytorch-metric-learning"] = _fwd_bwd(
                lambda t, labels=labels: pml_losses.ContrastiveLoss()(t, labels), x
            )
        cases.append(Case("pml.ContrastiveLoss", "forward+backward", dict(params), pml_contenders, inputs=inputs))
    return cases
