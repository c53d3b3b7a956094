"""Sampler (fused cfg_step, ping-pong buffers, shared first step) against the eager I2SB-style loop.

Same tiny U-Net, same scans, NFE and chunk size, side by side in one run; on CUDA both run in bf16
autocast off so that only the loop differs.
    pytest tests/benchmarks/test_sampler_bench.py -m benchmark --benchmark-group-by=param:device
"""

from __future__ import annotations

import pytest
import torch
from ssb_fast.bench.sampler_baseline import eager_cfg_sampling

from ssb_fast.bridge import Bridge
from ssb_fast.model import UNet, UNetConfig
from ssb_fast.sampler import Sampler

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N_SCANS, N_SAMPLES, SIZE, NFE = 2, 16, 32, 5


def _setup(device):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", image_size=SIZE)).to(device).eval()
    scans = (torch.rand(N_SCANS, 1, SIZE, SIZE) * 2 - 1).to(device)
    return model, Bridge(), scans


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loop", ["sampler", "eager"])
def test_sampling_loop(benchmark, device, loop):
    model, bridge, scans = _setup(device)
    if loop == "sampler":
        sampler = Sampler(model, bridge, nfe=NFE, max_batch=32, amp=False, channels_last=False)
        run = lambda: sampler.sample(scans, N_SAMPLES)  # noqa: E731
    else:
        run = lambda: eager_cfg_sampling(model, bridge, scans, N_SAMPLES, NFE, 1.0, model.config.n_labels, 32)  # noqa: E731
    run()
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(device=device, masks=N_SCANS * N_SAMPLES, nfe=NFE,
                                masks_per_s=N_SCANS * N_SAMPLES / benchmark.stats.stats.median)
