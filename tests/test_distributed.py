"""metricops.distributed on 2 CPU processes (gloo) against one process on the concatenated batch.

One spawn runs every scenario (process start-up dominates the cost); each rank
saves its losses and gradients and the tests below compare them in the parent.
Shards have unequal sizes (5 and 7 rows), and one scenario gives rank 0 an
empty shard.
"""

import datetime
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metricops
from metricops import distributed as mdist
from metricops import nn as mnn
from metricops import _memory
from common import assert_close

WORLD = 2
SIZES = (5, 7)  # rows per rank: unequal on purpose
D_IN, D_OUT = 6, 4

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def loss_cases():
    """name -> (module factory, DistributedLoss kwargs). Covers every reduction path."""
    return {
        "batch_hard_mean": (lambda: mnn.BatchHardTripletLoss(margin=0.3), {}),
        "batch_hard_mean_nonzero_sq": (
            lambda: mnn.BatchHardTripletLoss(margin=0.3, metric="sqeuclidean", reduction="mean_nonzero"),
            {},
        ),
        "batch_hard_sum_cosine_norm": (
            lambda: mnn.BatchHardTripletLoss(margin=0.3, metric="cosine", normalize=True, reduction="sum"),
            {},
        ),
        "batch_hard_soft": (lambda: mnn.BatchHardTripletLoss(soft=True), {}),
        "batch_hard_scaled": (lambda: mnn.BatchHardTripletLoss(margin=0.3), {"scale_by_world_size": True}),
        "semihard_mean": (lambda: mnn.SemiHardTripletLoss(margin=0.5), {}),
        "semihard_sum": (lambda: mnn.SemiHardTripletLoss(margin=0.5, reduction="sum"), {}),
        "semihard_mean_nonzero_cosine": (
            lambda: mnn.SemiHardTripletLoss(margin=0.5, metric="cosine", reduction="mean_nonzero"),
            {},
        ),
        "contrastive_mean": (lambda: mnn.ContrastiveLoss(neg_margin=2.0), {}),
        "contrastive_mean_nonzero_sq": (
            lambda: mnn.ContrastiveLoss(pos_margin=0.5, neg_margin=2.0, squared=True, reduction="mean_nonzero"),
            {},
        ),
        "contrastive_sum_norm": (lambda: mnn.ContrastiveLoss(neg_margin=1.0, normalize=True, reduction="sum"), {}),
        "batch_all_mean_nonzero": (lambda: mnn.BatchAllTripletLoss(margin=0.5), {}),
        "batch_all_mean": (lambda: mnn.BatchAllTripletLoss(margin=0.5, reduction="mean"), {}),
        "batch_all_scaled": (lambda: mnn.BatchAllTripletLoss(margin=0.5), {"scale_by_world_size": True}),
        # memory="streaming" (the workers stream in blocks of 2 rows: every shard spans several blocks)
        "batch_hard_streaming": (lambda: mnn.BatchHardTripletLoss(margin=0.3, memory="streaming"), {}),
        "semihard_streaming_mean": (lambda: mnn.SemiHardTripletLoss(margin=0.5, memory="streaming"), {}),
        "semihard_streaming_mean_nonzero": (
            lambda: mnn.SemiHardTripletLoss(margin=0.5, reduction="mean_nonzero", memory="streaming"),
            {},
        ),
        "contrastive_streaming_mean": (lambda: mnn.ContrastiveLoss(neg_margin=2.0, memory="streaming"), {}),
        "contrastive_streaming_mean_nonzero_sq": (
            lambda: mnn.ContrastiveLoss(
                pos_margin=0.5, neg_margin=2.0, squared=True, reduction="mean_nonzero", memory="streaming"
            ),
            {},
        ),
        "contrastive_streaming_sum_cosine_norm": (
            lambda: mnn.ContrastiveLoss(
                neg_margin=0.5, metric="cosine", normalize=True, reduction="sum", memory="streaming"
            ),
            {"scale_by_world_size": True},
        ),
    }


