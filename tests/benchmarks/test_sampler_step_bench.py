"""One sampling step (U-Net + fused cfg_step on the ping-pong buffers) at several chunk sizes, B and 2B rows.

    python -m pytest tests/benchmarks/test_sampler_step_bench.py -m benchmark --benchmark-group-by=param:batch
Save a run and compare two:
    python -m pytest tests/benchmarks -m benchmark --benchmark-autosave
    pytest-benchmark compare 0001 0002 --group-by=param:batch
"""

from __future__ import annotations

import pytest
import torch
from ssb_fast.kernels import noise_seeds

from ssb_fast.bridge import Bridge
from ssb_fast.model import UNet, UNetConfig
from ssb_fast.sampler import Sampler

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZE, NFE = 32, 20


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [8, 32, 128])
@pytest.mark.parametrize("guidance", [1.0, 1.5], ids=["B-rows", "2B-rows"])
def test_sampling_step(benchmark, device, batch, guidance):
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", image_size=SIZE)).to(device)
    sampler = Sampler(net, Bridge(), nfe=NFE, guidance=guidance, max_batch=batch, device=device)
    scans = (torch.rand(1, 1, SIZE, SIZE) * 2 - 1).to(device)
    labels = torch.arange(batch, device=device) % net.config.n_labels
    rows = torch.cat([labels, torch.full_like(labels, net.null_label)]) if sampler.halves == 2 else labels
    seeds = noise_seeds(0, ["bench"] * batch, list(range(batch)), device=device)
    runner = sampler.runner
    k = NFE // 2  # a middle step: noise on, no x0̂

    def step():
        runner.step(k)
        if device == "cuda":
            torch.cuda.synchronize()

    with runner.inference():
        runner.begin_chunk(sampler.schedule, scans.expand(batch, -1, -1, -1), rows, seeds)
        step()
        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=device, nfe=NFE, n_samples=batch, rows=int(rows.numel()), size=SIZE,
                                steps_per_s=1.0 / benchmark.stats.stats.median)
