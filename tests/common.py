"""Helpers shared by the tests."""

import pytest
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")
REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


def cpu_and_cuda():
    """Device parameter: the CUDA case carries needs_cuda and skips cleanly without a GPU."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t`, stored contiguously, transposed, strided or at an offset."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major storage
        return t.t().contiguous().t()
    if layout == "strided":  # every other column of a wider buffer
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "offset":  # non-zero storage offset
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
        view = buf[3:].view(t.shape)
        view.copy_(t)
        return view
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def labelled_batch_with_reference(seed, rows, ref_rows, dim, *, dtype=torch.float32, ref_classes=3):
    """(embeddings, labels in 0..2, ref_emb, ref_labels in 0..ref_classes-1), drawn in that order from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (rows,), generator=gen)
    ref = torch.randn(ref_rows, dim, generator=gen, dtype=dtype)
    ref_labels = torch.randint(0, ref_classes, (ref_rows,), generator=gen)
    return x, labels, ref, ref_labels


def assert_close(actual, expected, *, dtype=None, atol=None, rtol=None):
    dtype = dtype or actual.dtype
    if atol is None:
        atol, rtol = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-4, 2e-4)}.get(dtype, (1e-2, 1e-2))
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, equal_nan=True)


def low_precision_error_ok(actual, expected64, ref_lowp, factor=2.0, floor=1e-6):
    """flash-attention's rule: error vs float64 at most `factor` x the reference's own error at that precision."""
    err = (actual.double() - expected64).abs().max().item()
    ref_err = (ref_lowp.double() - expected64).abs().max().item()
    return err <= factor * ref_err + floor, err, ref_err
