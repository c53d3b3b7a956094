"""One training step (SSB loss forward + backward + AdamW) of the `tiny` and `small` presets at 64², batch 16,
in the default and the channels_last memory format, with and without augmentation.

    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_train_step_bench.py -m benchmark \
        --benchmark-group-by=param:preset --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch
from ssb_fast.train.augment import augment, draw_augment
from ssb_fast.train.loss import draw, ssb_loss

from ssb_fast.bridge import Bridge
from ssb_fast.model import UNet, UNetConfig

SIZE, BATCH = 64, 16


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augment"])
def test_training_step(benchmark, preset, memory_format, augmented):
    torch.manual_seed(0)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    net = UNet(UNetConfig.preset(preset, image_size=SIZE)).to(memory_format=fmt)
    bridge = Bridge()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = (torch.rand(BATCH, 1, SIZE, SIZE) * 2 - 1).contiguous(memory_format=fmt)
    masks = (torch.rand(BATCH, 4, SIZE, SIZE) > 0.9).to(torch.uint8)
    present = torch.ones(BATCH, 4, dtype=torch.bool)
    step_no = [0]

    def step():
        gen = torch.Generator().manual_seed(step_no[0])
        step_no[0] += 1
        sample = draw(present, net.null_label, bridge.n_timesteps, 0.1, gen)
        x, m = (augment(images, masks, draw_augment(BATCH, (SIZE, SIZE), gen)) if augmented else (images, masks))
        parts = ssb_loss(net, bridge, x.contiguous(memory_format=fmt), m, sample)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(preset=preset, batch=BATCH, size=SIZE, memory_format=memory_format,
                                augmented=augmented, threads=torch.get_num_threads(),
                                steps_per_s=1.0 / benchmark.stats.stats.median)
