"""Fused ops of ssb-fast, registered as `torch.library` ops in the `ssb_fast` namespace.

Each file holds one op: the Triton kernel, its launcher, the PyTorch reference and the registration.
CUDA tensors run Triton; every other device runs the reference. This package imports nothing from
the rest of ssb_fast.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, interpreting, triton_backend
from .bridge_sample import bridge_sample
from .cfg_step import cfg_step
from .noise import hash_seed, keyed_randn, noise_seed, noise_seeds, philox4x32, philox_randn
from .pair_counts import pair_counts
from .pairwise_jsd import pairwise_jsd

OPS = ("bridge_sample", "cfg_step", "pair_counts", "pairwise_jsd")


def op_backends(device: torch.device | str) -> dict[str, str]:
    """Which implementation each op runs on `device`: 'triton' or 'torch'."""
    backend = triton_backend(device)
    return {name: backend for name in OPS}


__all__ = [
    "HAS_TRITON", "OPS", "bridge_sample", "cfg_step", "hash_seed", "interpreting", "keyed_randn", "noise_seed",
    "noise_seeds", "op_backends", "pair_counts", "pairwise_jsd", "philox4x32", "philox_randn",
    "triton_backend",
]
