"""Fake kernels and autograd formulas for every native op, one module per area."""

from . import distance  # noqa: F401
from . import triplet  # noqa: F401
from . import contrastive  # noqa: F401
from . import retrieval  # noqa: F401
