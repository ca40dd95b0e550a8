"""Every native op's fake kernel declares the sizes, strides and dtypes its real kernel returns.

torch.compile plans memory from the fake kernels; inductor then asserts that
each op's real outputs have the declared strides. A fake kernel that returned
``empty_like(x)`` for a transposed ``x`` (while the kernel returns a contiguous
gradient) broke every compiled backward on transposed embeddings, e.g.
``(W @ X).t()``. opcheck did not catch it: it only feeds contiguous inputs.

The op list comes from the dispatcher, so a new op without a sample builder
below fails ``test_every_op_has_samples``. Backward ops get their inputs from
autograd itself: the forward samples are differentiated and the calls to the
``*_backward`` ops are recorded.
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

import metricops  # noqa: F401  (registers the ops)
from common import assert_close, cpu_and_cuda

ops = torch.ops.metricops
ALL_OPS = sorted(
    name.split("::", 1)[1]
    for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("metricops::") and not name.startswith("metricops::_")  # _build_info takes no tensor
)
BACKWARD_OPS = [name for name in ALL_OPS if name.endswith("_backward")]
NOT_DIFFERENTIABLE = {"knn", "triplet_statistics", "mine_triplets"}  # integer results, or detached by design


def _labels(x):
    return torch.arange(x.shape[0], device=x.device) // 2  # pairs: every anchor with B >= 4 has a triplet


def _pair_labels(x):
    return torch.arange(x.shape[0], device=x.device) % 2 == 0


# op name -> (embeddings x, x2, x3 of one shape) -> argument tuples. Cover each
# code path whose output layout could differ (metrics, streaming, normalize, reductions).
FORWARD_SAMPLES = {
    "pairwise_distance": lambda x, x2, x3: [(x, x2, "euclidean"), (x, None, "cosine"), (x, None, "sqeuclidean")],
    "l2_normalize": lambda x, x2, x3: [(x, 1e-12)],
    "batch_hard_triplet": lambda x, x2, x3: [
        (x, _labels(x), 0.2, "euclidean", False, 0, False),
        (x, _labels(x), 0.2, "euclidean", False, 0, True),
        (x, _labels(x), 0.2, "cosine", True, 2, False),
    ],
    "semihard_triplet": lambda x, x2, x3: [(x, _labels(x), 0.2, "euclidean"), (x, _labels(x), 0.5, "cosine")],
    "semihard_triplet_streaming": lambda x, x2, x3: [(x, _labels(x), 0.2, "euclidean", 2)],
    "batch_all_triplet": lambda x, x2, x3: [(x, _labels(x), 0.2, "sqeuclidean")],
    "batch_all_triplet_streaming": lambda x, x2, x3: [(x, _labels(x), 0.2, "euclidean", 2)],
    "triplet_statistics": lambda x, x2, x3: [(x, _labels(x), 0.2, "euclidean")],
    "mine_triplets": lambda x, x2, x3: [(x, _labels(x), "all", 0.2, "euclidean")],
    "contrastive_loss": lambda x, x2, x3: [
        (x, _labels(x), 0.0, 1.0, "euclidean", False, "mean"),
        (x, _labels(x), 0.1, 2.0, "cosine", True, "none"),
    ],
    "contrastive_loss_streaming": lambda x, x2, x3: [(x, _labels(x), 0.0, 1.0, "euclidean", True, "sum", 2)],
    "pair_contrastive_loss": lambda x, x2, x3: [(x, x2, _pair_labels(x), 1.0, "euclidean", False)],
    "triplet_margin_loss": lambda x, x2, x3: [
        (x, x2, x3, 1.0, 2.0, 1e-6, False, False),
        (x, x2, x3, 1.0, 1.5, 1e-6, True, False),
        (x, x2, x3, 1.0, 2.0, 0.0, False, True),
    ],
    "knn": lambda x, x2, x3: [(x, x2, 2, "euclidean"), (x, None, 2, "cosine", 2)] if x.shape[0] > 2 else [],
    # weight/proxies: x2 (C = B >= 1 classes; labels arange(B) // 2 are in range)
    "margin_softmax_loss": lambda x, x2, x3: (
        [(x, _labels(x), x2, "arcface", 0.5, 4.0), (x, _labels(x), x2, "cosface", 0.35, 4.0, 2)] if len(x) else []
    ),
    "proxy_anchor_loss": lambda x, x2, x3: (
        [(x, _labels(x), x2, 0.1, 4.0), (x, _labels(x), x2, 0.1, 4.0, 2)] if len(x) else []
    ),
}


def _as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _randn_like(t, generator):
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


def _relayout(t, layout):
    """The same values (differentiably) in another memory layout; 0-d and empty tensors are left alone."""
    if t.dim() == 0 or t.numel() == 0 or layout == "contiguous":
        return t
    if layout == "transposed":  # column-major, as (W @ X).t()
        return t.t().contiguous().t() if t.dim() == 2 else t
    if layout == "expanded":  # stride 0 along the rows: every row is row 0
        return t[:1].expand(t.shape)
    if layout == "sliced":  # a row stride larger than the row
        wide = torch.nn.functional.pad(t, (0, 3))
        return wide[..., : t.shape[-1]]
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed", "expanded", "sliced")
SHAPES = ((6, 4), (6, 1), (1, 4), (0, 4))


class _RecordBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metricops" and func._opname.endswith("_backward"):
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


def _samples(device, dtype):
    """(op name, arguments, what) for every op: forwards from FORWARD_SAMPLES, backwards as autograd calls them."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for layout in LAYOUTS:
            what = f"{layout} {shape} {dtype}"
            leaves = [torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_() for _ in range(3)]
            embeddings = [_relayout(t, layout) for t in leaves]
            for name, build in FORWARD_SAMPLES.items():
                for args in build(*embeddings):
                    out.append((name, args, what))
                    if name in NOT_DIFFERENTIABLE:
                        continue
                    results = [r for r in _as_tuple(getattr(ops, name)(*args)) if r.requires_grad]
                    grads = [_relayout(_randn_like(r, gen), layout) for r in results]
                    with _RecordBackwardCalls() as recorder:
                        torch.autograd.grad(results, leaves, grads, allow_unused=True)
                    out += [(op, call_args, f"{what}, from {name}") for op, call_args in recorder.calls]
    return out


