"""Hand-computed values on exact inputs, pinned for metricops and metricops.reference alike.

Parity tests compare metricops with the reference, so a behaviour that both
get wrong the same way passes them. Here every expected number is derived by
hand (the arithmetic is in the comments), never computed by the library: the
strict "farther than the positive" of semi-hard, its lowest-index tie-break,
the m == 0 and m == margin boundaries of the miner and the statistics, and
each reduction's divisor. Points are 1-D with integer or binary-fraction
coordinates, so every distance is exact in float64 and ties are real ties.
"""

import math

import pytest
import torch

import metricops
from metricops import reference

IMPLS = [pytest.param(metricops, id="metricops"), pytest.param(reference, id="reference")]
EXACT = dict(atol=1e-12, rtol=1e-12)


def points(*coords):
    """1-D points as a (B, 1) float64 batch."""
    return torch.tensor(coords, dtype=torch.float64)[:, None]


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), **EXACT)


def semihard_negatives(impl, x, labels, metric="euclidean"):
    """n*(a, p) as a (B, B) int64 matrix, -1 off the valid pairs."""
    if impl is reference:
        return reference.semihard_negatives(x, labels, metric=metric)
    return torch.ops.metricops.semihard_triplet(x, labels, 0.2, metric)[1]


def pairs_matrix(b, entries, fill=0):
    out = torch.full((b, b), fill, dtype=torch.float64 if isinstance(fill, float) else torch.int64)
    for (a, p), v in entries.items():
        out[a, p] = v
    return out


# Example A: x = [0, 2, -2, 3, -1, 10], labels [0, 0, 1, 1, 2, 2]. Distances |x_i - x_j|:
#        0   1   2   3   4   5
#   0 [  0,  2,  2,  3,  1, 10]
#   1 [  2,  0,  4,  1,  3,  8]
#   2 [  2,  4,  0,  5,  1, 12]
#   3 [  3,  1,  5,  0,  4,  7]
#   4 [  1,  3,  1,  4,  0, 11]
#   5 [ 10,  8, 12,  7, 11,  0]
A_X = (0.0, 2.0, -2.0, 3.0, -1.0, 10.0)
A_LABELS = (0, 0, 1, 1, 2, 2)
# Semi-hard n*(a, p), margin 0.2 (the nearest negative strictly farther than p, else the farthest):
#   (0,1): d_ap 2; negatives 2:2 (a tie: NOT farther), 3:3, 4:1, 5:10 -> n* 3, relu(0.2 + 2 - 3) = 0
#          (">=" would take 2: relu(0.2 + 2 - 2) = 0.2)
#   (1,0): d_ap 2; negatives 2:4, 3:1, 4:3, 5:8             -> n* 4 (3), relu(0.2 + 2 - 3) = 0
#   (2,3): d_ap 5; negatives 0:2, 1:4, 4:1, 5:12            -> n* 5 (12), 0
#   (3,2): d_ap 5; negatives 0:3, 1:1, 4:4, 5:7             -> n* 5 (7), 0
#   (4,5): d_ap 11; negatives 0:1, 1:3, 2:1, 3:4, none > 11 -> farthest n* 3 (4), 0.2 + 11 - 4 = 7.2
#   (5,4): d_ap 11; negatives 0:10, 1:8, 2:12, 3:7          -> n* 2 (12), 0
A_SEMIHARD_NEGATIVES = {(0, 1): 3, (1, 0): 4, (2, 3): 5, (3, 2): 5, (4, 5): 3, (5, 4): 2}


@pytest.mark.parametrize("impl", IMPLS)
def test_semihard_negative_must_be_strictly_farther_than_the_positive(impl):
    x, labels = points(*A_X), torch.tensor(A_LABELS)
    expected = pairs_matrix(6, A_SEMIHARD_NEGATIVES, fill=-1)
    assert torch.equal(semihard_negatives(impl, x, labels), expected)
    # Squared distances keep the order and the tie (d² 4 vs 4 for (0,1) and negative 2): the same n*.
    assert torch.equal(semihard_negatives(impl, x, labels, "sqeuclidean"), expected)
    terms = impl.semihard_triplet_loss(x, labels, margin=0.2, reduction="none")
    close(terms, pairs_matrix(6, {(4, 5): 7.2}, fill=0.0))
    close(impl.semihard_triplet_loss(x, labels, margin=0.2, reduction="sum"), 7.2)
    close(impl.semihard_triplet_loss(x, labels, margin=0.2), 7.2 / 6)  # 6 positive pairs, each anchor has negatives
    close(impl.semihard_triplet_loss(x, labels, margin=0.2, reduction="mean_nonzero"), 7.2)


