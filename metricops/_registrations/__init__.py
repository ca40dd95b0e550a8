"""Fake kernels, autograd formulas and autocast rules of every native op, registered from Python.

One module per area (distance, triplet, contrastive, retrieval) registers, for
each of its ops, a fake kernel (``torch.library.register_fake``: shapes,
dtypes and the same input checks as the C++ kernel) and either an autograd
formula (``_autograd.register_autograd``) or ``register_not_differentiable``.
The rules that hold for every op are registered here and in autocast.py by
iterating the dispatcher's op list (``_common.native_op_names``): a
``<name>_backward`` op refuses double backward, every forward op runs in
float32 under autocast. tests/test_op_registry.py checks that every op has
all three registrations and a sample in tests/samples.py.
"""

from . import distance  # noqa: F401
from . import triplet  # noqa: F401
from . import contrastive  # noqa: F401
from . import retrieval  # noqa: F401
from . import similarity  # noqa: F401
from . import class_losses  # noqa: F401
from . import autocast  # noqa: F401
from ._autograd import register_backward_op
from ._common import backward_op_names, forward_of

for _name in backward_op_names():
    register_backward_op(_name, forward_of(_name))