def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _fake_run(name, args):
    mode = FakeTensorMode(shape_env=ShapeEnv())  # a shape env: mine_triplets' output size is data-dependent
    fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in _detached(args)]
    with mode:
        return getattr(ops, name)(*fake_args)


def _metadata_mismatch(real, fake):
    """What differs between a real output and its fake twin (strides of size-0/1 dims are meaningless)."""
    if (real.dtype, real.device, real.dim()) != (fake.dtype, fake.device, fake.dim()):
        return f"{real.dtype}/{real.device}/{real.dim()}-D vs fake {fake.dtype}/{fake.device}/{fake.dim()}-D"
    if any(isinstance(s, torch.SymInt) for s in fake.shape):  # data-dependent size: only its rank is known
        return None
    if tuple(real.shape) != tuple(fake.shape):
        return f"shape {tuple(real.shape)} vs fake {tuple(fake.shape)}"
    if real.numel() > 0 and any(n > 1 and r != f for n, r, f in zip(real.shape, real.stride(), fake.stride())):
        return f"strides {real.stride()} vs fake {fake.stride()} (shape {tuple(real.shape)})"
    return None


def test_every_op_has_samples():
    assert set(FORWARD_SAMPLES) == set(ALL_OPS) - set(BACKWARD_OPS), "add a sample builder for each new forward op"
    for name in BACKWARD_OPS:
        assert name.removesuffix("_backward") in FORWARD_SAMPLES, f"{name}: which forward op calls it?"


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fake_kernels_match_real_outputs(device):
    """Sizes, strides and dtypes of every output of every op, on transposed/expanded/sliced and edge-shaped inputs."""
    seen = set()
    failures = []
    for dtype in (torch.float32, torch.float64):
        for name, args, what in _samples(device, dtype):
            seen.add(name)
            real = _as_tuple(getattr(ops, name)(*_detached(args)))
            fake = _as_tuple(_fake_run(name, args))
            assert len(real) == len(fake), name
            for i, (r, f) in enumerate(zip(real, fake)):
                # The fakes declare contiguous outputs: the kernels must keep returning them.
                if not r.is_contiguous():
                    failures.append(f"{name} output {i} ({what}): the kernel returned strides {r.stride()}")
                mismatch = _metadata_mismatch(r, f)
                if mismatch:
                    failures.append(f"{name} output {i} ({what}): {mismatch}")
    assert seen == set(ALL_OPS), f"ops never exercised: {sorted(set(ALL_OPS) - seen)}"
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} mismatches)"


