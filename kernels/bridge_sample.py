"""`ssb_fast::bridge_sample`: the training pair (x_t, label) of the I2SB bridge in one pass.

    x_t   = mu_x0[t] x0 + mu_x1[t] x1 + std_sb[t] z,   z = randn(seed_b, p)     (I2SB eq 11)
    label = (x_t - x0) / std_fwd[t]

Eager PyTorch needs ~7 kernels and as many full-tensor round trips (randn, 3 gathers, mul-add chain,
sub, div); fused, the op reads x0 and x1 once and writes x_t and label once: 4 tensors of traffic.
The schedule is a (4, n) float32 table [mu_x0, mu_x1, std_sb, std_fwd] gathered per sample in-kernel.
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_float,
    check_int64,
    check_noise_span,
    check_same_device,
    elementwise_launch,
    tl,
    triton,
)
from .noise import keyed_randn

OP_NAME = "ssb_fast::bridge_sample"


def schedule_table(mu_x0, mu_x1, std_sb, std_fwd) -> torch.Tensor:
    """Stack the four per-timestep schedules into the (4, n) float32 table the op reads."""
    return torch.stack([mu_x0, mu_x1, std_sb, std_fwd]).to(torch.float32).contiguous()


def check_args(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, schedule: torch.Tensor,
               seeds: torch.Tensor) -> None:
    """Shape, dtype and device checks shared by the reference, the Triton launcher and the fake."""
    check_float("x0", x0)
    check_float("x1", x1)
    if x0.dtype != x1.dtype:
        raise TypeError(f"x0 and x1 must share a dtype; got {x0.dtype} and {x1.dtype}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have one shape; got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension; got a 0-d tensor")
    batch = x0.shape[0]
    check_int64("t", t, (batch,))
    check_int64("seeds", seeds, (batch,))
    check_float("schedule", schedule, (torch.float32,))
    if schedule.dim() != 2 or schedule.shape[0] != 4 or schedule.shape[1] < 1:
        raise ValueError(f"schedule must be (4, n_timesteps) [mu_x0, mu_x1, std_sb, std_fwd]; "
                         f"got {tuple(schedule.shape)}")
    check_same_device(x0=x0, x1=x1, t=t, schedule=schedule, seeds=seeds)
    check_noise_span("bridge_sample", 0, x0[0].numel() if batch else 0)


def check_t_range(t: torch.Tensor, n_timesteps: int) -> None:
    """Data check: every t in [0, n). Free for CPU tensors; a device tensor is not read (that would be a
    host sync per training step), so callers check t where they draw it, on the CPU."""
    if t.device.type != "cpu":
        return
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_timesteps):
        bad = t[(t < 0) | (t >= n_timesteps)][:4].tolist()
        raise ValueError(f"t must lie in [0, {n_timesteps}); got {bad}")


def bridge_sample_ref(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, schedule: torch.Tensor,
                      seeds: torch.Tensor, ot_ode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the same math in float32, the same keyed Philox noise."""
    check_args(x0, x1, t, schedule, seeds)
    check_t_range(t, schedule.shape[1])
    batch = x0.shape[0]
    coef = schedule[:, t].T.reshape(batch, 4, *([1] * (x0.dim() - 1)))
    mu_x0, mu_x1, std_sb, std_fwd = coef.unbind(1)
    a, b = x0.float(), x1.float()
    x_t = mu_x0 * a + mu_x1 * b
    if not ot_ode and batch:
        x_t = x_t + std_sb * keyed_randn(seeds, 0, x0[0].numel()).view(x0.shape)
    label = (x_t - a) / std_fwd
    return x_t.to(x1.dtype), label.to(x1.dtype)