def empty_shard_streaming_loss():
    return mnn.ContrastiveLoss(neg_margin=2.0, reduction="mean_nonzero", memory="streaming")


def global_data():
    """The concatenated batch, identical on every process: inputs (B, D_IN), labels (B,), a model."""
    gen = torch.Generator().manual_seed(7)
    b = sum(SIZES)
    z = torch.randn(b, D_IN, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (b,), generator=gen)
    labels[3] = 99  # a singleton: an anchor without positives
    torch.manual_seed(3)
    model = torch.nn.Linear(D_IN, D_OUT).double()
    # per-rank weights for the all_gather test: rank r's loss is (gathered * W[r]).sum()
    weights = torch.randn(WORLD, b, D_OUT, generator=gen, dtype=torch.float64)
    return z, labels, model, weights


def _shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _grads(loss, emb, model):
    return [g.detach() for g in torch.autograd.grad(loss, [emb, *model.parameters()])]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    _memory.CPU_STREAM_BLOCK_ROWS = 2  # streaming modules cross block boundaries within a shard
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        z, labels, model, weights = global_data()
        z_r, y_r = _shard(z, SIZES, rank), _shard(labels, SIZES, rank)

        # all_gather_embeddings: values, and the gradient summed over every rank's loss.
        x_r = z_r[:, :D_OUT].clone().requires_grad_(True)
        all_x, all_y = mdist.all_gather_embeddings(x_r, y_r)
        (g,) = torch.autograd.grad((all_x * weights[rank]).sum(), x_r)
        results["gather"] = (all_x.detach(), all_y, g)

        # torch.func.grad through the gather equals torch.autograd.grad; forward mode raises.
        fn = lambda x: (mdist.all_gather_embeddings(x, y_r)[0] * weights[rank]).sum()  # noqa: E731
        results["gather_func_grad"] = torch.func.grad(fn)(z_r[:, :D_OUT].clone())
        try:
            torch.func.jvp(fn, (z_r[:, :D_OUT].clone(),), (torch.ones(SIZES[rank], D_OUT, dtype=torch.float64),))
            results["gather_jvp"] = None
        except NotImplementedError as exc:
            results["gather_jvp"] = str(exc)

        for name, (factory, kw) in loss_cases().items():
            emb = model(z_r)
            loss = mdist.DistributedLoss(factory(), **kw)(emb, y_r)
            results[name] = (loss.detach(), _grads(loss, emb, model))

        # reduction="none" returns the local anchors' rows.
        emb = model(z_r)
        results["batch_hard_none"] = mdist.DistributedLoss(mnn.BatchHardTripletLoss(reduction="none"))(emb, y_r)
        results["contrastive_none"] = mdist.DistributedLoss(mnn.ContrastiveLoss(reduction="none"))(emb, y_r)

        # An empty shard on rank 0: it still takes part in both collectives.
        sizes0 = (0, 6)
        emb = model(_shard(z, sizes0, rank))
        loss = mdist.DistributedLoss(mnn.BatchHardTripletLoss(margin=0.3))(emb, _shard(labels, sizes0, rank))
        results["empty_shard"] = (loss.detach(), _grads(loss, emb, model))
        emb = model(_shard(z, sizes0, rank))
        loss = mdist.DistributedLoss(empty_shard_streaming_loss())(emb, _shard(labels, sizes0, rank))
        results["empty_shard_streaming"] = (loss.detach(), _grads(loss, emb, model))

        # Mismatched D is refused on every rank alike (no rank left waiting).
        try:
            mdist.all_gather_embeddings(
                torch.zeros(2, 3 + rank, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
            )
            results["bad_d"] = None
        except ValueError as exc:
            results["bad_d"] = str(exc)
        # So are mismatched dtypes (gloo aborted one rank and handed the other reinterpreted bytes).
        for key, (emb_dtype, lab_dtype) in {
            "bad_emb_dtype": ((torch.float32, torch.float64)[rank], torch.int64),
            "bad_label_dtype": (torch.float64, (torch.int32, torch.int64)[rank]),
        }.items():
            try:
                mdist.all_gather_embeddings(torch.zeros(2, 3, dtype=emb_dtype), torch.zeros(2, dtype=lab_dtype))
                results[key] = None
            except TypeError as exc:
                results[key] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process(factory, rows=None):
    z, labels, model, _ = global_data()
    z, labels = z[:rows], labels[:rows]
    emb = model(z)
    loss = factory()(emb, labels)
    return loss.detach(), _grads(loss, emb, model)


def test_all_gather_values_and_gradient(ranks):
    z, labels, _, weights = global_data()
    x = z[:, :D_OUT]
    for r in range(WORLD):
        all_x, all_y, g = ranks[r]["gather"]
        assert torch.equal(all_x, x) and torch.equal(all_y, labels)
        # rank r's rows of every rank's weight: the backward summed over ranks
        assert_close(g, _shard(weights.sum(0), SIZES, r))
        assert not torch.equal(g, _shard(weights[r], SIZES, r))


def test_all_gather_under_torch_func(ranks):
    for r in range(WORLD):
        assert torch.equal(ranks[r]["gather_func_grad"], ranks[r]["gather"][2])
        assert "forward-mode AD" in ranks[r]["gather_jvp"]


@pytest.mark.parametrize("name", list(loss_cases()))
def test_summed_gradients_equal_single_process(ranks, name):
    factory, kw = loss_cases()[name]
    loss, (g_emb, *g_params) = _single_process(factory)
    scale = WORLD if kw.get("scale_by_world_size") else 1
    assert loss.item() != 0.0  # the case exercises the loss
    # Each rank's loss is its share; the shares add up to the global loss.
    assert_close(sum(rk[name][0] for rk in ranks), scale * loss)
    # Embedding gradients: rank r's is the global gradient's rows of its shard.
    assert_close(torch.cat([rk[name][1][0] for rk in ranks]), scale * g_emb)
    # Replicated parameters: summed over ranks (DDP averages, hence scale_by_world_size).
    for i, g in enumerate(g_params):
        assert_close(sum(rk[name][1][1 + i] for rk in ranks), scale * g)


def test_local_anchor_shares_differ_across_ranks(ranks):
    # Local anchors are scored on each rank, not the global loss split evenly.
    assert ranks[0]["batch_hard_mean"][0].item() != pytest.approx(ranks[1]["batch_hard_mean"][0].item())
    # batch-all is the documented exception: the global loss / world_size on each rank.
    assert_close(ranks[0]["batch_all_mean"][0], ranks[1]["batch_all_mean"][0])


def test_reduction_none_returns_local_rows(ranks):
    z, labels, model, _ = global_data()
    emb = model(z)
    bh = metricops.batch_hard_triplet_loss(emb, labels, reduction="none")
    ct = metricops.contrastive_loss(emb, labels, reduction="none")
    assert ranks[0]["batch_hard_none"].shape == (SIZES[0],)
    assert ranks[1]["contrastive_none"].shape == (SIZES[1], sum(SIZES))
    assert_close(torch.cat([rk["batch_hard_none"] for rk in ranks]).detach(), bh.detach())
    assert_close(torch.cat([rk["contrastive_none"] for rk in ranks]).detach(), ct.detach())


@pytest.mark.parametrize(
    "name, factory",
    [
        ("empty_shard", lambda: mnn.BatchHardTripletLoss(margin=0.3)),
        ("empty_shard_streaming", empty_shard_streaming_loss),
    ],
)
def test_empty_shard(ranks, name, factory):
    # the worker shards the first 6 rows as (0, 6)
    loss, (g_emb, *g_params) = _single_process(factory, rows=6)
    assert ranks[0][name][0].item() == 0.0 and loss.item() != 0.0
    assert ranks[0][name][1][0].shape == (0, D_OUT)
    assert_close(ranks[0][name][0] + ranks[1][name][0], loss)
    assert_close(ranks[1][name][1][0], g_emb)
    for i, g in enumerate(g_params):
        assert_close(ranks[0][name][1][1 + i] + ranks[1][name][1][1 + i], g)


def test_mismatched_dim_is_refused_on_every_rank(ranks):
    for rk in ranks:
        assert rk["bad_d"] is not None and "same size D on every rank" in rk["bad_d"]


def test_mismatched_dtypes_are_refused_on_every_rank(ranks):
    for rk in ranks:
        assert "embeddings must have the same dtype on every rank" in rk["bad_emb_dtype"]
        assert "torch.float32" in rk["bad_emb_dtype"] and "torch.float64" in rk["bad_emb_dtype"]
        assert "labels must have the same dtype on every rank" in rk["bad_label_dtype"]


# ---------------------------------------------------------------- no process group


def test_without_process_group_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    all_x, all_y = mdist.all_gather_embeddings(x, y)
    assert all_x is x and all_y is y
    modules = [
        mnn.BatchHardTripletLoss(),
        mnn.SemiHardTripletLoss(),
        mnn.ContrastiveLoss(),
        mnn.BatchAllTripletLoss(),
        mnn.BatchHardTripletLoss(reduction="mean_nonzero"),
    ]
    # memory="streaming" modules work too (they used to raise about a reduction='none' never passed).
    for reduction in ("mean", "sum", "mean_nonzero"):
        modules += [
            mnn.SemiHardTripletLoss(margin=0.5, reduction=reduction, memory="streaming"),
            mnn.ContrastiveLoss(neg_margin=2.0, squared=True, reduction=reduction, memory="streaming"),
            mnn.BatchHardTripletLoss(reduction=reduction, memory="streaming"),
        ]
    for module in modules:
        out = mdist.DistributedLoss(module)(x, y)
        expected = module(x, y)
        assert expected.item() != 0.0
        assert_close(out, expected)
        assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(expected, x)[0])


