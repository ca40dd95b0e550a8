"""The sample inputs of every native op, keyed by op name: one table for every op-level test.

``SAMPLES[name](x, x2, x3)`` gives the ``SampleInput``s of ``torch.ops.metricops.<name>``
built on three embedding matrices of one shape (any device, dtype, layout and
size, empty included). Together they cover each code path whose result or
output layout could differ: metrics, streaming block sizes, fused normalize,
reductions, flags. Backward ops have no entry: their samples are the calls
autograd makes when the forward samples are differentiated (``backward_samples``).

The table drives (tests/test_op_registry.py, tests/test_op_layouts.py):
parity with metricops.reference in float64, gradcheck, opcheck (forward and
backward ops), torch.compile(fullgraph=True), fake kernels against the real
outputs on every layout, and fake-kernel errors against the kernels' errors.
test_op_registry.py fails for an op of the dispatcher's list that has no
entry here, so adding an op means adding its builder below.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

from metricops import reference
from common import METRICS


# Ops whose outputs carry no gradient (integer results, or detached by design): registered with
# register_not_differentiable, so gradcheck and the compiled-backward tests leave them out.
NOT_DIFFERENTIABLE = {"knn", "triplet_statistics", "mine_triplets", "triplet_interval_weights"}


class SampleInput(NamedTuple):
    """The op's arguments, and (optionally) how metricops.reference computes its leading outputs from them."""

    args: tuple
    reference: Optional[Callable[..., tuple]] = None


def pair_labels(x):
    """Labels 0, 0, 1, 1, 2, 2, ...: every anchor has one positive and, from B >= 4, negatives (a triplet)."""
    return torch.arange(x.shape[0], device=x.device) // 2


def _similar_pairs(x):
    return torch.arange(x.shape[0], device=x.device) % 2 == 0


# ---------------------------------------------------------------- references of the ops' outputs


def _triplet_validity(labels):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    return positive & negative.any(1)[:, None]  # (a, p): a positive pair whose anchor has a negative


def _ref_pairwise(x, y, metric):
    return (reference.pairwise_distance(x, y, metric=metric),)


def _ref_l2_normalize(x, eps):
    return (F.normalize(x, dim=1, eps=eps),)


def _ref_batch_hard(x, labels, margin, metric, soft, block_rows, normalize):
    kw = dict(margin=margin, metric=metric, soft=soft, normalize=normalize, reduction="none")
    return (reference.batch_hard_triplet_loss(x, labels, **kw),)


def _ref_semihard(x, labels, margin, metric):
    terms = reference.semihard_triplet_loss(x, labels, margin=margin, metric=metric, reduction="none")
    return terms, reference.semihard_negatives(x, labels, metric=metric)


def _ref_semihard_streaming(x, labels, margin, metric, block_rows):
    (terms, _) = _ref_semihard(x, labels, margin, metric)
    return terms.sum(1), _triplet_validity(labels).sum(1), (terms > 0).sum(1)


def _ref_batch_all(x, labels, margin, metric, block_rows=None):
    total = reference.batch_all_triplet_loss(x, labels, margin=margin, metric=metric, reduction="sum")
    stats = reference.triplet_statistics(x, labels, margin=margin, metric=metric)
    return total, stats["total"], stats["hard"] + stats["semihard"]  # the terms > 0: m < margin (no ties here)


def _ref_statistics(x, labels, margin, metric):
    stats = reference.triplet_statistics(x, labels, margin=margin, metric=metric)
    return (torch.stack([stats[k] for k in ("total", "easy", "semihard", "hard")]),)


def _ref_mine(x, labels, strategy, margin, metric):
    return reference.mine_triplets(x, labels, strategy=strategy, margin=margin, metric=metric)


