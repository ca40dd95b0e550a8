"""Helpers shared by metricops.pml: argument refusal and PML's index conventions."""

from __future__ import annotations

import torch

from .._memory import AUTO_STREAM_MIN_B
from .._validation import type_name


def refuse_unsupported(cls_name: str, kwargs: dict) -> None:
    """pytorch-metric-learning accepts many more arguments; we refuse them by name rather than ignore them."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise NotImplementedError(
            f"metricops.pml: {cls_name} does not support the argument(s) {names} "
            "(only the subset listed in metricops.pml's docstring is implemented)"
        )


def check_call(embeddings, labels, indices_tuple):
    """A loss call's arguments as PML requires them: a tensor, labels or indices, a 3- or 4-tuple of indices."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type_name(embeddings)}")
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    if indices_tuple is not None and len(indices_tuple) not in (3, 4):
        raise ValueError(
            f"indices_tuple must hold 3 tensors (anchors, positives, negatives) or 4 (a1, p, a2, n), "
            f"got {len(indices_tuple)}"
        )


def wrap_indices(t: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """Listed indices as PML's tensor indexing reads them: -size <= i < 0 counts from the end; any other index
    outside [0, size) raises IndexError (else a pair's row-major key would silently alias another pair)."""
    if t.numel() == 0:
        return t
    bad = (t < -size) | (t >= size)
    if bool(bad.any()):
        raise IndexError(
            f"indices_tuple: index {int(t[bad][0])} is out of bounds for the {size} {what} rows "
            f"(valid: -{size} to {size - 1})"
        )
    return torch.where(t < 0, t + size, t)


def mining_values(embeddings: torch.Tensor) -> torch.Tensor:
    """Embeddings as the native mining ops take them: float16/bfloat16 on CPU in float32 (PML's torch ops take
    half precision on CPU; the native ops on CUDA only). Indices only: no gradient goes through these."""
    if embeddings.device.type == "cpu" and embeddings.dtype in (torch.float16, torch.bfloat16):
        return embeddings.detach().float()
    return embeddings


def nonfinite_below_streaming(embeddings: torch.Tensor) -> bool:
    """Whether a batch with a NaN or infinite coordinate is small enough (below the streaming sizes) for the
    O(B²) paths that follow PML's AvgNonZeroReducer, which drops NaN terms where the fused ops' sums turn NaN.
    Looking is one host sync on CUDA; not done while compiling or capturing a CUDA graph (a data-dependent branch)."""
    if embeddings.shape[0] >= AUTO_STREAM_MIN_B or torch.compiler.is_compiling():
        return False
    if embeddings.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not bool(torch.isfinite(embeddings).all())


def set_ref(embeddings, labels, ref_emb, ref_labels):
    """PML's set_ref_emb: without ref_emb the batch is its own reference (same labels object)."""
    if embeddings.dim() != 2 or (ref_emb is not None and ref_emb.dim() != 2):
        raise ValueError("embeddings must be a 2D tensor of shape (batch_size, embedding_size)")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]):
        raise ValueError(
            f"labels must be a 1-D tensor of length {embeddings.shape[0]} (one per embedding), "
            f"got shape {tuple(labels.shape)}"
        )
    if ref_emb is None:
        return embeddings, labels
    if ref_labels is not None and (ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]):
        raise ValueError(
            f"ref_labels must be a 1-D tensor of length {ref_emb.shape[0]} (one per ref_emb row), "
            f"got shape {tuple(ref_labels.shape)}"
        )
    return ref_emb, ref_labels


def matches_and_diffs(labels, ref_labels):
    """Same-label and different-label masks; self pairs are excluded when the reference is the batch itself."""
    self_ref = ref_labels is None or ref_labels is labels
    ref = labels if ref_labels is None else ref_labels
    matches = labels[:, None] == ref[None, :]
    diffs = ~matches
    if self_ref:
        matches.fill_diagonal_(False)
    return matches, diffs


def all_pairs(labels, ref_labels):
    matches, diffs = matches_and_diffs(labels, ref_labels)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def all_triplets(labels, ref_labels):
    """Every (a, p, n), lexicographically sorted, as PML's get_all_triplets_indices (plain torch, O(B³) memory).

    Only for the ``ref_emb`` case of the wrapped losses (PML's own indices,
    which a user's loss then indexes): ``metricops.mine_triplets`` mines
    within one batch and takes no reference set.
    """
    matches, diffs = matches_and_diffs(labels, ref_labels)
    return torch.where(matches[:, :, None] & diffs[:, None, :])
