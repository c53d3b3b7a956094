"""cfg_step: fused against the same step as eager unfused PyTorch, side by side in one run.

CPU: the op's reference under torch.compile ("fused") against eager ops ("eager"); CUDA: the Triton
kernel against eager. Each result carries achieved GB/s over the bytes the fused op must move.
    pytest tests/benchmarks -m benchmark --benchmark-group-by=param:case
"""

from __future__ import annotations

import pytest
import torch
from ssb_fast.bench.kernel_timing import cfg_step_callables, make_cfg_step_case
from ssb_fast.kernels.cfg_step import bytes_moved

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {"B8-64px": (8, 64), "B64-128px": (64, 128), "B256-128px": (256, 128)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_cfg_step(benchmark, device, case, impl):
    batch, size = CASES[case]
    fn = cfg_step_callables(make_cfg_step_case(batch, size, device), device)[impl]
    fn()  # compile / warm up outside the timed rounds
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    moved = bytes_moved(batch, size * size)
    benchmark.extra_info.update(device=device, bytes_moved=moved,
                                gb_per_s=moved / benchmark.stats.stats.median / 1e9)
