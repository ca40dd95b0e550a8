"""`python -m metricops.info`: versions and compiled backends."""

from __future__ import annotations

import platform
import sys

import torch


def collect() -> dict:
    import metricops

    info = metricops.build_info()
    return {
        "metricops": metricops.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backends": ["cpu"] + (["cuda"] if info["cuda"] else []),
        "cuda_archs": info["cuda_archs"],
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "sanitizers": info["sanitizers"],
        "num_threads": torch.get_num_threads(),
    }


def main() -> int:
    info = collect()
    print(f"metricops {info['metricops']}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), Python {info['python']}")
    cuda = (
        f"CUDA kernels compiled for sm {', '.join(info['cuda_archs']) or '?'}"
        if "cuda" in info["backends"]
        else "CUDA kernels not compiled"
    )
    print(f"backends: CPU; {cuda}")
    devices = ", ".join(info["cuda_devices"]) or "none"
    print(f"CUDA available at run time: {info['cuda_available']} (devices: {devices})")
    if info["sanitizers"]:
        print("built with AddressSanitizer/UBSan")
    print(f"CPU threads: {info['num_threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
