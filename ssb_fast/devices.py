"""Device selection: `auto`, `cpu`, `cuda` or `cuda:N`, resolved once with a clear error."""

from __future__ import annotations

import os
import re

import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a --device string into a torch.device; `auto` picks CUDA when present, else the CPU."""
    spec = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but this torch build sees no CUDA device "
                             f"(torch {torch.__version__})")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def describe_device(device: torch.device) -> str:
    """A human line: the GPU's name and capability, or the CPU's thread count."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return (f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB)")
    return f"cpu ({torch.get_num_threads()} threads)"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Half the usable cores, at least one. Shared machines are the common case, and oversubscribed
    intra-op threads stall each other: on 2 busy cores one thread ran 5-8x faster than two."""
    return max(1, available_cores() // 2)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads: None means `default_threads()`, 0 leaves torch's own choice.
    Returns the count in force."""
    if threads is None:
        threads = default_threads()
    if threads < 0:
        raise ValueError(f"threads must be >= 0; got {threads}")
    if threads > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
