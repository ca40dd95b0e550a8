"""Autocast (mixed precision) rules: every op that takes floating embeddings runs in float32.

Inside ``torch.autocast("cpu", ...)`` or ``torch.autocast("cuda", ...)``, the
floating inputs of these ops that are float16, bfloat16 (or float32) on that
device are cast to float32 before the kernel runs; float64 inputs are left as
they are (torch's rule). The op then runs with autocast off, returns float32,
and the cast is part of the autograd graph, so gradients reach half-precision
activations in their own dtype.

Why float32 on both devices: distances and hinges are computed in float32, as
are their reductions. On CPU it is also a necessity: the CPU kernels only do
float32/float64, and CPU autocast hands bfloat16 activations to the losses.
On CUDA the kernels accept float16/bfloat16 (accumulating in float32), but
under autocast the whole computation, outputs included, stays in float32.

Accuracy bound (checked in tests/test_autocast.py): float16/bfloat16 values are
exactly representable in float32, so the upcast adds no error; a loss computed
under autocast from half-precision embeddings ``x`` differs from the float64
reference computed on the same rounded values ``x.double()`` only by float32
arithmetic, for embeddings with entries of order 1 and D <= a few hundred:
``|loss - ref| <= 1e-4 * (1 + |ref|)``. (Hinge selections, e.g. the hardest
negative, can flip on near-ties at float32 resolution; the tests use random
data without such ties.)

Backward ops are not registered: they are called from the forward's autograd
formulas with the float32 tensors the forward saved.
"""

from __future__ import annotations

import torch

from ._common import LIB, forward_op_names

# Every forward op (not the *_backward ops): each takes floating embeddings. Derived from the dispatcher's op
# list, so a new op is covered when its schema is added to csrc/metricops.cpp.
AUTOCAST_OPS = tuple(forward_op_names())

for _name in AUTOCAST_OPS:
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(LIB + _name, _device, torch.float32)