@pytest.mark.parametrize("memory", ["matrix", "streaming"])
def test_semihard_strictness_in_both_memory_modes(memory):
    x, labels = points(*A_X), torch.tensor(A_LABELS)
    close(metricops.semihard_triplet_loss(x, labels, margin=0.2, reduction="sum", memory=memory), 7.2)


# Example T1 (nearest farther negative tied): x = [0, 1, 3, -3, 2, -2], labels [0, 0, 1, 1, 2, 2], margin 1.5.
#        0  1  2  3  4  5
#   0 [  0, 1, 3, 3, 2, 2]
#   1 [  1, 0, 2, 4, 1, 3]
#   2 [  3, 2, 0, 6, 1, 5]
#   3 [  3, 4, 6, 0, 5, 1]
#   4 [  2, 1, 1, 5, 0, 4]
#   5 [  2, 3, 5, 1, 4, 0]
#   (0,1): d_ap 1; all negatives farther; nearest 4:2 and 5:2 tie -> the lower index, 4: 1.5 + 1 - 2 = 0.5
#   (1,0): d_ap 1; farther 2:2, 5:3, 3:4 -> 2: 0.5      (2,3): d_ap 6; none farther; farthest 5:5 -> 2.5
#   (3,2): d_ap 6; farthest 4:5 -> 2.5                  (4,5): d_ap 4; farther 3:5 -> 0.5
#   (5,4): d_ap 4; farther 2:5 -> 0.5.                  Mean (7.0) / 6.
# Gradient of the mean, term by term (t = 1.5 + |x_a - x_p| - |x_a - x_n|, d|u|/du = sign u), times 1/6:
#   (0,1,4): x0 -1+1, x1 +1, x4 -1   (1,0,2): x1 +1+1, x0 -1, x2 -1   (2,3,5): x2 +1-1, x3 -1, x5 +1
#   (3,2,4): x3 -1+1, x2 +1, x4 -1   (4,5,3): x4 +1-1, x5 -1, x3 +1   (5,4,2): x5 -1+1, x4 +1, x2 -1
#   sums: x0 -1, x1 3, x2 -1, x3 0, x4 -1, x5 0. (n* = 5 for (0,1) would give x0 -3, x5 +1.)
T1_X = (0.0, 1.0, 3.0, -3.0, 2.0, -2.0)
T1_NEGATIVES = {(0, 1): 4, (1, 0): 2, (2, 3): 5, (3, 2): 4, (4, 5): 3, (5, 4): 2}
T1_GRAD = [-1 / 6, 3 / 6, -1 / 6, 0.0, -1 / 6, 0.0]