def _ref_interval_weights(dist, labels, lower, has_lower, upper, upper_inclusive):
    """Every (a, p, n) with m = d(a, n) - d(a, p) in the interval, by broadcasting (B³ memory)."""
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=dist.device)
    m = dist[:, None, :] - dist[:, :, None]  # [a, p, n]
    keep = (m <= upper) if upper_inclusive else (m < upper)
    if has_lower:
        keep &= m > lower
    keep &= positive[:, :, None] & ~same[:, None, :]
    weight = keep.sum(2).to(dist.dtype) - keep.sum(1).to(dist.dtype)
    return weight, keep.sum((1, 2))


def _ref_contrastive(x, labels, pos_margin, neg_margin, metric, squared, reduction, block_rows=None):
    kw = dict(pos_margin=pos_margin, neg_margin=neg_margin, metric=metric, squared=squared, reduction=reduction)
    return (reference.contrastive_loss(x, labels, **kw),)


def _ref_pair_contrastive(x0, x1, y, margin, metric, squared):
    return (
        reference.pair_contrastive_loss(x0, x1, y, margin=margin, metric=metric, squared=squared, reduction="none"),
    )


def _ref_triplet_margin(a, p, n, margin, norm_p, eps, swap, squared):
    kw = dict(margin=margin, p=norm_p, eps=eps, swap=swap, squared=squared, reduction="none")
    return (reference.triplet_margin_loss(a, p, n, **kw),)


def _ref_knn(queries, database, k, metric, chunk_size=0):
    return reference.knn(queries, database, k=k, metric=metric)


# ---------------------------------------------------------------- the table


def _unit(x):
    """x's rows scaled to unit norm, in x's layout (the class-loss ops take normalized embeddings); integer
    x (bad input for the ops) as it is."""
    return x / x.norm(dim=1, keepdim=True) if x.is_floating_point() else x


def _ref_margin_softmax(x, labels, weight, kind, margin, scale, class_chunk=0):
    loss = reference.arcface_loss if kind == "arcface" else reference.cosface_loss
    return (loss(x, labels, weight, margin=margin, scale=scale, reduction="none"),)


def _ref_proxy_anchor(x, labels, proxies, margin, alpha, class_chunk=0, save_tile=False, normalize=False):
    # the reference normalizes the embeddings itself: the op's normalize=False takes them already unit
    return reference.proxy_anchor_terms(x, labels, proxies, margin=margin, alpha=alpha)[:2]


def _ref_proxy_anchor_and_grad(
    x, labels, proxies, margin, alpha, class_chunk=0, normalize=False, grad_embeddings=False, grad_proxies=False
):
    """(loss, pos, neg) and, for normalize=True with both gradients, the gradients of the reference loss."""
    with torch.enable_grad():
        xr, pr = x.detach().requires_grad_(), proxies.detach().requires_grad_()
        loss = reference.proxy_anchor_loss(xr, labels, pr, margin=margin, alpha=alpha)
        pos, neg = reference.proxy_anchor_terms(xr, labels, pr, margin=margin, alpha=alpha)[:2]
        if not (normalize and grad_embeddings and grad_proxies):  # normalize=False: the op takes x as unit
            return loss.detach(), pos.detach(), neg.detach()
        return (loss.detach(), pos.detach(), neg.detach(), *torch.autograd.grad(loss, (xr, pr)))


def _scale(x):
    return torch.tensor(2.0, dtype=x.dtype, device=x.device)


def _learnable_scale(x):
    """A scale computed from x, so that it requires grad with x (InfoNCE's learnable temperature, as CLIP's
    exp(logit_scale)): the "scaled_learnable" policy, whose d/dscale then reaches x too."""
    return 2.0 * torch.exp(0.01 * x.sum())  # (x may be empty)


def _keys(x):
    return torch.arange(x.shape[0], device=x.device)


def _labelled(x, reference_fn, *rest):
    return SampleInput((x, pair_labels(x), *rest), reference_fn)