def test_streaming_with_reduction_none_refused_by_its_own_name():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for module in (mnn.SemiHardTripletLoss(memory="streaming"), mnn.ContrastiveLoss(memory="streaming")):
        module.reduction = "none"  # the user's own choice, refused with memory='streaming' as the module does
        with pytest.raises(ValueError, match="must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming'"):
            mdist.DistributedLoss(module)(x, y)
    assert mdist.DistributedLoss(mnn.BatchHardTripletLoss(memory="streaming", reduction="none"))(x, y).shape == (6,)


def test_reads_the_modules_current_attributes():
    # A margin schedule on the wrapped module takes effect through DistributedLoss.
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for module, name, fn in (
        (mnn.BatchHardTripletLoss(), "margin", metricops.batch_hard_triplet_loss),
        (mnn.SemiHardTripletLoss(), "margin", metricops.semihard_triplet_loss),
        (mnn.ContrastiveLoss(), "neg_margin", metricops.contrastive_loss),
    ):
        wrapped = mdist.DistributedLoss(module)
        setattr(module, name, 7.0)
        assert_close(wrapped(x, y), fn(x, y, **{name: 7.0}))


def test_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="embeddings must be a 2-D"):
        mdist.all_gather_embeddings(torch.randn(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of length B=4"):
        mdist.all_gather_embeddings(x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="embeddings must be a floating tensor"):
        mdist.all_gather_embeddings(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="loss_module must be a torch.nn.Module"):
        mdist.DistributedLoss(metricops.batch_hard_triplet_loss)
    with pytest.raises(TypeError, match="scale_by_world_size must be a bool"):
        mdist.DistributedLoss(mnn.BatchHardTripletLoss(), scale_by_world_size=2)


def test_demo_ddp_runs():
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "metricops.demo_ddp", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1" in proc.stdout, proc.stdout
    assert "hit@1" in proc.stdout, proc.stdout
