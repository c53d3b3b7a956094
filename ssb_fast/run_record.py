"""What a run ran on, for its run.json: package versions, the CUDA toolkit and driver, the device's name
and UUID, the host. Every fact that cannot be read is None, never an error; nothing here runs at import."""

from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata

import torch


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(device: torch.device | None = None) -> dict:
    """ssb-fast, Python, torch, triton, numpy, nibabel, the CUDA toolkit torch was built with and, on a
    CUDA device, the NVIDIA driver (from NVML)."""
    from ssb_fast import __version__

    driver = None
    if device is not None and device.type == "cuda":
        from ssb_fast.telemetry import gpu_inventory

        gpus, _ = gpu_inventory()
        driver = gpus[0]["driver"] if gpus else None
    return {
        "ssb_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "nibabel": _package_version("nibabel"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device is not None and device.type == "cuda" else None,
        "driver": driver,
    }


def device_record(device: torch.device) -> dict:
    """The device a process sampled on: its name and, for a GPU, UUID, capability and memory."""
    record = {"device": str(device), "host": socket.gethostname(), "name": None, "uuid": None}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        record.update(device=f"cuda:{index}", name=props.name, uuid=f"GPU-{props.uuid}",
                      capability=f"sm_{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 2))
    else:
        record.update(name=_cpu_name(), threads=torch.get_num_threads())
    return record


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def command_line() -> list[str]:
    """The command as typed (argv), for the record."""
    return list(sys.argv)