SAMPLES: dict[str, Callable[..., list[SampleInput]]] = {
    "pairwise_distance": lambda x, x2, x3: [
        SampleInput((x, y, metric), _ref_pairwise) for y in (x2, None) for metric in METRICS
    ]
    + [SampleInput((x, x2[:3], "euclidean"), _ref_pairwise)],  # M != N
    "l2_normalize": lambda x, x2, x3: [SampleInput((x, 1e-12), _ref_l2_normalize)],
    # (margin, metric, soft, block_rows, normalize)
    "batch_hard_triplet": lambda x, x2, x3: [
        _labelled(x, _ref_batch_hard, 0.2, "euclidean", False, 0, False),
        _labelled(x, _ref_batch_hard, 0.2, "euclidean", False, 0, True),
        _labelled(x, _ref_batch_hard, 0.2, "cosine", True, 2, False),
        _labelled(x, _ref_batch_hard, 0.3, "cosine", False, 0, True),
        _labelled(x, _ref_batch_hard, 0.3, "sqeuclidean", False, 2, False),
    ],
    "semihard_triplet": lambda x, x2, x3: [
        _labelled(x, _ref_semihard, 0.2, "euclidean"),
        _labelled(x, _ref_semihard, 0.5, "cosine"),
        _labelled(x, _ref_semihard, 0.3, "sqeuclidean"),
    ],
    # (margin, metric, block_rows): 0 is one block
    "semihard_triplet_streaming": lambda x, x2, x3: [
        _labelled(x, _ref_semihard_streaming, 0.2, "euclidean", 2),
        _labelled(x, _ref_semihard_streaming, 0.5, "cosine", 0),
    ],
    "batch_all_triplet": lambda x, x2, x3: [
        _labelled(x, _ref_batch_all, 0.2, metric) for metric in ("sqeuclidean", "euclidean", "cosine")
    ],
    "batch_all_triplet_streaming": lambda x, x2, x3: [
        _labelled(x, _ref_batch_all, 0.2, "euclidean", 2),
        _labelled(x, _ref_batch_all, 0.5, "cosine", 0),
    ],
    "triplet_statistics": lambda x, x2, x3: [
        _labelled(x, _ref_statistics, 0.2, "euclidean"),
        _labelled(x, _ref_statistics, 0.3, "cosine"),
    ],
    # (strategy, margin, metric)
    "mine_triplets": lambda x, x2, x3: [
        _labelled(x, _ref_mine, "all", 0.2, "euclidean"),
        _labelled(x, _ref_mine, "semihard", 0.5, "cosine"),
        _labelled(x, _ref_mine, "batch_hard", 0.2, "sqeuclidean"),
    ],
    # A square "distance" matrix in x's layout family (its transpose when x is transposed, ...), the interval.
    "triplet_interval_weights": lambda x, x2, x3: [
        SampleInput((x[:, :1] * x[:, :1].mT, pair_labels(x), 0.0, True, 0.2, True), _ref_interval_weights),
        SampleInput((x[:, :1] - x[:, :1].mT, pair_labels(x), 0.0, False, 0.05, False), _ref_interval_weights),
    ],
    # The log-sum-exp engine: (x, y, row_keys, col_keys, row_params, scale, policy, args, normalize, col_stats,
    # block_rows, block_cols[, save_tiles]). Its losses are checked against metricops.reference in
    # tests/test_similarity.py.
    "lse_stats": lambda x, x2, x3: [
        SampleInput((x, None, pair_labels(x), None, None, _scale(x), "scaled", [], False, False, 0, 0)),
        SampleInput(
            (x, None, pair_labels(x), None, None, _scale(x), "multi_similarity", [2.0, 10.0, 0.5], True, False, 2, 3)
        ),
        SampleInput((x, x2, _keys(x), _keys(x2), None, _scale(x), "scaled", [], False, True, 2, 2)),
        SampleInput((x, x2, _keys(x), _keys(x2), None, _scale(x), "scaled", [], True, True, 2, 2)),
        SampleInput((x, x2, _keys(x), _keys(x2), None, _learnable_scale(x), "scaled_learnable", [], True, True, 2, 2)),
        # with a loss head (the per-anchor term in column 12, differentiated inside the backward op; Circle's
        # policy holds its weights constant, so gradcheck cannot check it: tests/test_similarity.py does)
        SampleInput((x, None, pair_labels(x), None, None, _scale(x), "scaled", [], True, False, 2, 3, False, "supcon")),
        SampleInput(
            (x, None, pair_labels(x), None, None, _scale(x), "multi_similarity", [2.0, 10.0, 0.5], True, False, 0, 0)
            + (False, "multi_similarity")
        ),
        SampleInput(
            (x, None, pair_labels(x), None, None, _scale(x), "lifted", [0.0, 1.0], True, False, 0, 0, False)
            + ("generalized_lifted",)
        ),
        SampleInput((x, x2, _keys(x), _keys(x2), None, _scale(x), "scaled", [], True, True, 2, 2, False, "info_nce")),
    ]
    # the forward's tiles kept for the backward (CPU only: CUDA refuses save_tiles)
    + (
        [
            SampleInput(
                (
                    x,
                    None,
                    pair_labels(x),
                    None,
                    None,
                    _scale(x),
                    "multi_similarity",
                    [2.0, 10.0, 0.5],
                    True,
                    False,
                    4,
                    3,
                    True,
                )
            ),
            SampleInput((x, x2, _keys(x), _keys(x2), None, _scale(x), "scaled", [], True, True, 2, 2, True)),
        ]
        if x.device.type == "cpu"
        else []
    ),
    # Class-parameter losses: weight/proxies x2 (C = B classes; pair labels arange(B) // 2 are in range).
    # (kind, margin, scale[, class chunk]); their values are checked against metricops.reference in
    # tests/test_class_losses.py.
    "margin_softmax_loss": lambda x, x2, x3: (
        [
            SampleInput((_unit(x), pair_labels(x), x2, "arcface", 0.5, 4.0), _ref_margin_softmax),
            SampleInput((_unit(x), pair_labels(x), x2, "cosface", 0.35, 4.0, 2), _ref_margin_softmax),
        ]
        if len(x)
        else []
    ),
    # (margin, alpha[, class chunk])
    "proxy_anchor_loss": lambda x, x2, x3: (
        [
            SampleInput((_unit(x), pair_labels(x), x2, 0.1, 4.0), _ref_proxy_anchor),
            SampleInput((_unit(x), pair_labels(x), x2, 0.1, 4.0, 2), _ref_proxy_anchor),
            # the forward keeps its (C, B) dot products; the backward reads them instead of a GEMM
            SampleInput((_unit(x), pair_labels(x), x2, 0.1, 4.0, 0, True), _ref_proxy_anchor),
            # raw embeddings normalized inside (their tile entries scaled by their inverse norms)
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 2, False, True), _ref_proxy_anchor),
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 0, True, True), _ref_proxy_anchor),
        ]
        if len(x)
        else []
    ),
    # (margin, alpha, class chunk, normalize, grad_embeddings, grad_proxies)
    "proxy_anchor_loss_and_grad": lambda x, x2, x3: (
        [
            # the gradients computed in the forward's pass: one chunk, then chunks of 2 classes
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 0, True, True, True), _ref_proxy_anchor_and_grad),
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 2, True, True, True), _ref_proxy_anchor_and_grad),
            # one gradient only (the other's GEMM skipped); a backward needing the other recomputes both
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 3, True, True, False), _ref_proxy_anchor_and_grad),
            SampleInput((x, pair_labels(x), x2, 0.1, 4.0, 0, True, False, True), _ref_proxy_anchor_and_grad),
            # no gradient in the forward: a backward (gradcheck's) recomputes it with proxy_anchor_loss_backward
            SampleInput((x, pair_labels(x), x2, -0.2, 3.0, 2, True, False, False), _ref_proxy_anchor_and_grad),
            # unit embeddings used as given
            SampleInput((_unit(x), pair_labels(x), x2, 0.1, 4.0, 0, False, True, True), _ref_proxy_anchor_and_grad),
        ]
        if len(x)
        else []
    ),
    # (pos_margin, neg_margin, metric, squared, reduction)
    "contrastive_loss": lambda x, x2, x3: [
        _labelled(x, _ref_contrastive, 0.0, 1.0, "euclidean", False, "mean"),
        _labelled(x, _ref_contrastive, 0.1, 2.0, "cosine", True, "none"),
        _labelled(x, _ref_contrastive, 0.1, 1.5, "sqeuclidean", True, "sum"),
        _labelled(x, _ref_contrastive, 0.1, 3.0, "euclidean", False, "mean_nonzero"),
        _labelled(x, _ref_contrastive, 0.0, 1.0, "cosine", False, "none"),
    ],
    # (pos_margin, neg_margin, metric, squared, reduction, block_rows)
    "contrastive_loss_streaming": lambda x, x2, x3: [
        _labelled(x, _ref_contrastive, 0.0, 1.0, "euclidean", True, "sum", 2),
        _labelled(x, _ref_contrastive, 0.1, 2.0, "cosine", False, "mean", 0),
        _labelled(x, _ref_contrastive, 0.0, 3.0, "sqeuclidean", False, "mean_nonzero", 5),
    ],
    # (margin, metric, squared)
    "pair_contrastive_loss": lambda x, x2, x3: [
        SampleInput((x, x2, _similar_pairs(x), 1.0, "euclidean", False), _ref_pair_contrastive),
        SampleInput((x, x2, _similar_pairs(x), 1.5, "cosine", True), _ref_pair_contrastive),
        SampleInput((x, x2, _similar_pairs(x), 3.0, "sqeuclidean", False), _ref_pair_contrastive),
    ],
    # (margin, p, eps, swap, squared)
    "triplet_margin_loss": lambda x, x2, x3: [
        SampleInput((x, x2, x3, 1.0, 2.0, 1e-6, False, False), _ref_triplet_margin),
        SampleInput((x, x2, x3, 1.0, 1.5, 1e-6, True, False), _ref_triplet_margin),
        SampleInput((x, x2, x3, 1.0, 1.0, 1e-6, True, False), _ref_triplet_margin),
        SampleInput((x, x2, x3, 1.0, 3.0, 1e-6, True, False), _ref_triplet_margin),
        SampleInput((x, x2, x3, 1.0, 2.0, 0.0, False, True), _ref_triplet_margin),
        SampleInput((x, x2, x3, 1.0, 2.0, 0.0, True, True), _ref_triplet_margin),
    ],
    # (k, metric, chunk_size): k within the rows a query can return
    "knn": lambda x, x2, x3: (
        [
            SampleInput((x, x2, 2, "euclidean"), _ref_knn),
            SampleInput((x, None, 2, "cosine", 2), _ref_knn),
            SampleInput((x, x2, x.shape[0], "sqeuclidean", 3), _ref_knn),
        ]
        if x.shape[0] > 2
        else []
    ),
}


