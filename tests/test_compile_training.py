"""Every loss inside a model compiled with fullgraph=True trains like eager."""

import copy

import pytest
import torch

import metricops
from common import assert_close, cpu_and_cuda

LOSSES = {
    "batch_hard": lambda e, labels: metricops.batch_hard_triplet_loss(e, labels, margin=0.3),
    "batch_hard_soft_streaming": lambda e, labels: metricops.batch_hard_triplet_loss(
        e, labels, soft=True, memory="streaming"
    ),
    "semihard": lambda e, labels: metricops.semihard_triplet_loss(e, labels, metric="cosine"),
    "batch_all": lambda e, labels: metricops.batch_all_triplet_loss(e, labels, normalize=True),
    "contrastive": lambda e, labels: metricops.contrastive_loss(e, labels, neg_margin=2.0, squared=True),
    "triplet_margin": lambda e, labels: metricops.triplet_margin_loss(e, e.roll(1, 0), e.roll(2, 0), margin=0.5),
    # the log-sum-exp engine's losses
    "supcon": lambda e, labels: metricops.supcon_loss(e, labels, temperature=0.5),
    "ntxent_streaming": lambda e, labels: metricops.ntxent_loss(e, labels, memory="streaming"),
    "multi_similarity_mined": lambda e, labels: metricops.multi_similarity_loss(e, labels, mining_epsilon=0.5),
    "circle": lambda e, labels: metricops.circle_loss(e, labels, gamma=16.0),
    "lifted_structure": lambda e, labels: metricops.lifted_structure_loss(e, labels),
    "info_nce_symmetric": lambda e, labels: metricops.info_nce_loss(e, e.roll(1, 1), symmetric=True),
    # class-parameter losses, with fixed class weights for the 4 labels
    "arcface": lambda e, labels: metricops.arcface_loss(e, labels, _class_weight(e), scale=8.0),
    "proxy_anchor": lambda e, labels: metricops.proxy_anchor_loss(e, labels, _class_weight(e), alpha=8.0),
}


def _class_weight(e):
    """(4, D) class weights made without a generator (traceable): rows of the identity, plus a constant."""
    return torch.eye(4, e.shape[1], device=e.device, dtype=e.dtype) + 0.1


def _train(model, loss_fn, data, labels, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(data), labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _setup(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).to(device)
    data = torch.randn(32, 10, device=device)
    labels = torch.randint(0, 4, (32,), device=device)
    return model, data, labels


def _compare(device, name, backend):
    torch._dynamo.reset()
    model, data, labels = _setup(device)
    eager_model = copy.deepcopy(model)
    initial_weight = model[0].weight.detach().clone()
    loss_fn = LOSSES[name]
    eager_losses, eager_params = _train(eager_model, loss_fn, data, labels)

    def step_loss(embeddings, labels):
        return loss_fn(embeddings, labels)

    compiled_model = torch.compile(model, fullgraph=True, backend=backend)
    compiled_loss = torch.compile(step_loss, fullgraph=True, backend=backend)
    compiled_losses, compiled_params = _train(compiled_model, compiled_loss, data, labels)
    assert_close(compiled_losses, eager_losses, atol=1e-5, rtol=1e-4)
    for a, b in zip(compiled_params, eager_params):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.equal(eager_params[0], initial_weight)  # the steps did train


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_training_matches_eager(device, name):
    # aot_eager traces every op through its fake kernel and autograd formula
    # (fullgraph: no graph break) without paying for inductor's C++ codegen.
    _compare(device, name, "aot_eager")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_inductor_training_all_losses(device):
    torch._dynamo.reset()
    model, data, labels = _setup(device)
    eager_model = copy.deepcopy(model)

    def all_losses(e, labels):
        return sum(fn(e, labels) for fn in LOSSES.values())

    eager_losses, eager_params = _train(eager_model, all_losses, data, labels, steps=2)
    compiled = torch.compile(lambda x, labels: all_losses(model(x), labels), fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    for _ in range(2):
        opt.zero_grad()
        loss = compiled(data, labels)
        loss.backward()
        opt.step()
        got.append(loss.detach())
    assert_close(torch.stack(got), eager_losses, atol=1e-5, rtol=1e-4)
    for a, b in zip(model.parameters(), eager_params):
        assert_close(a.detach(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cuda_graph_capture(name):
    """The loss forwards never sync the host, so forward+backward capture in a CUDA graph."""
    loss_fn = LOSSES[name]
    x = torch.randn(64, 16, device="cuda", requires_grad=True)
    labels = torch.randint(0, 6, (64,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        for _ in range(3):
            x.grad = None
            loss_fn(x, labels).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = loss_fn(x, labels)
        static_loss.backward()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))  # new data in the static input
    graph.replay()
    torch.cuda.synchronize()
    x_eager = x.detach().clone().requires_grad_()
    expected = loss_fn(x_eager, labels)
    expected.backward()
    assert_close(static_loss, expected, atol=1e-5, rtol=1e-4)
    assert_close(x.grad, x_eager.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.needs_cuda
def test_cuda_graph_capture_learnable_temperature():
    """InfoNCE with a learnable temperature captures too: its host check is skipped while capturing, and the op
    reads the scale on the device (an .item() there failed the capture). The graph's gradients, the
    temperature's among them, follow a new temperature written into the static tensor."""
    q = torch.randn(48, 16, device="cuda", requires_grad=True)
    k = torch.randn(48, 16, device="cuda")
    tau = torch.tensor(0.1, device="cuda", requires_grad=True)

    def step():
        loss = metricops.info_nce_loss(q, k, temperature=tau, symmetric=True)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            q.grad = tau.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    q.grad = tau.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():
        tau.fill_(0.07)
    graph.replay()
    torch.cuda.synchronize()
    q_eager = q.detach().clone().requires_grad_()
    tau_eager = torch.tensor(0.07, device="cuda", requires_grad=True)
    expected = metricops.info_nce_loss(q_eager, k, temperature=tau_eager, symmetric=True)
    expected.backward()
    assert_close(static_loss, expected, atol=1e-5, rtol=1e-4)
    assert_close(q.grad, q_eager.grad, atol=1e-5, rtol=1e-4)
    assert_close(tau.grad, tau_eager.grad, atol=1e-5, rtol=1e-4)
