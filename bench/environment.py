"""Where a benchmark ran: the device's name, the versions, how busy the host was; stated in every report.

The facts come from ssb_fast.run_record, the one place that reads them for run records too.
"""

from __future__ import annotations

import os

import torch

from ssb_fast.run_record import device_record
from ssb_fast.run_record import versions as _versions


def load_average() -> float | None:
    """The host's 1-minute load average, where the OS has one: busy cores make CPU timings noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device | str) -> str:
    """torch's name of a CUDA device; the processor's for the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "cuda (unavailable)"
    return device_record(device)["name"]


def versions(device: torch.device | str | None = None) -> dict:
    """ssb-fast, Python, torch, triton, numpy, CUDA and, on a GPU, cuDNN and the driver."""
    return _versions(torch.device(device) if device is not None else None)