# ---------------------------------------------------------------- building and running samples


def as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def embeddings(shape, device, dtype, *, generator=None, requires_grad=False):
    """Three random embedding matrices of one shape (the builders' x, x2, x3)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad) for _ in range(3)]


class _RecordBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metricops" and func._opname.endswith("_backward"):
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


def backward_samples(name, args, leaves, make_grad):
    """``(backward op name, its arguments)`` for each call autograd makes when ``name(*args)`` is differentiated.

    ``args`` are built from ``leaves`` (which require grad); ``make_grad(output)`` gives each cotangent.
    """
    results = [r for r in as_tuple(getattr(torch.ops.metricops, name)(*args)) if r.requires_grad]
    if not results:
        return []
    grads = [make_grad(r) for r in results]
    with _RecordBackwardCalls() as recorder:
        torch.autograd.grad(results, leaves, grads, allow_unused=True)
    return recorder.calls


def fake_run(name, args):
    """``torch.ops.metricops.<name>(*args)`` on fake copies of the tensors: what the fake kernel returns or raises."""
    mode = FakeTensorMode(shape_env=ShapeEnv())  # a shape env: mine_triplets' output size is data-dependent
    fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in detached(args)]
    with mode:
        return getattr(torch.ops.metricops, name)(*fake_args)
