"""Test setup: run Triton launchers in the interpreter on CPU-only machines; skip `gpu` tests there."""

from __future__ import annotations

import os

import pytest
import torch

# Read by @triton.jit when the kernel modules are imported, so it must be set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device() -> str:
    """Where Triton launchers run: the GPU when present, else CPU tensors under the interpreter."""
    from ssb_fast.kernels import HAS_TRITON, interpreting

    # CI sets SSB_FAST_REQUIRE_TRITON=1 so that kernel tests fail rather than skip when they cannot run.
    skip = pytest.fail if os.environ.get("SSB_FAST_REQUIRE_TRITON") == "1" else pytest.skip
    if not HAS_TRITON:
        skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if not interpreting():
        skip("no GPU and TRITON_INTERPRET is off")
    return "cpu"
