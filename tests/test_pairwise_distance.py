import pytest
import torch

import metricops
from metricops import reference
from common import LAYOUTS, METRICS, assert_close, cpu_and_cuda, low_precision_error_ok, make_layout


# (M, N or None for y=None, D): one list drives parity, gradient and opcheck tests.
SHAPES = [
    (7, None, 5),
    (7, 4, 5),
    (0, None, 3),
    (0, 3, 3),
    (3, 0, 3),
    (1, None, 4),
    (1, 1, 4),
    (6, None, 1),
    (5, 9, 1),
    (8, None, 4096),
    (33, 65, 17),
]


def sample_inputs(device, dtype=torch.float64, requires_grad=False, small=False):
    shapes = [s for s in SHAPES if not small or s[2] <= 17]
    for M, N, D in shapes:
        for metric in METRICS:
            x = torch.randn(M, D, dtype=dtype, device=device, requires_grad=requires_grad)
            y = None if N is None else torch.randn(N, D, dtype=dtype, device=device, requires_grad=requires_grad)
            yield pytest.param(x, y, metric, id=f"{metric}-{M}x{N}x{D}")


def _cases(device, **kw):
    return [p.values for p in sample_inputs(device, **kw)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference(device, dtype, normalize):
    for x, y, metric in _cases(device, dtype=dtype):
        out = metricops.pairwise_distance(x, y, metric=metric, normalize=normalize)
        xr = x.double()
        yr = None if y is None else y.double()
        expected = reference.pairwise_distance(xr, yr, metric=metric, normalize=normalize)
        assert out.dtype == dtype and out.shape == expected.shape
        scale = 1.0 if metric == "cosine" else max(1.0, x.shape[1] / 8)  # Gram rounding grows with D
        tol = 1e-9 if dtype == torch.float64 else 1e-4 * scale
        assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(device, layout):
    x = torch.randn(9, 6, dtype=torch.float64, device=device)
    y = torch.randn(4, 6, dtype=torch.float64, device=device)
    for metric in METRICS:
        expected = reference.pairwise_distance(x, y, metric=metric)
        assert_close(
            metricops.pairwise_distance(make_layout(x, layout), make_layout(y, layout), metric=metric), expected
        )
        expected_self = reference.pairwise_distance(x, metric=metric)
        assert_close(metricops.pairwise_distance(make_layout(x, layout), metric=metric), expected_self)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_cdist(device, dtype):
    x = torch.randn(40, 24, dtype=dtype, device=device)
    y = torch.randn(30, 24, dtype=dtype, device=device)
    # cdist's Gram path leaves rounding noise on the self diagonal (up to ~4e-3
    # in float32), where ours is exactly 0: compare off the diagonal.
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for yy in (y, None):
        expected = torch.cdist(x, x if yy is None else yy)
        got = metricops.pairwise_distance(x, yy)
        got_sq = metricops.pairwise_distance(x, yy, metric="sqeuclidean")
        if yy is None:
            off = ~torch.eye(x.shape[0], dtype=torch.bool, device=device)
            expected, got, got_sq = expected[off], got[off], got_sq[off]
        assert_close(got, expected, atol=tol, rtol=tol)
        assert_close(got_sq, expected**2, atol=10 * tol, rtol=tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_self_diagonal_exactly_zero(device):
    x = torch.randn(50, 33, device=device) * 100
    for metric in ("euclidean", "sqeuclidean"):
        d = metricops.pairwise_distance(x, metric=metric)
        assert torch.all(d.diagonal() == 0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(device, normalize):
    for x, y, metric in _cases(device, requires_grad=True, small=True):
        inputs = (x,) if y is None else (x, y)
        fn = lambda *t: metricops.pairwise_distance(*t, metric=metric, normalize=normalize)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_gradient_matches_reference(device, metric):
    x = torch.randn(12, 8, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(10, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(12, 10, dtype=torch.float64, device=device)
    g_native = torch.autograd.grad((metricops.pairwise_distance(x, y, metric=metric) * w).sum(), (x, y))
    g_ref = torch.autograd.grad((reference.pairwise_distance(x, y, metric=metric) * w).sum(), (x, y))
    for a, b in zip(g_native, g_ref):
        assert_close(a, b)
    ws = torch.randn(12, 12, dtype=torch.float64, device=device)
    (gs_native,) = torch.autograd.grad((metricops.pairwise_distance(x, metric=metric) * ws).sum(), (x,))
    (gs_ref,) = torch.autograd.grad((reference.pairwise_distance(x, metric=metric) * ws).sum(), (x,))
    assert_close(gs_native, gs_ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_zero_distance_and_zero_vector_gradient_finite(device, metric):
    base = torch.randn(3, 5, dtype=torch.float64, device=device)
    x = torch.cat([base, base, torch.zeros(1, 5, dtype=torch.float64, device=device)]).requires_grad_()
    for y in (None, x):
        d = metricops.pairwise_distance(x, y, metric=metric)
        (g,) = torch.autograd.grad(d.sum(), x)
        assert torch.isfinite(g).all()
        assert_close(g, torch.autograd.grad(reference.pairwise_distance(x, y, metric=metric).sum(), x)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_nan_out(device, metric):
    x = torch.randn(4, 3, device=device)
    x[1, 2] = float("nan")
    d = metricops.pairwise_distance(x, metric=metric)
    assert torch.isnan(d[1, 0]) and torch.isnan(d[0, 1])
    assert not torch.isnan(d[0, 2])


def test_double_backward_refused():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(metricops.pairwise_distance(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def fn(x, y):
        return (metricops.pairwise_distance(x, y, metric="euclidean") ** 2).sum() + metricops.pairwise_distance(
            x, metric="cosine", normalize=True
        ).mean()

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(16, 8, device=device, requires_grad=True)
    y = torch.randn(12, 8, device=device, requires_grad=True)
    out_c = compiled(x, y)
    gx_c, gy_c = torch.autograd.grad(out_c, (x, y))
    out_e = fn(x, y)
    gx_e, gy_e = torch.autograd.grad(out_e, (x, y))
    assert_close(out_c, out_e)
    assert_close(gx_c, gx_e)
    assert_close(gy_c, gy_e)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_cuda(dtype, metric):
    x = torch.randn(256, 128, device="cuda")
    y = torch.randn(200, 128, device="cuda")
    expected = reference.pairwise_distance(x.double(), y.double(), metric=metric)
    ref_lowp = reference.pairwise_distance(x.to(dtype), y.to(dtype), metric=metric)
    out = metricops.pairwise_distance(x.to(dtype), y.to(dtype), metric=metric)
    assert out.dtype == dtype
    ok, err, ref_err = low_precision_error_ok(out, expected, ref_lowp)
    assert ok, (err, ref_err)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: metricops.pairwise_distance(torch.randn(3)), ValueError, "x must be a 2-D tensor"),
        (lambda: metricops.pairwise_distance(torch.randn(2, 3, 4)), ValueError, "x must be a 2-D tensor"),
        (
            lambda: metricops.pairwise_distance(torch.randn(3, 4), torch.randn(3, 5)),
            ValueError,
            "same embedding size D",
        ),
        (
            lambda: metricops.pairwise_distance(torch.ones(3, 4, dtype=torch.int64)),
            TypeError,
            "x must be float32 or float64",
        ),
        (lambda: metricops.pairwise_distance(torch.randn(3, 4).half()), TypeError, "float16/bfloat16 on CUDA"),
        (
            lambda: metricops.pairwise_distance(torch.randn(3, 4), torch.randn(3, 4).double()),
            TypeError,
            "y must have the same dtype",
        ),
        (
            lambda: metricops.pairwise_distance(torch.randn(3, 4), metric="manhattan"),
            ValueError,
            "metric must be one of",
        ),
        (lambda: metricops.pairwise_distance(torch.randn(3, 4), metric=None), ValueError, "metric must be one of"),
        (lambda: metricops.pairwise_distance([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
        (
            lambda: metricops.pairwise_distance(torch.randn(3, 4), normalize="yes"),
            TypeError,
            "normalize must be a bool",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(3), None, "euclidean"), "x must be a 2-D tensor"),
        ((torch.randn(3, 4), torch.randn(3, 5), "euclidean"), "same embedding size D"),
        ((torch.ones(3, 4, dtype=torch.int64), None, "euclidean"), "x must be float32 or float64"),
        ((torch.randn(3, 4), None, "manhattan"), "metric must be one of"),
    ],
)
def test_bad_input_reaches_native_checks(args, match):
    # The C++ checks are the last line for direct torch.ops calls.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.metricops.pairwise_distance(*args)


@pytest.mark.needs_cuda
def test_mixed_devices_refused():
    with pytest.raises(ValueError, match="y must be on the same device as x"):
        metricops.pairwise_distance(torch.randn(3, 4), torch.randn(3, 4, device="cuda"))
    with pytest.raises((RuntimeError, ValueError), match="y must be on the same device as x"):
        torch.ops.metricops.pairwise_distance(torch.randn(3, 4), torch.randn(3, 4, device="cuda"), "euclidean")


def test_mixed_devices_refused_meta():
    # Without a GPU, a meta tensor stands in for "another device".
    with pytest.raises(ValueError, match="y must be on the same device as x"):
        metricops.pairwise_distance(torch.randn(3, 4), torch.randn(3, 4, device="meta"))


def test_module():
    m = metricops.nn.PairwiseDistance(metric="cosine")
    x = torch.randn(5, 3)
    assert_close(m(x), reference.pairwise_distance(x.double(), metric="cosine"), dtype=torch.float32)
    assert "cosine" in repr(m)
