"""`ssb_fast.metrics.evaluate` (one exact Gram per batch, Jensen-Shannon for DDI) at N = 16, 64, 256 masks.

    python -m pytest tests/benchmarks/test_metrics_bench.py -m benchmark --benchmark-group-by=param:n_samples
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssb_fast.metrics import evaluate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCANS, EXPERTS, SIZE = 8, 4, 64


def masks(rng, scans, count):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = np.zeros((scans, count, SIZE, SIZE), dtype=np.uint8)
    for s in range(scans):
        for i in range(count):
            cy, cx, r = 32 + rng.normal(0, 3), 32 + rng.normal(0, 3), rng.uniform(4, 12)
            out[s, i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return torch.from_numpy(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_samples", [16, 64, 256])
def test_evaluate(benchmark, device, n_samples):
    rng = np.random.default_rng(0)
    samples, experts = masks(rng, SCANS, n_samples).to(device), masks(rng, SCANS, EXPERTS).to(device)
    run = lambda: evaluate(samples, experts, device=device)  # noqa: E731
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=device, n_samples=n_samples, scans=SCANS, experts=EXPERTS, size=SIZE,
                                scans_per_s=SCANS / benchmark.stats.stats.median)
