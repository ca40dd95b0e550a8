"""Every benchmark row compares the same computation: its contenders agree with metricops in value and gradient.

A ratio in the benchmark table (and the README) is a speed-up only if both
sides do the same work. The harness compares each contender's output with
metricops' on every run (benchmarks/harness.py, compare_outputs); here every
row of every suite is checked at the smallest sizes with tight tolerances, on
its own random input and on a clustered one where many hinge terms are 0 (so
"mean" and "mean_nonzero" differ), and the check is shown to catch rows that
compare different losses.
"""

import pytest
import torch

import metricops
from benchmarks.harness import Case, check_agreement
from benchmarks.suites import SUITES
from benchmarks.suites.plain_torch import plain_torch_batch_hard, plain_torch_contrastive, plain_torch_semihard
from benchmarks.suites.triplet import _fwd_bwd
from metricops import reference

pytest.importorskip("pytorch_metric_learning")

TIGHT = dict(value_rtol=1e-3, grad_rtol=1e-3)


def _tiny_cases():
    for op, build in SUITES.items():
        for case in build("cpu", "tiny"):
            sizes = "-".join(f"{k}{v}" for k, v in case.params.items())
            yield pytest.param(case, id=f"{op}-{case.op}-{case.mode}-{sizes}")


def _assert_agree(case: Case):
    check_agreement(case, **TIGHT)
    compared = [n for n in list(case.contenders)[1:] if n not in case.yardsticks]
    assert sorted(case.agreement) == sorted(compared)
    assert not case.disagreeing(), {n: case.agreement[n] for n in case.disagreeing()}


def _cluster_in_place(case: Case):
    """Embeddings drawn around one centre per label, so that some hinge terms are 0 and some are not."""
    x, labels = case.inputs["embeddings"], case.inputs["labels"]
    gen = torch.Generator().manual_seed(5)
    scale = x.shape[1] ** -0.5  # centres about 0.6·√2 apart, points about 0.4·√2 from their centre
    centres = 0.6 * scale * torch.randn(int(labels.max()) + 1, x.shape[1], generator=gen, dtype=x.dtype)
    with torch.no_grad():
        x.copy_(centres[labels] + 0.4 * scale * torch.randn(x.shape, generator=gen, dtype=x.dtype))
        # The point of the clustered input: both zero and non-zero terms, for the normalized triplet losses
        # and for the raw contrastive loss's negative pairs.
        batch_hard = metricops.batch_hard_triplet_loss(x, labels, normalize=True, reduction="none")
        negatives = metricops.contrastive_loss(x, labels, reduction="none")[labels[:, None] != labels[None, :]]
        for terms in (batch_hard, negatives):
            assert 0 < (terms > 0).float().mean() < 1


@pytest.mark.parametrize("case", list(_tiny_cases()))
def test_every_row_compares_the_same_computation(case):
    assert case.inputs, f"{case.op}: the case must name its inputs"
    _assert_agree(case)
    if "labels" in case.inputs:
        _cluster_in_place(case)
        _assert_agree(case)


def _batch(B=64, D=16, classes=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype).requires_grad_()
    return x, torch.randint(0, classes, (B,), generator=gen)


def test_agreement_check_flags_a_different_semihard_loss():
    # The old semi-hard row: the FaceNet rule (one negative per positive pair) against
    # PML's semi-hard miner + TripletMarginLoss (every semi-hard triplet): different losses.
    from pytorch_metric_learning import losses, miners

    x, labels = _batch()
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    loss = losses.TripletMarginLoss(margin=0.2)
    case = Case(
        "semihard",
        "forward+backward",
        {},
        {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.semihard_triplet_loss(e, labels, normalize=True), x, labels
            ),
            "pml": _fwd_bwd(lambda e, labels: loss(e, labels, miner(e, labels)), x, labels),
        },
    )
    check_agreement(case)
    assert case.disagreeing() == ["pml"]
    assert case.agreement["pml"]["value_rel_err"] > 0.1


def test_agreement_check_flags_another_reduction():
    # batch-hard "mean" (over anchors) against "mean_nonzero" (PML's AvgNonZeroReducer), on a
    # batch where some anchors' terms are 0: the scale row compared these before.
    x, labels = _batch()
    case = Case(
        "batch_hard",
        "forward+backward",
        {},
        {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.batch_hard_triplet_loss(e, labels, normalize=True), x, labels
            ),
            "plain": _fwd_bwd(plain_torch_batch_hard, x, labels),
        },
        inputs={"embeddings": x, "labels": labels},
    )
    _cluster_in_place(case)
    check_agreement(case)
    assert case.disagreeing() == ["plain"]


