"""End-to-end metric learning on scikit-learn's handwritten digits, with metricops losses.

Trains a tiny conv net (two 3x3 convolutions, global average pooling, a
64-d L2-normalized embedding) on digits 0-4 and evaluates zero-shot retrieval
on the unseen digits 5-9 (each test image queries all the others), before and
after training, next to the raw 64 pixels as a baseline. Also times one training step with
the metricops loss against the plain-torch reference of the same name, and
writes a PNG with PCA projections of the test embeddings and the loss curve.

The data ships with scikit-learn (``sklearn.datasets.load_digits``): nothing is
downloaded. Run ``python -m metricops.demo --help`` (or ``make demo``).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import metricops
from metricops import reference

TRAIN_CLASSES = (0, 1, 2, 3, 4)
TEST_CLASSES = (5, 6, 7, 8, 9)
MARGIN = 0.2


def _loss_fn(module, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss `name` from `module` (metricops or metricops.reference), on L2-normalized embeddings."""
    if name == "batch_hard":
        return lambda e, y: module.batch_hard_triplet_loss(e, y, margin=MARGIN, normalize=True)
    if name == "semihard":
        return lambda e, y: module.semihard_triplet_loss(e, y, margin=MARGIN, normalize=True)
    if name == "batch_all":
        return lambda e, y: module.batch_all_triplet_loss(e, y, margin=MARGIN, normalize=True)
    if name == "contrastive":
        # Unit vectors are at most 2 apart; pushing negatives past 0.5 (not 1.0) trained
        # faster here and transferred better to the unseen digits.
        return lambda e, y: module.contrastive_loss(e, y, pos_margin=0.0, neg_margin=0.5, normalize=True)
    raise ValueError(f"unknown loss {name!r}")


LOSSES = ("batch_hard", "semihard", "batch_all", "contrastive")
# Contrastive's mean over all B(B-1) pairs gives each pair a small gradient: it needs a larger step.
DEFAULT_LR = {"batch_hard": 1e-3, "semihard": 1e-3, "batch_all": 1e-3, "contrastive": 3e-3}


class EmbeddingNet(nn.Module):
    """8x8 image (flattened, 64 values) -> `out_dim` embedding.

    A conv net with global average pooling rather than an MLP: on this split an
    MLP's training on 0-4 only ever lowered retrieval on 5-9 (its random init
    already behaves like raw pixels and training collapses the unseen digits
    onto the seen ones), while pooled local stroke features do transfer.
    """

    def __init__(self, channels: int = 32, hidden: int = 64, out_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))