@pytest.mark.parametrize("name", sorted(FORWARD_SAMPLES))
def test_fake_kernels_refuse_integer_embeddings_like_the_kernels(name):
    """Under torch.compile the fake kernel's check is the one that fires: same rule, same words."""
    x = torch.randint(0, 5, (6, 4))
    args = FORWARD_SAMPLES[name](x, x, x)[0]
    for run in (lambda: getattr(ops, name)(*args), lambda: _fake_run(name, args)):
        with pytest.raises((TypeError, RuntimeError), match=r"must be float32 or float64 \(float16/bfloat16 on CUDA\)"):
            run()


class _StrideCheckingInterpreter(torch.fx.Interpreter):
    """Runs an AOT graph eagerly, asserting each metricops op's outputs against the fake kernel's (node.meta["val"]).

    The check inductor's generated code makes (assert_size_stride), without inductor's compile time.
    """

    def run_node(self, node):
        result = super().run_node(node)
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "metricops":
            for i, (real, fake) in enumerate(zip(_as_tuple(result), _as_tuple(node.meta["val"]))):
                mismatch = _metadata_mismatch(real, fake)
                assert mismatch is None, f"{node.target} output {i}: {mismatch}"
        return result


def _stride_checking_compiler(graph_module, example_inputs):
    return make_boxed_func(lambda *args: _StrideCheckingInterpreter(graph_module).run(*args))


STRIDE_CHECKING_BACKEND = aot_autograd(fw_compiler=_stride_checking_compiler, bw_compiler=_stride_checking_compiler)


DIFFERENTIABLE_OPS = sorted(set(FORWARD_SAMPLES) - NOT_DIFFERENTIABLE)
B, D = 6, 4
# layout -> (leaf shape, the in-graph view that gives (B, D) embeddings in that layout)
IN_GRAPH_VIEWS = {
    "transposed": ((D, B), lambda w: w.t()),  # as (W @ X).t()
    "sliced": ((B, D + 3), lambda w: w[:, :D]),  # row stride D + 3
    "expanded": ((1, D), lambda w: w.expand(B, D)),  # row stride 0
}


def _weighted_sum(name, embeddings, cotangents):
    """Sum over the op's samples of <output, cotangent> for each differentiable output."""
    total = 0
    for args, cots in zip(FORWARD_SAMPLES[name](*embeddings), cotangents):
        results = _as_tuple(getattr(ops, name)(*args))
        total = total + sum((results[i] * c).sum() for i, c in cots.items())
    return total


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", sorted(IN_GRAPH_VIEWS))
@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS)
def test_compiled_backward_on_strided_embeddings(device, name, layout):
    """torch.compile(fullgraph) forward+backward of each op on non-contiguous embeddings equals eager.

    aot_eager never compares real strides with the fake kernels' (inductor
    does, at seconds of compile per op), so this backend runs AOT autograd's
    graphs eagerly with inductor's stride assertion added.
    """
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    leaf_shape, view = IN_GRAPH_VIEWS[layout]
    leaves = [torch.randn(leaf_shape, generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in range(3)]
    # A random cotangent for each differentiable output, so that every input of the backward op is exercised.
    cotangents = []
    for args in FORWARD_SAMPLES[name](*[view(w) for w in leaves]):
        results = _as_tuple(getattr(ops, name)(*args))
        cotangents.append({i: _randn_like(r, gen) for i, r in enumerate(results) if r.requires_grad})

    def step(*leaves):
        return _weighted_sum(name, [view(w) for w in leaves], cotangents)

    expected = step(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    got = torch.compile(step, fullgraph=True, backend=STRIDE_CHECKING_BACKEND)(*leaves)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    assert_close(got, expected, atol=1e-9, rtol=1e-7)
    for g, e in zip(got_grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close(g, e, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_inductor_backward_on_transposed_embeddings(device):
    """The reported failure, under inductor itself: a loss on (W @ X).t() inside a compiled step."""
    torch._dynamo.reset()
    weight = torch.randn(8, 5, dtype=torch.float64, device=device, requires_grad=True)
    inputs = torch.randn(5, 12, dtype=torch.float64, device=device)
    labels = torch.arange(12, device=device) // 3

    def step(weight):
        embeddings = (weight @ inputs).t()  # (12, 8), column-major
        # one loss: each costs seconds of inductor compile; the other ops run under STRIDE_CHECKING_BACKEND
        return metricops.contrastive_loss(embeddings, labels)

    (expected,) = torch.autograd.grad(step(weight), weight)
    # No cache: an artifact compiled with correct fake kernels would hide wrong ones.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        (got,) = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="inductor")(weight), weight)
    assert_close(got, expected, atol=1e-9, rtol=1e-7)