# Example T2 (farthest negative tied): x = [0, 10, 3, -3], labels [0, 0, 1, 1], margin 0.2.
#   (0,1): d_ap 10; negatives 2:3, 3:3, none farther; farthest tie -> the lower index, 2: 0.2 + 10 - 3 = 7.2
#   (1,0): d_ap 10; negatives 2:7, 3:13 -> 3: 0     (2,3): d_ap 6; negatives 0:3, 1:7 -> 1: 0
#   (3,2): d_ap 6; negatives 0:3, 1:13 -> 1: 0.     Mean 7.2 / 4 = 1.8.
# Gradient: only (0,1,2): x0 sign(0-10) - sign(0-3) = 0, x1 +1, x2 -1, x3 0, over 4.
#   (n* = 3 would give x0 -2, x3 +1.)
T2_X = (0.0, 10.0, 3.0, -3.0)
T2_NEGATIVES = {(0, 1): 2, (1, 0): 3, (2, 3): 1, (3, 2): 1}
T2_GRAD = [0.0, 0.25, -0.25, 0.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_semihard_ties_go_to_the_lowest_index(impl):
    for coords, labels, negatives in ((T1_X, (0, 0, 1, 1, 2, 2), T1_NEGATIVES), (T2_X, (0, 0, 1, 1), T2_NEGATIVES)):
        x, labels = points(*coords), torch.tensor(labels)
        assert torch.equal(semihard_negatives(impl, x, labels), pairs_matrix(len(coords), negatives, fill=-1))


@pytest.mark.parametrize(
    "impl, memory",
    [(metricops, "matrix"), (metricops, "streaming"), (reference, None)],
    ids=["metricops-matrix", "metricops-streaming", "reference"],
)
def test_semihard_tied_negative_alone_gets_the_gradient(impl, memory):
    kw = {} if memory is None else {"memory": memory}
    for coords, labels, margin, value, grad in (
        (T1_X, (0, 0, 1, 1, 2, 2), 1.5, 7.0 / 6, T1_GRAD),
        (T2_X, (0, 0, 1, 1), 0.2, 1.8, T2_GRAD),
    ):
        x = points(*coords).requires_grad_()
        loss = impl.semihard_triplet_loss(x, torch.tensor(labels), margin=margin, **kw)
        close(loss, value)
        (g,) = torch.autograd.grad(loss, x)
        close(g.flatten(), grad)


# Example A's valid triplets, m = d(a,n) - d(a,p), classes at margin 1
# (easy m > 1, semihard 0 < m <= 1, hard m <= 0; "=" marks a boundary):
#   (0,1,2) 2-2 = 0 hard=   (0,1,3) 3-2 = 1 semihard=  (0,1,4) 1-2 = -1 hard   (0,1,5) 10-2 = 8 easy
#   (1,0,2) 4-2 = 2 easy    (1,0,3) 1-2 = -1 hard      (1,0,4) 3-2 = 1 semihard= (1,0,5) 8-2 = 6 easy
#   (2,3,0) 2-5 = -3 hard   (2,3,1) 4-5 = -1 hard      (2,3,4) 1-5 = -4 hard   (2,3,5) 12-5 = 7 easy
#   (3,2,0) 3-5 = -2 hard   (3,2,1) 1-5 = -4 hard      (3,2,4) 4-5 = -1 hard   (3,2,5) 7-5 = 2 easy
#   (4,5,n) 1-11, 3-11, 1-11, 4-11: 4 hard
#   (5,4,0) 10-11 = -1 hard (5,4,1) 8-11 = -3 hard     (5,4,2) 12-11 = 1 semihard= (5,4,3) 7-11 = -4 hard
# Margin 1: easy 5, semihard 3, hard 16 (of 24). Margin 0: easy = m > 0: 5 + 3 = 8, semihard 0, hard 16.
A_EASY = [(0, 1, 5), (1, 0, 2), (1, 0, 5), (2, 3, 5), (3, 2, 5)]
A_SEMIHARD = [(0, 1, 3), (1, 0, 4), (5, 4, 2)]
A_HARD = [
    (0, 1, 2),
    (0, 1, 4),
    (1, 0, 3),
    (2, 3, 0),
    (2, 3, 1),
    (2, 3, 4),
    (3, 2, 0),
    (3, 2, 1),
    (3, 2, 4),
    (4, 5, 0),
    (4, 5, 1),
    (4, 5, 2),
    (4, 5, 3),
    (5, 4, 0),
    (5, 4, 1),
    (5, 4, 3),
]

# The hand example of test_triplet.py: x = [0, 1, 0.5, 3], labels [0, 0, 1, 1], margin 1.
#   (0,1,2) 0.5-1 = -0.5 hard   (0,1,3) 3-1 = 2 easy     (1,0,2) 0.5-1 = -0.5 hard  (1,0,3) 2-1 = 1 semihard=
#   (2,3,0) 0.5-2.5 = -2 hard   (2,3,1) 0.5-2.5 = -2 hard (3,2,0) 3-2.5 = 0.5 semihard (3,2,1) 2-2.5 = -0.5 hard
H_X = (0.0, 1.0, 0.5, 3.0)
H_LABELS = (0, 0, 1, 1)
H_TRIPLETS = {
    "all": [(0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)],
    "violating": [(0, 1, 2), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)],
    "semihard": [(1, 0, 3), (3, 2, 0)],
    "hard": [(0, 1, 2), (1, 0, 2), (2, 3, 0), (2, 3, 1), (3, 2, 1)],
    "easy": [(0, 1, 3)],
}


def stats(impl, x, labels, margin):
    return {k: int(v) for k, v in impl.triplet_statistics(x, labels, margin=margin).items()}


def mined(impl, x, labels, strategy, margin):
    return list(zip(*[t.tolist() for t in impl.mine_triplets(x, labels, strategy=strategy, margin=margin)]))


@pytest.mark.parametrize("impl", IMPLS)
def test_statistics_split_at_the_boundaries(impl):
    assert stats(impl, points(*H_X), torch.tensor(H_LABELS), 1.0) == {"total": 8, "easy": 1, "semihard": 2, "hard": 5}
    a, labels = points(*A_X), torch.tensor(A_LABELS)
    assert stats(impl, a, labels, 1.0) == {"total": 24, "easy": 5, "semihard": 3, "hard": 16}
    assert stats(impl, a, labels, 0.0) == {"total": 24, "easy": 8, "semihard": 0, "hard": 16}