def load_split(device: torch.device):
    """Digits as float32 in [0, 1]; train on 0-4, test on the unseen 5-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train = torch.isin(y, torch.tensor(TRAIN_CLASSES))
    test = torch.isin(y, torch.tensor(TEST_CLASSES))
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


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
def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    e = torch.nn.functional.normalize(model(x), dim=1)
    model.train()
    return e


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    # Each test image queries all other test images (database=None leaves itself out).
    return metricops.retrieval_metrics(embed(model, x), y, ks=(1, 5, 10))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def time_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, losses: Dict[str, Callable], lr: float, steps: int
) -> Dict[str, float]:
    """Median seconds of one training step (forward, loss, backward, Adam step) per loss.

    Each loss trains its own copy of the model on the same batch; the losses
    take turns step by step so that machine noise hits all of them alike.
    """
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    runs = {}
    for name in losses:
        m = copy.deepcopy(model)
        runs[name] = (m, torch.optim.Adam(m.parameters(), lr=lr))
    times: Dict[str, List[float]] = {name: [] for name in losses}
    for i in range(steps + 1):  # the first round warms up (allocations, lazy init)
        for name, fn in losses.items():
            m, opt = runs[name]
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(m(x), y).backward()
            opt.step()
            sync()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _format_metrics(before: Dict[str, float], after: Dict[str, float], pixels: Dict[str, float]) -> str:
    keys = ["hit@1", "recall@1", "recall@5", "recall@10", "map@1", "map@5", "map@10", "map@r"]
    lines = [f"{'metric':<10} {'before':>8} {'after':>8} {'raw pixels':>11}"]
    for k in keys:
        lines.append(f"{k:<10} {before[k]:>8.3f} {after[k]:>8.3f} {pixels[k]:>11.3f}")
    return "\n".join(lines)


def save_figure(path: str, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                losses: Sequence[float], loss_name: str, metrics: Dict[str, Dict[str, float]]) -> None:
    # Figure + its own Agg canvas: no pyplot, so no GUI backend and no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    y = labels.cpu().numpy()
    for ax, emb, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        # PCA to 2-D (t-SNE would be too slow for a demo), each projection fitted on its own embeddings.
        e = emb.detach().cpu().double()
        e = e - e.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(e, full_matrices=False)
        p = (e @ v[:2].T).numpy()
        for c in np.unique(y):
            sel = y == c
            ax.scatter(p[sel, 0], p[sel, 1], s=6, alpha=0.7, label=str(c))
        ax.set_title(f"test digits 5-9, {title} training (map@r {metrics[title]['map@r']:.3f})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=2, fontsize=8, title="digit")
    axes[2].plot(np.arange(1, len(losses) + 1), losses, lw=1)
    axes[2].set_title(f"training loss ({loss_name}, digits 0-4)")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metricops.demo",
        description="Train a small embedding net on sklearn's digits 0-4 with a metricops loss and "
        "evaluate zero-shot retrieval on the unseen digits 5-9.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--loss", choices=LOSSES, default="batch_hard", help="training loss")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--batches-per-epoch", type=int, default=None,
                   help="batches per epoch (default: about one pass over the training images)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="batch size; batches hold --classes-per-batch classes x (batch-size / classes) samples")
    p.add_argument("--classes-per-batch", type=int, default=5, help="P in the P x K class-balanced batches (2..5)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 3e-3 for contrastive, 1e-3 for the triplet losses)")
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, random and the batch sampler")
    p.add_argument("--timing-steps", type=int, default=20,
                   help="training steps timed per loss (metricops vs reference); 0 skips the timing")
    p.add_argument("--out", default="demo_out", help="directory for the PNG")
    p.add_argument("--quick", action="store_true", help="one short epoch and few timing steps (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the demo; returns the metrics, loss curve, step times and PNG path (for tests)."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs = 1
        args.batches_per_epoch = args.batches_per_epoch or 40
        args.timing_steps = min(args.timing_steps, 2)
    if not 2 <= args.classes_per_batch <= len(TRAIN_CLASSES):
        raise SystemExit(f"--classes-per-batch must be in 2..{len(TRAIN_CLASSES)}, got {args.classes_per_batch}")
    per_class = args.batch_size // args.classes_per_batch
    if per_class < 2:
        raise SystemExit("--batch-size must give at least 2 samples per class (positives need a partner)")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.loss]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    seed_everything(args.seed)
    (x_train, y_train), (x_test, y_test) = load_split(device)
    batches_per_epoch = args.batches_per_epoch or max(1, round(len(x_train) / (per_class * args.classes_per_batch)))
    model = EmbeddingNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = _loss_fn(metricops, args.loss)
    rng = np.random.default_rng(args.seed)
    y_train_np = y_train.cpu().numpy()

    print(f"metricops {metricops.__version__} demo: {args.loss} loss on {device}; "
          f"train digits 0-4 ({len(x_train)} images), test digits 5-9 ({len(x_test)} images)")
    emb_before = embed(model, x_test)
    before = evaluate(model, x_test, y_test)

    from tqdm import tqdm

    losses: List[float] = []
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        bar = tqdm(
            balanced_batches(y_train_np, args.classes_per_batch, per_class, batches_per_epoch, rng),
            total=batches_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress,
            leave=True, dynamic_ncols=True,
        )
        running = None
        for idx in bar:
            idx_t = torch.from_numpy(idx).to(device)
            xb, yb = x_train[idx_t], y_train[idx_t]
            emb = model(xb)
            loss = loss_fn(emb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            # How hard the batch is for the current embedding (exact counts, no B^3 memory).
            stats = metricops.triplet_statistics(emb.detach(), yb, margin=MARGIN, normalize=True)
            total = max(int(stats["total"]), 1)
            bar.set_postfix(loss=f"{running:.4f}", hard=f"{int(stats['hard']) / total:.2f}",
                            semihard=f"{int(stats['semihard']) / total:.2f}", easy=f"{int(stats['easy']) / total:.2f}")
        bar.close()
    train_s = time.perf_counter() - t_train

    emb_after = embed(model, x_test)
    after = evaluate(model, x_test, y_test)
    print(f"\nzero-shot retrieval on the unseen digits 5-9 ({int(after['num_queries'])} queries, "
          f"each against all other test images), {len(losses)} steps in {train_s:.1f} s:")
    # Context for the numbers: the same retrieval on the unit-normalized raw pixels, no network.
    pixels = metricops.retrieval_metrics(torch.nn.functional.normalize(x_test, dim=1), y_test, ks=(1, 5, 10))
    print(_format_metrics(before, after, pixels))

    step_times = None
    if args.timing_steps > 0:
        idx = torch.from_numpy(next(balanced_batches(y_train_np, args.classes_per_batch, per_class, 1, rng))).to(device)
        step_times = time_steps(
            model, x_train[idx], y_train[idx],
            {"metricops": loss_fn, "reference": _loss_fn(reference, args.loss)}, args.lr, args.timing_steps,
        )
        ratio = step_times["reference"] / step_times["metricops"]
        print(f"\ntraining step ({args.loss}, batch {len(idx)}, {device}), median of {args.timing_steps} "
              f"interleaved steps: metricops {step_times['metricops'] * 1e3:.2f} ms, "
              f"reference {step_times['reference'] * 1e3:.2f} ms -> metricops is {ratio:.2f}x "
              f"{'faster' if ratio >= 1 else 'slower'}")
        print("  (the whole step, model and optimizer included, not just the loss)")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"demo_{args.loss}.png")
    save_figure(png, emb_before, emb_after, y_test, losses, args.loss, {"before": before, "after": after})
    print(f"\nwrote {png}")
    return {"before": before, "after": after, "pixels": pixels, "losses": losses, "step_times": step_times, "png": png,
            "train_seconds": train_s}


if __name__ == "__main__":
    main()
    sys.exit(0)
