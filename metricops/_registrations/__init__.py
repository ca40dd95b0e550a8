"""Fake kernels and autograd formulas for every native op, one module per area, and autocast rules."""

from . import distance  # noqa: F401
from . import triplet  # noqa: F401
from . import contrastive  # noqa: F401
from . import retrieval  # noqa: F401
from . import similarity  # noqa: F401
from . import class_losses  # noqa: F401
from . import autocast  # noqa: F401  (after the others: every op is defined by then)