@pytest.mark.parametrize("impl", IMPLS)
def test_statistics_with_a_negative_margin_count_each_class_directly(impl):
    # Margin -1: easy is m > -1, so the m = 0 triplet (0,1,2) is easy AND hard; semihard (0 < m <= -1) is
    # empty. Easy: (0,1,2) 0, (0,1,3) 1, (0,1,5) 8, (1,0,2) 2, (1,0,4) 1, (1,0,5) 6, (2,3,5) 7, (3,2,5) 2,
    # (5,4,2) 1 = 9 ((0,1,4), (1,0,3), ... at m = -1 exactly are not). Hard as at any margin: 16.
    # The classes overlap, so they do not add up to the total (9 + 0 + 16 = 25 != 24).
    a, labels = points(*A_X), torch.tensor(A_LABELS)
    assert stats(impl, a, labels, -1.0) == {"total": 24, "easy": 9, "semihard": 0, "hard": 16}


@pytest.mark.parametrize("impl", IMPLS)
def test_mined_triplets_per_strategy_at_the_boundaries(impl):
    x, labels = points(*H_X), torch.tensor(H_LABELS)
    for strategy, expected in H_TRIPLETS.items():
        assert mined(impl, x, labels, strategy, 1.0) == expected, strategy
    x, labels = points(*A_X), torch.tensor(A_LABELS)
    assert mined(impl, x, labels, "easy", 1.0) == A_EASY
    assert mined(impl, x, labels, "semihard", 1.0) == A_SEMIHARD
    assert mined(impl, x, labels, "hard", 1.0) == A_HARD
    assert mined(impl, x, labels, "violating", 1.0) == sorted(A_SEMIHARD + A_HARD)
    assert mined(impl, x, labels, "easy", 0.0) == sorted(A_EASY + A_SEMIHARD)  # m > 0
    assert mined(impl, x, labels, "semihard", 0.0) == []


# Example B (no ties among an anchor's negatives): x = [0, 2, 5, -3, 7, 11, 100],
# labels [0, 0, 1, 1, 2, 2, 9], margin 0.2. Point 6 is a singleton (no positive: no triplet of its own)
# and at least 89 from every other point, so it is never a nearest negative and never in a non-zero term.
#        0  1  2   3   4   5
#   0 [  0, 2, 5,  3,  7, 11]
#   1 [  2, 0, 3,  5,  5,  9]
#   2 [  5, 3, 0,  8,  2,  6]
#   3 [  3, 5, 8,  0, 10, 14]
#   4 [  7, 5, 2, 10,  0,  4]
#   5 [ 11, 9, 6, 14,  4,  0]
# Batch-hard (one positive per anchor; nearest negative):
#   a0: p1 2, n3 3 -> 0.2+2-3 < 0: 0     a1: p0 2, n2 3 -> 0      a2: p3 8, n4 2 -> 6.2
#   a3: p2 8, n0 3 -> 5.2                a4: p5 4, n2 2 -> 2.2    a5: p4 4, n2 6 -> 0.2+4-6 < 0: 0
#   a6: no positive -> 0, and not counted.
#   sum 13.6; mean over the 6 anchors with a triplet 13.6/6 (not /7); mean_nonzero 13.6/3.
#   soft: softplus(d_ap - d_an) = softplus of -1, -1, 6, 5, 2, -2, over 6.
# Batch-all: 6 positive pairs x 5 negatives = 30 valid triplets, terms relu(0.2 + d_ap - d_an):
#   (0,1,*): 0.2+2-{5,3,7,11} all < 0         (1,0,*): 0.2+2-{3,5,5,9} all < 0
#   (2,3,*): 0.2+8-{5,3,2,6} = 3.2, 5.2, 6.2, 2.2 (16.8)   (3,2,*): 0.2+8-{3,5,10,14} = 5.2, 3.2 (8.4)
#   (4,5,*): 0.2+4-{7,5,2,10} = 2.2              (5,4,*): 0.2+4-{11,9,6,14} all < 0; negative 6: all < 0
#   sum 27.4 over 7 non-zero terms; mean over all 30 valid triplets.
B_X = (0.0, 2.0, 5.0, -3.0, 7.0, 11.0, 100.0)
B_LABELS = (0, 0, 1, 1, 2, 2, 9)


