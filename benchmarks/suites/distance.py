"""Benchmark cases, one builder per op. Each returns a list of harness.Case."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import metricops
from metricops import reference

from ..harness import Case


def _randn(*shape, device, dtype, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], tuple]:
    """Forward, then the backward of the sum; returns (distances, gradient) for the agreement check."""

    def run():
        x.grad = None
        out = fn(x)
        out.sum().backward()
        return out.detach(), x.grad

    return run


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return fn(x)

    return run


def pairwise_distance_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    if quick == "tiny":
        sizes = [(64, 32)]
    else:
        sizes = [(256, 128), (1024, 512)] if quick else [(256, 128), (1024, 128), (1024, 512), (4096, 128)]
    if device.startswith("cuda") and not quick:
        sizes += [(8192, 512), (16384, 256)]
    cases = []
    for B, D in sizes:
        x = _randn(B, D, device=device, dtype=dtype, requires_grad=True)
        contenders: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "metricops": lambda t: metricops.pairwise_distance(t),
            "torch.cdist": lambda t: torch.cdist(t, t),
        }
        if B * B * D <= 2**28:  # the explicit-difference reference is O(B²D) memory
            contenders["reference"] = lambda t: reference.pairwise_distance(t)
        params = {"B": B, "D": D, "dtype": str(dtype).replace("torch.", ""), "metric": "euclidean"}
        inputs = {"embeddings": x}
        cases.append(
            Case(
                "pairwise_distance",
                "forward",
                params,
                {n: _no_grad(f, x) for n, f in contenders.items()},
                inputs=inputs,
            )
        )
        cases.append(
            Case(
                "pairwise_distance",
                "forward+backward",
                dict(params),
                {n: _fwd_bwd(f, x) for n, f in contenders.items()},
                inputs=inputs,
            )
        )
    return cases
