"""Losses with learnable class parameters: ArcFace, CosFace (B×C logits) and ProxyAnchor, forward+backward.

Contenders: metricops (classes in chunks, never B×C), plain torch as one writes it (normalize, F.linear,
margin on the target, cross-entropy: the B×C logits and their gradient are held) and pytorch-metric-learning.
Each returns (loss, grad of embeddings, grad of the class parameters in metricops' (C, D) layout). The peak
memory includes those two gradients (``grad_bytes`` in the params: subtract it for the memory beyond them).
"""

from __future__ import annotations

import math
from typing import Callable, List

import torch
import torch.nn.functional as F

import metricops

from ..harness import Case

# Plain torch and PML hold several B×C float32 matrices: past this many bytes per matrix they are skipped.
_MATRIX_BYTES_LIMIT = 512 * 2**20


def plain_torch_margin_softmax(x, labels, weight, kind, margin, scale):
    """ArcFace/CosFace as one writes it in torch: normalize, F.linear, margin on the target, cross-entropy."""
    cos = F.linear(F.normalize(x), F.normalize(weight))
    target = cos.gather(1, labels[:, None])
    if kind == "arcface":
        t = target.clamp(-1, 1)
        sine = (1 - t * t).clamp_min(1e-12).sqrt()
        new = torch.where(t >= -math.cos(margin), t * math.cos(margin) - sine * math.sin(margin),
                          t - margin * math.sin(margin))  # fmt: skip
    else:
        new = target - margin
    return F.cross_entropy(scale * cos.scatter(1, labels[:, None], new), labels)


def _skip(reason: str):
    def run():
        raise MemoryError(reason)

    return run


def _fwd_bwd(loss_fn: Callable, x, labels, param, transpose_grad: bool = False) -> Callable[[], tuple]:
    """loss_fn(x, labels, param): the class parameters are passed in, never read from an enclosing loop's variable
    (a closure would see the last size's tensor: one run timed every size's loss on the largest weight)."""

    def run():
        x.grad = None
        param.grad = None
        loss = loss_fn(x, labels, param)
        loss.backward()
        return loss.detach(), x.grad, (param.grad.T if transpose_grad else param.grad)

    return run


def _pml_losses():
    try:
        from pytorch_metric_learning import losses

        return losses
    except ImportError:  # pragma: no cover - test dependency
        return None


def class_losses_cases(device: str, quick: bool, dtype=torch.float32) -> List[Case]:
    if quick == "tiny":
        # labels repeat: the clustered check; two sizes each, so a contender bound to the wrong size disagrees
        margin_sizes, proxy_sizes = [(32, 16, 8), (24, 16, 5)], [(32, 8, 16), (40, 12, 8)]
    elif quick:
        margin_sizes, proxy_sizes = [(256, 128, 10_000)], [(1024, 1000, 128)]
    else:
        margin_sizes, proxy_sizes = [(512, 512, 100_000), (256, 512, 1_000_000)], [(1024, 1000, 128)]
    pml = _pml_losses()
    cases = []
    for B, D, C in margin_sizes:
        gen = torch.Generator().manual_seed(C)
        x = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
        weight = torch.randn(C, D, generator=gen, dtype=dtype).to(device).requires_grad_()
        labels = torch.randint(0, C, (B,), generator=gen).to(device)
        too_big = B * C * 4 > _MATRIX_BYTES_LIMIT
        grad_bytes = (B + C) * D * x.element_size()
        for kind, margin in (("arcface", 0.5), ("cosface", 0.35)):
            fn = metricops.arcface_loss if kind == "arcface" else metricops.cosface_loss
            contenders = {
                "metricops": _fwd_bwd(lambda t, y, w, fn=fn, m=margin: fn(t, y, w, margin=m), x, labels, weight),
                "plain torch (B×C logits)": _skip("skipped: holds several B×C matrices")
                if too_big
                else _fwd_bwd(
                    lambda t, y, w, k=kind, m=margin: plain_torch_margin_softmax(t, y, w, k, m, 64.0),
                    x,
                    labels,
                    weight,
                ),
            }
            if pml is not None and too_big:
                contenders["pytorch-metric-learning"] = _skip("skipped: holds several B×C matrices")
            elif pml is not None:
                # PML's W is (D, C); its ArcFace margin is in degrees. Same values as weight.T.
                cls = pml.ArcFaceLoss if kind == "arcface" else pml.CosFaceLoss
                pml_margin = math.degrees(margin) if kind == "arcface" else margin
                pml_loss = cls(num_classes=C, embedding_size=D, margin=pml_margin, scale=64).to(device)
                pml_loss.W = torch.nn.Parameter(weight.detach().T.clone())
                contenders["pytorch-metric-learning"] = _fwd_bwd(
                    lambda t, y, w, f=pml_loss: f(t, y), x, labels, pml_loss.W, transpose_grad=True
                )
            params = {"B": B, "D": D, "C": C, "dtype": str(dtype).replace("torch.", ""), "grad_bytes": grad_bytes}
            inputs = {"embeddings": x, "labels": labels, "weight": weight}
            cases.append(Case(f"{kind}_loss", "forward+backward", params, contenders, inputs=inputs))
    for B, C, D in proxy_sizes:
        gen = torch.Generator().manual_seed(B + C)
        x = torch.randn(B, D, generator=gen, dtype=dtype).to(device).requires_grad_()
        proxies = (torch.randn(C, D, generator=gen, dtype=dtype) * math.sqrt(2 / C)).to(device).requires_grad_()
        labels = torch.randint(0, C, (B,), generator=gen).to(device)
        contenders = {
            "metricops": _fwd_bwd(lambda t, y, p: metricops.proxy_anchor_loss(t, y, p), x, labels, proxies),
            "reference (plain torch)": _fwd_bwd(
                lambda t, y, p: metricops.reference.proxy_anchor_loss(t, y, p), x, labels, proxies
            ),
        }
        if pml is not None:
            pml_loss = pml.ProxyAnchorLoss(C, D).to(device)
            del pml_loss.proxies  # PML reads its attribute: our leaf in its place
            pml_loss.proxies = proxies
            contenders["pytorch-metric-learning"] = _fwd_bwd(lambda t, y, p, f=pml_loss: f(t, y), x, labels, proxies)
        params = {"B": B, "D": D, "C": C, "dtype": str(dtype).replace("torch.", ""), "grad_bytes": (B + C) * D * 4}
        inputs = {"embeddings": x, "labels": labels, "proxies": proxies}
        cases.append(Case("proxy_anchor_loss", "forward+backward", params, contenders, inputs=inputs))
    return cases
