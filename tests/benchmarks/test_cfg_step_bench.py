"""cfg_step: the Triton kernel, its reference under torch.compile and the eager unfused step, side by side.

The cases come from `ssb_fast.bench.kernels` (bf16 2B network output, channels_last [x_t | scan] buffer),
the same ones `ssb-fast bench kernels` times. The Triton kernel is timed on CUDA only (on CPU it runs
only in the interpreter). Each result carries achieved GB/s over the bytes the fused op must move.
    pytest tests/benchmarks -m benchmark --benchmark-group-by=param:case
"""

from __future__ import annotations

import pytest
import torch
from ssb_fast.bench.kernels import IMPLS, KernelSizes, cfg_step_bench

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {"B8-64px": (8, 64), "B64-128px": (64, 128), "B256-128px": (256, 128)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_cfg_step(benchmark, device, case, impl):
    batch, size = CASES[case]
    bench = cfg_step_bench(KernelSizes(batch=batch, size=size), torch.device(device))
    if impl not in bench.calls:
        pytest.skip(bench.skipped[impl])
    fn = bench.calls[impl]
    fn()  # compile / warm up outside the timed rounds
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(device=device, bytes_moved=bench.bytes_moved,
                                gb_per_s=bench.bytes_moved / benchmark.stats.stats.median / 1e9)
