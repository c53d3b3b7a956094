"""Where a benchmark ran: the device's name, the versions, how busy the host was; stated in every report."""

from __future__ import annotations

import os
import platform

import torch
from ssb_fast.kernels import HAS_TRITON

import ssb_fast


def load_average() -> float | None:
    """The host's 1-minute load average, where the OS has one: busy cores make CPU timings noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    """torch's name of a CUDA device; the processor's for the CPU."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict:
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {"ssb_fast": ssb_fast.__version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version()}
