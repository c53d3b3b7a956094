"""Shared plumbing for the fused ops: optional Triton import, launch sizes and argument checks.

Nothing here queries CUDA at import time: Triton's driver lookup raises on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # Triton installs on Linux only; elsewhere every op runs its PyTorch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UINT32_SPAN = 2**32


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1), which runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def elementwise_launch(n_elements: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a 1-D elementwise kernel over `n_elements` per program row.

    The interpreter is ~15x faster at BLOCK 1024 than at 64, and on a GPU 1024 elements over
    4 warps keeps 8 elements per thread in flight, enough to saturate HBM for these streaming ops.
    """
    block = 1024 if interpreting() else min(1024, max(128, triton.next_power_of_2(max(n_elements, 1))))
    return block, 4


def triton_backend(device: torch.device | str) -> str:
    """Which implementation an op dispatches to for tensors on `device`: 'triton' or 'torch'."""
    device = torch.device(device)
    return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"


def check_float(name: str, x: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(x.dtype).removeprefix('torch.')}")


def check_int64(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64; got {str(x.dtype).removeprefix('torch.')}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device; got {found}")


def check_noise_span(name: str, first_offset: int, n_per_sample: int) -> None:
    """Keyed noise uses 32-bit Philox counters: every offset of a sample must fit below 2**32."""
    if first_offset < 0 or first_offset + n_per_sample > UINT32_SPAN:
        raise ValueError(
            f"{name}: noise offsets [{first_offset}, {first_offset + n_per_sample}) do not fit the 32-bit "
            f"Philox counter (limit 2**32 = {UINT32_SPAN}); use fewer timesteps or smaller images"
        )
