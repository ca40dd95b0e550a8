"""pytorch-metric-learning distances, computed by metricops.pairwise_distance."""

from __future__ import annotations

from typing import Optional

import torch

from ..distance import pairwise_distance
from .._validation import type_name
from ._common import refuse_unsupported


class BaseDistance(torch.nn.Module):
    """What the metricops.pml losses need to know about a distance.

    ``metric``/``normalize``: the metricops pairwise_distance that gives the
    matrix (or, when ``is_inverted``, 1 − the similarity matrix).
    """

    metric: str
    normalize_embeddings: bool
    is_inverted: bool

    def forward(self, query_emb: torch.Tensor, ref_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if query_emb.dim() != 2 or (ref_emb is not None and ref_emb.dim() != 2):
            raise ValueError("embeddings must be a 2D tensor of shape (batch_size, embedding_size)")
        dtype = query_emb.dtype
        if query_emb.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            # the native op takes half precision on CUDA only; PML's torch ops take it on CPU too
            query_emb = query_emb.float()
            ref_emb = None if ref_emb is None else ref_emb.float()
        d = pairwise_distance(query_emb, ref_emb, metric=self.metric, normalize=self.normalize_embeddings)
        return (1 - d if self.is_inverted else d).to(dtype)

    # PML's helpers (BaseDistance's public methods, for code written against PML's distances), with its sign
    # conventions for similarities.
    def margin(self, x, y):
        return y - x if self.is_inverted else x - y

    def smallest_dist(self, *args, **kwargs):
        return torch.max(*args, **kwargs) if self.is_inverted else torch.min(*args, **kwargs)

    def largest_dist(self, *args, **kwargs):
        return torch.min(*args, **kwargs) if self.is_inverted else torch.max(*args, **kwargs)

    def normalize(self, embeddings, dim=1, **kwargs):
        return torch.nn.functional.normalize(embeddings, p=self.p, dim=dim, **kwargs)

    def maybe_normalize(self, embeddings, dim=1, **kwargs):
        return self.normalize(embeddings, dim=dim, **kwargs) if self._pml_normalizes else embeddings

    def get_norm(self, embeddings, dim=1, **kwargs):
        return torch.norm(embeddings, p=self.p, dim=dim, **kwargs)

    @property
    def _pml_normalizes(self) -> bool:
        return self.normalize_embeddings


class LpDistance(BaseDistance):
    """``LpDistance(normalize_embeddings=True, p=2, power=1|2)``: the L2 distance (power 2: squared)."""

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1, **kwargs):
        super().__init__()
        refuse_unsupported("distances.LpDistance", kwargs)
        if p != 2:
            raise NotImplementedError(f"metricops.pml: distances.LpDistance supports p=2 only, got p={p!r}")
        if power not in (1, 2):
            raise NotImplementedError(
                f"metricops.pml: distances.LpDistance supports power=1 or 2 only, got power={power!r}"
            )
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(f"normalize_embeddings must be a bool, got {type_name(normalize_embeddings)}")
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = False
        self.metric = "euclidean" if power == 1 else "sqeuclidean"

    def pairwise_distance(self, query_emb, ref_emb):
        """PML's row-wise distance of paired rows (no normalization, no power, as PML's)."""
        return torch.nn.functional.pairwise_distance(query_emb, ref_emb, p=self.p)


class CosineSimilarity(BaseDistance):
    """``CosineSimilarity()``: cos(x, y), a similarity (PML inverts margins and min/max for it)."""

    def __init__(self, **kwargs):
        super().__init__()
        refuse_unsupported("distances.CosineSimilarity", kwargs)
        self.normalize_embeddings = False  # the cosine metric normalizes by itself (zero vector: cos 0)
        self.p = 2
        self.power = 1
        self.is_inverted = True
        self.metric = "cosine"

    @property
    def _pml_normalizes(self) -> bool:
        return True  # PML's CosineSimilarity has normalize_embeddings=True; here that flag is the op's (above)

    def pairwise_distance(self, query_emb, ref_emb):
        """PML's row-wise similarity of paired rows: their dot product (rows normalized by the caller, as PML's)."""
        return torch.sum(query_emb * ref_emb, dim=1)


def resolve(distance, cls_name: str) -> BaseDistance:
    if distance is None:
        return LpDistance()
    if not isinstance(distance, BaseDistance):
        raise NotImplementedError(
            f"metricops.pml: {cls_name}(distance=...) must be metricops.pml.distances.LpDistance or "
            f"CosineSimilarity, got {type(distance).__module__}.{type(distance).__name__}"
        )
    return distance
