"""The sampling loop: Sampler (fused cfg_step, ping-pong buffers, shared first step, B rows at w = 1)
against the eager I2SB-style loop, and the Sampler's B-row guidance fast path against its 2B path.

Same tiny U-Net, same scans, NFE and chunk size, side by side in one run; float32 on every device so
that only the loop differs.
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
N_SCANS, N_SAMPLES, SIZE, NFE = 1, 64, 64, 20


def _setup(device):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", image_size=SIZE)).to(device).eval()
    scans = (torch.rand(N_SCANS, 1, SIZE, SIZE) * 2 - 1).to(device)
    return model, Bridge(), scans


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loop", ["sampler-B-rows", "sampler-2B-rows", "eager-2B-rows"])
def test_sampling_loop_at_guidance_1(benchmark, device, loop):
    model, bridge, scans = _setup(device)
    if loop.startswith("sampler"):
        sampler = Sampler(model, bridge, nfe=NFE, guidance=1.0, max_batch=N_SAMPLES, precision="float32",
                          channels_last=False, guidance_fast_path=loop == "sampler-B-rows")
        run = lambda: sampler.sample(scans, N_SAMPLES)  # noqa: E731
    else:
        run = lambda: eager_cfg_sampling(model, bridge, scans, N_SAMPLES, NFE, 1.0,  # noqa: E731
                                         model.config.n_labels, N_SAMPLES)
    run()
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(device=device, n_samples=N_SCANS * N_SAMPLES, nfe=NFE, size=SIZE,
                                masks_per_s=N_SCANS * N_SAMPLES / benchmark.stats.stats.median)