if HAS_TRITON:

    @triton.jit
    def _bridge_sample_kernel(
        x0_ptr, x1_ptr,          # (B, P) contiguous inputs
        xt_ptr, label_ptr,       # (B, P) contiguous outputs
        t_ptr, seed_ptr,         # (B,) int64 timestep and Philox key per sample
        sched_ptr, n_timesteps,  # (4, n) float32 [mu_x0, mu_x1, std_sb, std_fwd]
        P,                       # pixels per sample
        ADD_NOISE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = p < P
        t = tl.load(t_ptr + b)
        mu_x0 = tl.load(sched_ptr + t)
        mu_x1 = tl.load(sched_ptr + n_timesteps + t)
        std_sb = tl.load(sched_ptr + 2 * n_timesteps + t)
        std_fwd = tl.load(sched_ptr + 3 * n_timesteps + t)
        base = b * P + p
        x0 = tl.load(x0_ptr + base, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x1_ptr + base, mask=mask, other=0.0).to(tl.float32)
        x_t = mu_x0 * x0 + mu_x1 * x1
        if ADD_NOISE:
            seed = tl.load(seed_ptr + b)
            x_t += std_sb * tl.randn(seed, p.to(tl.uint32))
        label = (x_t - x0) / std_fwd
        tl.store(xt_ptr + base, x_t.to(xt_ptr.dtype.element_ty), mask=mask)
        tl.store(label_ptr + base, label.to(label_ptr.dtype.element_ty), mask=mask)


def bridge_sample_triton(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, schedule: torch.Tensor,
                         seeds: torch.Tensor, ot_ode: bool = False, x_t_out: torch.Tensor | None = None,
                         label_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

    `x_t_out` / `label_out` (contiguous, x1's shape and dtype) may be given to write into.
    """
    check_args(x0, x1, t, schedule, seeds)
    check_t_range(t, schedule.shape[1])
    x0c, x1c = x0.contiguous(), x1.contiguous()
    outs = []
    for name, out in (("x_t_out", x_t_out), ("label_out", label_out)):
        if out is None:
            out = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
        elif out.shape != x1.shape or out.dtype != x1.dtype or not out.is_contiguous():
            raise ValueError(f"{name} must be contiguous {tuple(x1.shape)} {x1.dtype}; "
                             f"got {tuple(out.shape)} {out.dtype}")
        outs.append(out)
    batch = x0.shape[0]
    pixels = x0c[0].numel() if batch else 0
    if batch and pixels:
        block, warps = elementwise_launch(pixels)
        grid = (batch, triton.cdiv(pixels, block))
        _bridge_sample_kernel[grid](
            x0c, x1c, outs[0], outs[1], t.contiguous(), seeds.contiguous(), schedule.contiguous(),
            schedule.shape[1], pixels, ADD_NOISE=not ot_ode, BLOCK=block, num_warps=warps,
        )
    return outs[0], outs[1]


@torch.library.custom_op(OP_NAME, mutates_args=())
def bridge_sample(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, schedule: torch.Tensor,
                  seeds: torch.Tensor, ot_ode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused I2SB training pair: returns (x_t, label) in x1's dtype. CUDA runs Triton; other devices the reference."""
    return bridge_sample_ref(x0, x1, t, schedule, seeds, ot_ode)


if HAS_TRITON:

    @bridge_sample.register_kernel("cuda")
    def _bridge_sample_cuda(x0, x1, t, schedule, seeds, ot_ode=False):
        return bridge_sample_triton(x0, x1, t, schedule, seeds, ot_ode)


@bridge_sample.register_fake
def _bridge_sample_fake(x0, x1, t, schedule, seeds, ot_ode=False):
    check_args(x0, x1, t, schedule, seeds)
    return torch.empty_like(x1, memory_format=torch.contiguous_format), \
        torch.empty_like(x1, memory_format=torch.contiguous_format)


def bytes_moved(batch: int, pixels: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the op must move: read x0, x1; write x_t, label (the per-sample scalars are negligible)."""
    return 4 * batch * pixels * torch.empty((), dtype=dtype).element_size()
