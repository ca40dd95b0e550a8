"""The lazy output of the metricops.pml triplet miners.

A miner's ``(anchors, positives, negatives)`` can hold millions of triplets
(every violating triplet of a 1024 batch: ~7M), while the usual consumer, a
metricops.pml TripletMarginLoss called on the same embeddings, needs none of
them: it computes the same loss fused from the selection rule. So the miners
return a ``MinedTriplets``: a tuple of three int64 tensors that is mined when
something first looks inside (indexing, unpacking, iteration, ``len()`` of an
element, printing, pickling), and that carries the selection rule for the
losses.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

Indices = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TripletSelection:
    """A triplet miner's rule, frozen at the call.

    ``type_of_triplets``: TripletMarginMiner's ``"all"``, ``"hard"``,
    ``"semihard"``, ``"easy"`` (with ``margin``), or ``"batch_hard"``.
    ``metric``/``normalize``/``is_inverted``: the miner's distance.
    """

    type_of_triplets: str
    margin: float
    metric: str
    normalize: bool
    is_inverted: bool


class MinedSource:
    """What a batch was mined from: the caller's embeddings (weakly held, with their in-place version),
    a copy of their values and the integer labels."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor):
        self._embeddings = weakref.ref(embeddings)
        self._version = _version(embeddings)
        self.values = embeddings.detach().clone()
        self.labels = labels.clone()

    def is_unchanged(self, embeddings: torch.Tensor) -> bool:
        """Whether ``embeddings`` is the very tensor mined, not modified in place since (unknowable for an
        inference-mode tensor: no). The values are compared too: a write through ``.data`` leaves the version
        counter alone (O(B·D), and a host sync on CUDA, as the fused losses' own checks)."""
        return (
            self._embeddings() is embeddings
            and self._version is not None
            and _version(embeddings) == self._version
            and torch.equal(self.values, embeddings.detach())
        )


def _version(t: torch.Tensor):
    """The in-place version counter; None for inference-mode tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return None


class MinedTriplets(tuple):
    """``(anchors, positives, negatives)``: int64 index tensors, mined on first look.

    Behaves as the tuple PML's miners return: ``len()`` is 3; indexing,
    slicing, unpacking, iteration, ``==``, ``+``, ``in``, ``repr``, ``copy``
    and pickling see the three tensors. The tuple's storage itself stays
    empty, so a C function reading it directly (``torch.cat(out)``,
    ``torch.stack(out)``) sees no tensor; pass ``tuple(out)`` there.

    ``selection``/``source`` let a metricops.pml loss on the same embeddings
    compute its value without the indices.
    """

    def __new__(
        cls,
        mine: Callable[[], Indices],
        selection: Optional[TripletSelection] = None,
        source: Optional[MinedSource] = None,
    ):
        self = super().__new__(cls)
        self._mine = mine
        self._indices = None
        self.selection = selection
        self.source = source
        return self

    @property
    def is_materialized(self) -> bool:
        return self._indices is not None

    def materialize(self) -> Indices:
        """The three tensors as a plain tuple (mined now if not yet)."""
        if self._indices is None:
            self._indices = tuple(self._mine())
            self._mine = None  # drop the closure (and what it holds)
        return self._indices

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return self.materialize()[index]

    def __iter__(self):
        return iter(self.materialize())

    def __reversed__(self):
        return reversed(self.materialize())

    def __contains__(self, item):
        return item in self.materialize()

    def count(self, value):
        return self.materialize().count(value)

    def index(self, value, *args):
        return self.materialize().index(value, *args)

    def __eq__(self, other):
        return self.materialize() == _plain(other)

    def __ne__(self, other):
        return self.materialize() != _plain(other)

    def __hash__(self):
        return hash(self.materialize())

    def __add__(self, other):
        return self.materialize() + _plain(other)

    def __radd__(self, other):
        return _plain(other) + self.materialize()

    def __mul__(self, n):
        return self.materialize() * n

    __rmul__ = __mul__

    def __repr__(self):
        return repr(self.materialize())

    def __reduce_ex__(self, protocol):
        return tuple, (self.materialize(),)

    def __reduce__(self):
        return tuple, (self.materialize(),)

    def __copy__(self):
        return self.materialize()

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.materialize(), memo)


def _plain(other):
    return other.materialize() if isinstance(other, MinedTriplets) else other
