"""The native L2 normalisation behind normalize=True matches F.normalize."""

import pytest
import torch
import torch.nn.functional as F

from metricops.distance import _l2_normalize
from common import assert_close, cpu_and_cuda


def _inputs(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 19, generator=gen, dtype=dtype)
    x[4] = 0  # a zero row: the eps clamp is active
    x[5] *= 1e-14  # a tiny row, below eps as well
    return x.to(device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_f_normalize_values_and_gradients(device, dtype):
    x = _inputs(device, dtype).requires_grad_()
    g = torch.randn_like(x)
    for eps in (1e-12, 0.5):
        out = _l2_normalize(x, eps)
        ref = F.normalize(x, p=2, dim=1, eps=eps)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert_close(out, ref, atol=tol, rtol=tol)
        assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_nan_and_layouts(device):
    assert _l2_normalize(torch.empty(0, 4, device=device)).shape == (0, 4)
    x = torch.randn(3, 4, device=device)
    x[1, 2] = float("nan")
    out = _l2_normalize(x)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
    t = torch.randn(8, 5, device=device).t()  # non-contiguous
    assert_close(_l2_normalize(t), F.normalize(t, dim=1))


def test_bad_input():
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        torch.ops.metricops.l2_normalize(torch.randn(3, 2), 0.0)
    with pytest.raises(ValueError, match="norm must have shape"):
        torch.ops.metricops.l2_normalize_backward(torch.randn(3, 2), torch.randn(3, 2), torch.ones(2), 1e-12)
    with pytest.raises((ValueError, TypeError), match="embeddings"):
        torch.ops.metricops.l2_normalize(torch.randn(3), 1e-12)