def test_agreement_check_flags_a_gradient_that_differs():
    x, labels = _batch()

    def detached_normalize(e, labels):  # same value, but no gradient through the normalization
        return metricops.contrastive_loss(e / e.detach().norm(dim=1, keepdim=True), labels, reduction="mean_nonzero")

    case = Case(
        "contrastive",
        "forward+backward",
        {},
        {
            "metricops": _fwd_bwd(
                lambda e, labels: metricops.contrastive_loss(e, labels, normalize=True, reduction="mean_nonzero"),
                x,
                labels,
            ),
            "detached": _fwd_bwd(detached_normalize, x, labels),
        },
    )
    check_agreement(case)
    assert case.agreement["detached"]["value_rel_err"] < 1e-6
    assert case.disagreeing() == ["detached"]


def _semihard_inputs():
    gen = torch.Generator().manual_seed(3)
    yield torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randint(0, 5, (40,), generator=gen), False
    yield torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen), True
    # Integer coordinates: exact ties between a positive's and negatives' distances (strict "farther").
    yield (
        torch.tensor([[0.0], [2.0], [-2.0], [3.0], [-1.0], [10.0]], dtype=torch.float64),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        False,
    )
    yield torch.randint(-3, 4, (24, 2), generator=gen).double(), torch.randint(0, 4, (24,), generator=gen), False
    # A singleton class (an anchor without positives); one class (no anchor has a negative: no valid pair).
    yield torch.randn(9, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 7]), True
    yield torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.zeros(7, dtype=torch.int64), False


@pytest.mark.parametrize("x, labels, normalize", list(_semihard_inputs()))
def test_plain_torch_semihard_is_metricops_semihard(x, labels, normalize):
    """The semi-hard row's plain-torch contender computes metricops.semihard_triplet_loss (and the reference)."""
    xs = [x.clone().requires_grad_() for _ in range(3)]
    got = plain_torch_semihard(xs[0], labels, margin=0.2, normalize=normalize)
    ours = metricops.semihard_triplet_loss(xs[1], labels, margin=0.2, normalize=normalize)
    ref = reference.semihard_triplet_loss(xs[2], labels, margin=0.2, normalize=normalize)
    torch.testing.assert_close(got, ours, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    grads = [torch.autograd.grad(v, t, allow_unused=True)[0] for v, t in zip((got, ours, ref), xs)]
    grads = [torch.zeros_like(x) if g is None else g for g in grads]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-12, rtol=1e-10)


def test_plain_torch_semihard_takes_strictly_farther_negatives():
    # Anchor 0 at 0, positive 1 at 2 (d = 2); negatives at -2 (d = 2, a tie: not farther), 3, -1, 10.
    # n* is the point at 3: relu(0.2 + 2 - 3) = 0. A ">=" would take -2: relu(0.2 + 2 - 2) = 0.2.
    x = torch.tensor([[0.0], [2.0], [-2.0], [3.0], [-1.0], [10.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    terms_sum = plain_torch_semihard(x, labels, margin=0.2, normalize=False) * 6  # 6 valid positive pairs
    # Pairs (a, p, n*, term): (0,1,3: 0.2+2-3 → 0), (1,0,4: d=3 → 0.2+2-3 → 0), (2,3,5: d_ap=5, the only
    # farther negative is 10 at 12 → 0.2+5-12 → 0), (3,2,5: d_ap=5, 10 at 7 → 0.2+5-7 → 0),
    # (4,5,3: d_ap=11, nothing farther than 11 → farthest 3 at 4 → 0.2+11-4 = 7.2),
    # (5,4,2: d_ap=11, farther: -2 at 12 → 0.2+11-12 → 0). Sum 7.2.
    torch.testing.assert_close(terms_sum, torch.tensor(7.2, dtype=torch.float64))


def test_plain_torch_contrastive_and_batch_hard_are_metricops():
    x, labels = _batch(dtype=torch.float64, D=5)
    for normalize in (False, True):
        torch.testing.assert_close(
            plain_torch_contrastive(x, labels, normalize=normalize),
            metricops.contrastive_loss(x, labels, normalize=normalize, reduction="mean_nonzero"),
        )
        torch.testing.assert_close(
            plain_torch_batch_hard(x, labels, normalize=normalize),
            metricops.batch_hard_triplet_loss(x, labels, normalize=normalize, reduction="mean_nonzero"),
        )
