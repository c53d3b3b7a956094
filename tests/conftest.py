"""Test setup: run Triton launchers in the interpreter on CPU-only machines, and skip `gpu` tests there; on a
CUDA machine the tests of Triton launchers (those taking `triton_device`) become `gpu` tests."""

from __future__ import annotations

import os

import pytest
import torch

# Read by @triton.jit when the kernel modules are imported, so it must be set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def mark_gpu_items(items, cuda_available: bool) -> None:
    """On a CUDA machine every test that takes `triton_device` is a `gpu` test (so `-m gpu` selects it and the
    default `-m 'not gpu'` leaves it out); on a CPU machine those stay unmarked and run in the interpreter,
    while tests marked `gpu` by hand are skipped."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if cuda_available and "triton_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not cuda_available:
            item.add_marker(skip_gpu)


@pytest.hookimpl(tryfirst=True)  # markers must exist before `-m` deselects (pytest's own hook runs later)
def pytest_collection_modifyitems(config, items):
    mark_gpu_items(items, torch.cuda.is_available())


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained for two steps on 32x32 synthetic scans, and its dataset (12 cases, 8 of them in
    train): (run folder, data folder). Shared read-only by the sampling and bench tests."""
    from ssb_fast.train.loop import TrainConfig, train

    from ssb_fast.data import write_synthetic

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_synthetic(root / "data", n_cases=12, size=32, seed=0)
    train(TrainConfig(data=str(data), out=str(root / "run"), preset="tiny", steps=2, batch_size=4, val_every=0,
                      seed=0, device="cpu"), progress=False)
    return root / "run", data
