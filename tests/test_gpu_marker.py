"""tests/conftest.py: on a CUDA machine the Triton-launcher tests (those taking `triton_device`) are `gpu` tests,
so `-m gpu` selects them; on a CPU machine they stay unmarked and the default run keeps them in the interpreter.

Runs the project's own conftest inside pytester, with torch.cuda.is_available patched either way. The kernels
are imported up front: pytester forgets the modules an inner run imports, and importing triton a second time
in one process aborts it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ssb_fast.kernels  # noqa: F401  (loaded before the inner runs: pytester drops the modules they import)
import torch

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
INI = """[pytest]
addopts = -p no:cacheprovider -m 'not slow and not gpu and not benchmark'
markers =
    slow: slow
    gpu: needs a CUDA device
    benchmark: benchmark
"""
TESTS = """
import pytest

def test_launcher(triton_device):
    assert triton_device in ("cuda", "cpu")

def test_plain():
    pass

@pytest.mark.gpu
def test_marked_by_hand():
    pass
"""


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_kernels=TESTS)
    return pytester


@pytest.mark.parametrize("cuda, args, outcomes", [
    (True, (), {"passed": 1, "deselected": 2}),                       # launcher tests left to -m gpu
    (True, ("-m", "gpu"), {"passed": 2, "deselected": 1}),            # ... which selects them
    (False, (), {"passed": 2, "deselected": 1}),                      # CPU: the launcher runs interpreted
    (False, ("-m", "gpu"), {"skipped": 1, "deselected": 2}),          # hand-marked gpu tests skip on CPU
])
def test_triton_device_tests_are_gpu_tests_only_with_cuda(project, monkeypatch, cuda, args, outcomes):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SSB_FAST_REQUIRE_TRITON", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # no hypothesis or benchmark plugins: faster
    result = project.runpytest_inprocess(*args)
    result.assert_outcomes(**outcomes)
