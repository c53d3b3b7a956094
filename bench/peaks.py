"""What a device can do at most: the vendor's peak figures for the GPUs we know, and a measured copy bandwidth.

Percent-of-peak figures in the reports divide by these. Only exact models are listed: an H100 PCIe or
NVL, an A100 40GB or an H200 NVL has other clocks, memory and power limits, so for them (and every
other device) the lookup says "no known peak" and reports fall back to a measured device-to-device
copy bandwidth.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DevicePeak:
    """Vendor peaks of one GPU model: dense bf16 tensor-core TFLOP/s (no sparsity) and HBM TB/s."""

    model: str
    bf16_dense_tflops: float
    hbm_tb_per_s: float
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


# (pattern over torch.cuda.get_device_name(), peak). Names as torch reports them: "NVIDIA H100 80GB HBM3"
# is the SXM5 board, "NVIDIA H200" the SXM one, "NVIDIA A100-SXM4-80GB" the 80 GB SXM4 board.
KNOWN_PEAKS: tuple[tuple[re.Pattern, DevicePeak], ...] = (
    (re.compile(r"\bH100\b(?!.*(PCIe|NVL)).*(SXM|HBM3)", re.IGNORECASE),
     DevicePeak("NVIDIA H100 SXM", 989.0, 3.35, "NVIDIA H100 datasheet (SXM5, dense)")),
    (re.compile(r"\bH200\b(?!.*NVL)", re.IGNORECASE),
     DevicePeak("NVIDIA H200 SXM", 989.0, 4.8, "NVIDIA H200 datasheet (SXM, dense)")),
    (re.compile(r"\bA100\b.*SXM.*80\s*GB", re.IGNORECASE),
     DevicePeak("NVIDIA A100 SXM 80GB", 312.0, 2.039, "NVIDIA A100 datasheet (SXM4 80GB, dense)")),
)


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The known peak of the GPU called `device_name` (torch's name for it), or None."""
    for pattern, peak in KNOWN_PEAKS:
        if pattern.search(device_name or ""):
            return peak
    return None


def peak_report(device_name: str) -> dict:
    """The peak as a report entry: the figures, or `known: False` with a note saying there is none."""
    peak = lookup_peak(device_name)
    if peak is None:
        return {"known": False, "device_name": device_name,
                "note": f"no known peak for {device_name!r}; percentages use the measured copy bandwidth"}
    return {"known": True, "device_name": device_name, **peak.as_dict()}


def measure_copy_bandwidth(device: torch.device | str, n_bytes: int = 2**28, repeat: int = 10) -> float:
    """Achieved bytes/s of a device-to-device copy of `n_bytes`, counting the read and the write.

    The practical ceiling of a streaming kernel on this device; the fallback when no peak is known.
    Median of `repeat` copies after one warm-up (CUDA events on a GPU, perf_counter elsewhere).
    """
    device = torch.device(device)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(seconds)
