"""Fused ops against the same computation as eager, unfused PyTorch, with achieved GB/s.

On CUDA the fused path is the Triton kernel. On CPU it is the op's PyTorch reference compiled by
torch.compile (Inductor fuses it into one C++ loop, keyed Philox included), against the eager ops.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from ssb_fast.kernels import cfg_step as cfg_step_module  # noqa: F401  (registers the op)
from ssb_fast.kernels import noise_seeds
from ssb_fast.kernels.cfg_step import bytes_moved, cfg_step_ref

from ssb_fast.bridge import Bridge


def cfg_step_eager(x_n: torch.Tensor, net_out: torch.Tensor, coefs: torch.Tensor, scan: torch.Tensor,
                   guidance: float, add_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling step as plain eager PyTorch, I2SB-style: ~12 kernels, stock RNG, torch.cat for the next input.

    This is the baseline the fused `cfg_step` replaces; it lives here, not in the library.
    """
    batch = x_n.shape[0]
    cond, uncond = net_out.float().chunk(2)
    guided = uncond + guidance * (cond - uncond)
    std_fwd, mu_x0, mu_xn, std = coefs.T.reshape(4, batch, 1, 1, 1)
    x0 = (x_n - std_fwd * guided).clamp(-1.0, 1.0)
    x_prev = mu_x0 * x0 + mu_xn * x_n
    if add_noise:
        x_prev = x_prev + std * torch.randn_like(x_prev)
    half = torch.cat([x_prev, scan], dim=1)
    return torch.cat([half, half], dim=0), x0


@dataclass
class CfgStepCase:
    x_n: torch.Tensor
    net_out: torch.Tensor
    coefs: torch.Tensor
    seeds: torch.Tensor
    scan: torch.Tensor
    next_input: torch.Tensor
    step: int
    guidance: float = 1.5


def make_cfg_step_case(batch: int, size: int, device: str = "cpu", out_dtype=torch.float32,
                       scan_channels: int = 1) -> CfgStepCase:
    bridge = Bridge(1000, 0.3)
    steps = bridge.step_indices(20)
    g = torch.Generator().manual_seed(0)
    x_n = (torch.rand(batch, 1, size, size, generator=g) * 2 - 1).to(device)
    net_out = torch.randn(2 * batch, 1, size, size, generator=g).to(device=device, dtype=out_dtype)
    scan = (torch.rand(batch, scan_channels, size, size, generator=g) * 2 - 1).to(device)
    coefs = bridge.sampling_coefs(steps, device=device)[10].expand(batch, 4)
    seeds = noise_seeds(0, ["bench"] * batch, list(range(batch)), device=device)
    next_input = torch.zeros(2 * batch, 1 + scan_channels, size, size, device=device)
    return CfgStepCase(x_n, net_out, coefs, seeds, scan, next_input, steps[11])


def time_call(fn: Callable[[], object], device: str, warmup: int = 3, repeat: int = 20) -> float:
    """Median seconds of `fn()` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def cfg_step_callables(case: CfgStepCase, device: str) -> dict[str, Callable[[], object]]:
    """Named zero-argument callables for each implementation of the step on `device`."""
    c = case
    calls: dict[str, Callable[[], object]] = {
        "eager": lambda: cfg_step_eager(c.x_n, c.net_out, c.coefs, c.scan, c.guidance),
    }
    if str(device).startswith("cuda"):
        calls["fused"] = lambda: torch.ops.ssb_fast.cfg_step(
            c.x_n, c.net_out, c.coefs, c.seeds, c.guidance, c.step, True, True, c.next_input, None)
    else:
        compiled = torch.compile(cfg_step_ref, fullgraph=True, dynamic=False)
        calls["fused"] = lambda: compiled(
            c.x_n, c.net_out, c.coefs, c.seeds, c.guidance, c.step, True, True, c.next_input, None)
        calls["reference_eager"] = lambda: cfg_step_ref(
            c.x_n, c.net_out, c.coefs, c.seeds, c.guidance, c.step, True, True, c.next_input, None)
    return calls


@dataclass
class KernelTiming:
    op: str
    impl: str
    device: str
    batch: int
    size: int
    seconds: float
    bytes_moved: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "gb_per_s": self.gb_per_s}


def bench_cfg_step(batch: int, size: int, device: str = "cpu", repeat: int = 20) -> list[KernelTiming]:
    """Time every implementation of the step side by side; bytes are the fused op's minimum traffic."""
    case = make_cfg_step_case(batch, size, device)
    moved = bytes_moved(batch, size * size)
    return [
        KernelTiming("cfg_step", name, str(device), batch, size, time_call(fn, device, repeat=repeat), moved)
        for name, fn in cfg_step_callables(case, device).items()
    ]
