"""The sampler on a GPU: no host sync inside the step loop, CUDA graphs, bf16 weights. Needs CUDA."""

from __future__ import annotations

import pytest
import torch

from ssb_fast.bridge import Bridge
from ssb_fast.model import UNet, UNetConfig
from ssb_fast.sampler import Sampler

pytestmark = pytest.mark.gpu
BRIDGE = Bridge(1000, 0.3)


def tiny_unet(size=64):
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny", image_size=size)).cuda()


def scans(n, size=64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("guidance,cuda_graphs", [(1.0, False), (1.5, False), (1.5, True)])
def test_no_host_sync_inside_the_step_loop(guidance, cuda_graphs):
    """After warm-up, a whole sample() call runs under sync debug mode "error": the only syncs are the
    chunk boundaries the sampler marks as allowed (the masks' copy to the host)."""
    sampler = Sampler(tiny_unet(), BRIDGE, nfe=6, guidance=guidance, max_batch=8, cuda_graphs=cuda_graphs)
    sampler.sample(scans(2), 8)  # warm-up: compile, cudnn autotuning, capture
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = sampler.sample(scans(2), 8)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert result.masks.shape == (2, 8, 64, 64) and result.stats["warmup_seconds"] == 0


def test_weights_are_bf16_channels_last_and_the_callers_model_is_untouched():
    net = tiny_unet()
    sampler = Sampler(net, BRIDGE, nfe=3)
    assert sampler.runner.precision == "bfloat16"
    assert next(sampler.runner.module.parameters()).dtype == torch.bfloat16
    assert next(net.parameters()).dtype == torch.float32
    result = sampler.sample(scans(1), 4)
    assert result.masks.shape == (1, 4, 64, 64)


def test_cuda_graphs_give_the_eager_steps_masks():
    """The captured step reads the time input, coefficients and noise step from device tensors; its masks
    match the uncaptured run's except for bf16 rounding at a few boundary pixels."""
    net = tiny_unet()
    plain = Sampler(net, BRIDGE, nfe=8, guidance=1.5, max_batch=16).sample(scans(2), 16, return_soft=True)
    graphed = Sampler(net, BRIDGE, nfe=8, guidance=1.5, max_batch=16, cuda_graphs=True).sample(
        scans(2), 16, return_soft=True)
    flipped = (plain.masks != graphed.masks).float().mean().item()
    assert flipped < 1e-3, f"{flipped:.2%} of the pixels differ"
    torch.testing.assert_close(plain.soft, graphed.soft, atol=0.05, rtol=0)


def test_float32_on_cuda_is_chunk_independent():
    net = tiny_unet()
    a = Sampler(net, BRIDGE, nfe=5, precision="float32", max_batch=5).sample(scans(2), 12, return_soft=True)
    b = Sampler(net, BRIDGE, nfe=5, precision="float32", max_batch=24).sample(scans(2), 12, return_soft=True)
    torch.testing.assert_close(a.soft, b.soft, atol=1e-3, rtol=0)


def test_gpu_check_steps_write_their_report(tmp_path):
    """The sync-debug and flip-fraction steps of `bench gpu-check` (the others are bench and test runs
    of their own, covered where they live)."""
    from ssb_fast.bench.gpu_check import chunking_flip_fraction, run_gpu_check

    flips = chunking_flip_fraction(torch.device("cuda"), image_size=32, n_samples=16, nfe=3, small=5, large=16)
    for precision in ("bfloat16", "float32"):
        assert 0 <= flips[precision]["pixel_fraction"] <= 1
    report, code = run_gpu_check(tmp_path, budget_s=600, only=("sync_check",))
    assert code == 0 and report["steps"]["sync_check"]["ok"], report["steps"]["sync_check"]
    assert (tmp_path / "gpu-check.json").exists() and (tmp_path / "gpu-check.md").exists()
