"""Loads metricops._C, whose import runs the native operator registrations."""

import torch  # first: it loads libc10/libtorch, which _C links against

try:
    from . import _C  # noqa: F401  (registers torch.ops.metricops.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "metricops' native extension (metricops._C) is not built or does not match this torch. "
        "Build it with `make build` (or `pip install --no-build-isolation -e .`). "
        f"Original error: {exc}"
    ) from exc

ops = torch.ops.metricops


def build_info() -> dict:
    """Backends compiled into the native extension.

    Returns {'cpu': True, 'cuda': bool, 'cuda_archs': ['8.0', '9.0'], 'sanitizers': bool}.
    """
    parts = ops._build_info().split("|")
    archs = next((p.split("=", 1)[1] for p in parts if p.startswith("archs=")), "")
    return {
        "cpu": "cpu" in parts,
        "cuda": "cuda" in parts,
        "cuda_archs": [a for a in archs.split(";") if a],
        "sanitizers": "asan" in parts,
    }
