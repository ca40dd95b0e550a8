"""Every native op, from the dispatcher's list, driven by the sample table (tests/samples.py).

For each op: its registrations exist (fake kernel, autograd, autocast, a sample
builder), its outputs match metricops.reference in float64, its gradients pass
gradcheck, torch.library.opcheck passes for it and for the backward ops it
calls, it compiles with torch.compile(fullgraph=True), and its fake kernel
refuses bad shapes and dtypes with the exception type the C++ kernel raises.
(The compiled forward+backward of the differentiable ops on strided inputs is
tests/test_op_layouts.py, from the same table.)
"""

import pytest
import torch

import metricops  # noqa: F401  (registers the ops)
from metricops._registrations.similarity import LIN_NEG, LIN_POS, LSE_NEG, LSE_POS, TERM
from metricops._registrations._common import LIB, backward_op_names, forward_of, forward_op_names, native_op_names
from common import assert_close, cpu_and_cuda
from samples import NOT_DIFFERENTIABLE, SAMPLES, as_tuple, backward_samples, detached, embeddings, fake_run

ops = torch.ops.metricops
FORWARD_OPS = forward_op_names()
DIFFERENTIABLE_OPS = sorted(set(FORWARD_OPS) - NOT_DIFFERENTIABLE)
# The dispatcher's own list: a schema added to csrc/metricops.cpp shows up here without any Python change.
DISPATCHER_OPS = sorted(
    name[len(LIB) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(LIB) and "::_" not in name
)


def _has_kernel(name, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(LIB + name, key)


def test_every_op_is_registered_and_has_samples():
    assert DISPATCHER_OPS == native_op_names() and DISPATCHER_OPS, "the registrations iterate another op list"
    missing = []
    for name in DISPATCHER_OPS:
        if not _has_kernel(name, "Meta"):
            missing.append(f"{name}: no fake kernel (torch.library.register_fake in metricops/_registrations/)")
        if not _has_kernel(name, "Autograd"):
            missing.append(f"{name}: no Autograd kernel (register_autograd or register_not_differentiable)")
        if name in backward_op_names():
            if forward_of(name) not in SAMPLES:
                missing.append(f"{name}: no forward op {forward_of(name)!r} in tests/samples.py SAMPLES")
            continue
        if name not in SAMPLES:
            missing.append(f"{name}: no entry in tests/samples.py SAMPLES")
        for key in ("AutocastCPU", "AutocastCUDA"):
            if not _has_kernel(name, key):
                missing.append(f"{name}: no {key} kernel")
    assert not missing, "\n".join(missing)
    assert set(SAMPLES) <= set(FORWARD_OPS), (
        f"samples of ops that do not exist: {sorted(set(SAMPLES) - set(FORWARD_OPS))}"
    )
    for name in FORWARD_OPS:
        assert SAMPLES[name](*embeddings((6, 4), "cpu", torch.float64)), f"{name}: no sample at B=6"


# Engine ops whose outputs are internal statistics (13 per row): their parity with metricops.reference is
# checked through every public loss built on them, for every policy, tile shape and memory mode.
CHECKED_THROUGH_PUBLIC_LOSSES = {
    "lse_stats": "checked through the similarity losses against metricops.reference in tests/test_similarity.py",
}

# Ops whose outputs carry gradients in some columns only (the schema says which): lse_stats' log-sum-exps, linear
# sums and its head's term; its other statistics are piecewise constant or enter the callers' formulas as constants.
DIFFERENTIABLE_COLUMNS = {"lse_stats": [LSE_POS, LSE_NEG, LIN_POS, LIN_NEG, TERM]}


def _leaves_in(args, leaves):
    """The leaves that appear among args (the op's differentiable inputs)."""
    return [leaf for leaf in leaves if any(a is leaf for a in args)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_matches_reference(device, name):
    """Each sample's leading outputs against metricops.reference in float64 (integer outputs exactly)."""
    if name in CHECKED_THROUGH_PUBLIC_LOSSES:
        assert all(s.reference is None for s in SAMPLES[name](*embeddings((6, 4), "cpu", torch.float64)))
        pytest.skip(CHECKED_THROUGH_PUBLIC_LOSSES[name])
    checked = 0
    for shape in ((6, 4), (0, 4)):
        for sample in SAMPLES[name](*embeddings(shape, device, torch.float64)):
            got = as_tuple(getattr(ops, name)(*sample.args))
            expected = as_tuple(sample.reference(*sample.args))
            assert len(expected) <= len(got)
            for i, (g, e) in enumerate(zip(got, expected)):
                if e.dtype.is_floating_point:
                    assert_close(g, e)
                else:
                    assert torch.equal(g.cpu(), e.cpu().to(g.dtype)), (name, sample.args[2:], i)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS)
def test_gradcheck(device, name):
    """Gradients of every differentiable output, random inputs away from ties and hinge kinks."""
    leaves = embeddings((6, 4), device, torch.float64, requires_grad=True)
    for index, sample in enumerate(SAMPLES[name](*leaves)):
        used = _leaves_in(sample.args, leaves)

        def fn(*inputs, index=index, used=used):
            swap = {id(leaf): t for leaf, t in zip(used, inputs)}
            args = SAMPLES[name](*[swap.get(id(leaf), leaf) for leaf in leaves])[index].args
            outputs = as_tuple(getattr(ops, name)(*args))
            if name in DIFFERENTIABLE_COLUMNS:
                # (its 1-D outputs, like lse_stats' saved tiles, are not differentiable: gradcheck skips them)
                outputs = tuple(out[:, DIFFERENTIABLE_COLUMNS[name]] if out.dim() == 2 else out for out in outputs)
            return tuple(r for r in outputs if r.is_floating_point())  # indices: no grad

        assert torch.autograd.gradcheck(fn, used, eps=1e-6, atol=1e-5), (name, sample.args[2:])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(device, name):
    """torch.library.opcheck on every sample of the op, and on every backward op call its gradient makes."""
    gen = torch.Generator().manual_seed(0)
    # The output size of mine_triplets depends on the data: checked without the AOT-dispatch test.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if name == "mine_triplets" else None
    kwargs = {} if utils is None else {"test_utils": utils}
    for shape in ((6, 4), (0, 4)):
        leaves = embeddings(shape, device, torch.float64, generator=gen, requires_grad=True)
        # On empty inputs, the first sample (an edge case for the fake kernels, not another code path).
        for sample in SAMPLES[name](*leaves)[: None if shape[0] else 1]:
            torch.library.opcheck(getattr(ops, name).default, sample.args, **kwargs)
            if name in NOT_DIFFERENTIABLE:
                continue
            randn = lambda r: torch.randn(r.shape, generator=gen, dtype=r.dtype).to(r.device)  # noqa: E731
            for backward_name, args in backward_samples(name, sample.args, leaves, randn):
                torch.library.opcheck(getattr(ops, backward_name).default, detached(args))


@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS)
def test_backward_ops_refuse_double_backward(name):
    """Each *_backward op (registered from the op list) refuses to be differentiated, naming its forward op."""
    leaves = embeddings((6, 4), "cpu", torch.float64, requires_grad=True)
    calls = []
    for sample in SAMPLES[name](*leaves):
        calls += backward_samples(name, sample.args, leaves, torch.ones_like)
    for backward_name, args in calls:
        args = [
            a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        ]
        outputs = [r for r in as_tuple(getattr(ops, backward_name)(*args)) if r.requires_grad]
        with pytest.raises(RuntimeError, match=f"metricops: double backward of {forward_of(backward_name)} is not"):
            torch.autograd.grad(sum(r.sum() for r in outputs), [a for a in args if isinstance(a, torch.Tensor)][1])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(NOT_DIFFERENTIABLE))