def softplus(v):
    return math.log1p(math.exp(v))


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_hard_reductions_and_soft(impl):
    x, labels = points(*B_X), torch.tensor(B_LABELS)
    loss = lambda **kw: impl.batch_hard_triplet_loss(x, labels, margin=0.2, **kw)  # noqa: E731
    close(loss(reduction="none"), [0.0, 0.0, 6.2, 5.2, 2.2, 0.0, 0.0])
    close(loss(reduction="sum"), 13.6)
    close(loss(reduction="mean"), 13.6 / 6)
    close(loss(reduction="mean_nonzero"), 13.6 / 3)
    close(loss(soft=True), (2 * softplus(-1) + softplus(6) + softplus(5) + softplus(2) + softplus(-2)) / 6)
    assert [t.tolist() for t in impl.mine_triplets(x, labels, strategy="batch_hard")] == [
        [0, 1, 2, 3, 4, 5],
        [1, 0, 3, 2, 5, 4],
        [3, 2, 4, 0, 2, 2],
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_all_reductions(impl):
    x, labels = points(*B_X), torch.tensor(B_LABELS)
    loss = lambda reduction: impl.batch_all_triplet_loss(x, labels, margin=0.2, reduction=reduction)  # noqa: E731
    close(loss("sum"), 27.4)
    close(loss("mean"), 27.4 / 30)
    close(loss("mean_nonzero"), 27.4 / 7)


# Example C: x = [0, 0.5, 2, 2.25], labels [0, 0, 1, 1], pos_margin 0, neg_margin 2 (12 ordered pairs i != j).
#   positive pairs: d(0,1) = d(1,0) = 0.5, d(2,3) = d(3,2) = 0.25 -> terms 0.5, 0.5, 0.25, 0.25 (sum 1.5)
#   negative pairs: d(0,2) 2, d(0,3) 2.25, d(1,2) 1.5, d(1,3) 1.75 (and the transposes)
#                   -> relu(2 - d): 0, 0, 0.5, 0.25, twice each (sum 1.5)
#   sum 3.0; mean over B(B-1) = 12 pairs: 0.25; mean_nonzero over 8 non-zero terms: 0.375
#   squared: 2 * (0.25 + 0.0625) + 2 * (0.25 + 0.0625) = 1.25; mean 1.25 / 12
#   pos_margin 0.3: positive terms relu(d - 0.3) = 0.2, 0.2, 0, 0 (0.4); total 0.4 + 1.5 = 1.9
C_X = (0.0, 0.5, 2.0, 2.25)
C_LABELS = (0, 0, 1, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_reductions_and_squared(impl):
    x, labels = points(*C_X), torch.tensor(C_LABELS)
    loss = lambda **kw: impl.contrastive_loss(x, labels, neg_margin=2.0, **kw)  # noqa: E731
    close(loss(reduction="sum"), 3.0)
    close(loss(reduction="mean"), 3.0 / 12)
    close(loss(reduction="mean_nonzero"), 3.0 / 8)
    close(loss(reduction="sum", squared=True), 1.25)
    close(loss(squared=True), 1.25 / 12)
    close(loss(reduction="sum", pos_margin=0.3), 1.9)
    none = loss(reduction="none")
    close(none, [[0.0, 0.5, 0.0, 0.0], [0.5, 0.0, 0.5, 0.25], [0.0, 0.5, 0.0, 0.25], [0.0, 0.25, 0.25, 0.0]])


# Explicit pairs: x0 = [0, 0, 3], x1 = [0.5, 1.5, 3.25], y = [1, 0, 0], margin 1: d = 0.5, 1.5, 0.25.
#   terms y·d + (1-y)·relu(1 - d) = 0.5, relu(-0.5) = 0, 0.75 -> sum 1.25, mean 1.25/3, mean_nonzero 1.25/2
#   squared: 0.25, 0, 0.5625 -> sum 0.8125, mean 0.8125/3
@pytest.mark.parametrize("impl", IMPLS)
def test_pair_contrastive_reductions_and_squared(impl):
    x0, x1, y = points(0.0, 0.0, 3.0), points(0.5, 1.5, 3.25), torch.tensor([1, 0, 0])
    loss = lambda **kw: impl.pair_contrastive_loss(x0, x1, y, margin=1.0, **kw)  # noqa: E731
    close(loss(reduction="none"), [0.5, 0.0, 0.75])
    close(loss(reduction="sum"), 1.25)
    close(loss(), 1.25 / 3)
    close(loss(reduction="mean_nonzero"), 1.25 / 2)
    close(loss(reduction="sum", squared=True), 0.8125)
    close(loss(squared=True), 0.8125 / 3)
