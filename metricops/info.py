"""`python -m metricops.info`: versions and compiled backends."""

from __future__ import annotations

import platform
import sys

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows (often just the architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The widest vector ISA torch's CPU kernels use here ("AVX512", "AVX2", "DEFAULT", ...). metricops' own
    loops pick their clone by the same hardware features (csrc/cpu/simd.h), and BLAS its kernels: timings from
    two CPUs of the same architecture but another capability (or vendor) are not comparable."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - older torch
        return "unknown"


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
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
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
    print(f"CPU: {info['cpu']} (vector ISA: {info['cpu_capability']}), {info['num_threads']} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