def test_not_differentiable_ops_compile_and_return_constants(device, name):
    """torch.compile(fullgraph=True) of the ops without a gradient equals eager; their outputs never require grad."""
    torch._dynamo.reset()
    leaves = embeddings((6, 4), device, torch.float64, requires_grad=True)

    def run_all(*xs):
        return [getattr(ops, name)(*sample.args) for sample in SAMPLES[name](*xs)]

    expected = run_all(*leaves)
    got = torch.compile(run_all, fullgraph=True, backend="aot_eager")(*leaves)
    for e, g in zip(expected, got):
        for ei, gi in zip(as_tuple(e), as_tuple(g)):
            assert not ei.requires_grad
            assert_close(gi, ei, atol=0, rtol=0)


def _bad_variants(args):
    """(what, args) with one tensor argument given a bad shape or a bad dtype."""
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        bad_shape = a.unsqueeze(0) if a.dim() in (0, 2) else a[:-1]
        bad_dtype = a.to(torch.int32) if a.is_floating_point() else a.to(torch.float32)
        for what, bad in (
            (f"argument {i} of shape {tuple(bad_shape.shape)}", bad_shape),
            (f"argument {i} as {bad_dtype.dtype}", bad_dtype),
        ):
            yield what, args[:i] + (bad,) + args[i + 1 :]
        if a.dim() == 2:  # another embedding size D
            yield f"argument {i} with D - 1 columns", args[:i] + (a[:, :-1],) + args[i + 1 :]


def _raised(run):
    try:
        run()
    except Exception as exc:  # noqa: BLE001  (the type is the result)
        return type(exc)
    return None


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_fake_kernels_raise_like_the_kernels(name):
    """A bad shape or dtype raises the same exception type from the fake kernel (under torch.compile) as eagerly."""
    refused = 0
    for sample in SAMPLES[name](*embeddings((6, 4), "cpu", torch.float64)):
        for what, args in _bad_variants(sample.args):
            eager = _raised(lambda: getattr(ops, name)(*args))
            fake = _raised(lambda: fake_run(name, args))
            assert fake is eager, f"{name}, {what}: eager raises {eager}, the fake kernel {fake}"
            refused += eager is not None
    assert refused > 0
