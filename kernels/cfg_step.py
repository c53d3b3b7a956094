"""`ssb_fast::cfg_step`: one sampling step of the bridge with classifier-free guidance, in one pass.

For sample b of a B-mask chunk, with the U-Net evaluated on a 2B batch (rows [0, B) conditional,
rows [B, 2B) with the null expert label) and per-sample coefficients [std_fwd[n], mu_x0, mu_xn, std]:

    out   = u + w (c - u)                        (SSB's guidance; w = 1 conditional, w = 0 unconditional)
    x0̂    = clamp(x_n - std_fwd[n] out, -1, 1)   (inverse of the I2SB label)
    x_prev = mu_x0 x0̂ + mu_xn x_n + std z,  z = randn(seed_b, step * pixels + p)   (I2SB eq 4)

x_prev is written straight into the x_t channels of both halves of the next 2B network input, so
the next call needs no torch.cat; x0̂ is written only when asked for. Every tensor is addressed by
its own 4-D strides, so channels_last buffers and sliced views work without copies.

At w = 1 or w = 0 guidance needs one half only, so the sampler evaluates B rows (conditional, or null
label) and passes that B-row output, which is `out` itself; the next input then has B rows too.
The step n that keys the noise may come from a one-element int64 device tensor (`step_index`), so that
one captured CUDA graph replays the same launch for every step.
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

OP_NAME = "ssb_fast::cfg_step"
N_COEFS = 4  # std_fwd[n], mu_x0, mu_xn, std


def check_args(x_n, net_out, coefs, seeds, step, next_input, x0_out, step_index=None) -> None:
    """Shape, dtype and device checks shared by the reference, the Triton launcher and the fake."""
    check_float("x_n", x_n)
    check_float("net_out", net_out)
    check_float("next_input", next_input)
    if x_n.dim() != 4:
        raise ValueError(f"x_n must be (B, C, H, W); got shape {tuple(x_n.shape)}")
    batch, chans, height, width = x_n.shape
    if (net_out.dim() != 4 or net_out.shape[0] not in (batch, 2 * batch)
            or tuple(net_out.shape[1:]) != (chans, height, width)):
        raise ValueError(
            f"net_out must be the 2B network output (cond half, uncond half) of shape "
            f"{(2 * batch, chans, height, width)}, or the B-row guided output {(batch, chans, height, width)}, "
            f"for x_n of shape {tuple(x_n.shape)}; got {tuple(net_out.shape)}"
        )
    rows = net_out.shape[0]
    if (next_input.dim() != 4 or next_input.shape[0] != rows or next_input.shape[1] < chans
            or tuple(next_input.shape[2:]) != (height, width)):
        raise ValueError(
            f"next_input must be a ({rows}, >= C, H, W) = ({rows}, >= {chans}, {height}, {width}) buffer (as many "
            f"rows as net_out) whose first C channels receive x_prev; got {tuple(next_input.shape)}"
        )
    if next_input.dtype != x_n.dtype:
        raise TypeError(f"next_input must share x_n's dtype {x_n.dtype}; got {next_input.dtype}")
    check_float("coefs", coefs, (torch.float32,))
    if tuple(coefs.shape) != (batch, N_COEFS):
        raise ValueError(f"coefs must be (B, 4) = ({batch}, 4) rows [std_fwd[n], mu_x0, mu_xn, std]; "
                         f"got {tuple(coefs.shape)}")
    check_int64("seeds", seeds, (batch,))
    if x0_out is not None:
        check_float("x0_out", x0_out)
        if tuple(x0_out.shape) != tuple(x_n.shape):
            raise ValueError(f"x0_out must have x_n's shape {tuple(x_n.shape)}; got {tuple(x0_out.shape)}")
    if step_index is not None:
        check_int64("step_index", step_index, (1,))
    check_same_device(x_n=x_n, net_out=net_out, coefs=coefs, seeds=seeds, next_input=next_input, x0_out=x0_out,
                      step_index=step_index)
    pixels = chans * height * width
    check_noise_span("cfg_step", int(step) * pixels, pixels)


def cfg_step_ref(x_n: torch.Tensor, net_out: torch.Tensor, coefs: torch.Tensor, seeds: torch.Tensor,
                 guidance: float, step: int, add_noise: bool, clamp: bool, next_input: torch.Tensor,
                 x0_out: torch.Tensor | None = None, step_index: torch.Tensor | None = None) -> None:
    """PyTorch reference: the same math in float32 and the same keyed Philox noise."""
    check_args(x_n, net_out, coefs, seeds, step, next_input, x0_out, step_index)
    batch, chans = x_n.shape[:2]
    if batch == 0:
        return
    out = net_out.float()
    if out.shape[0] == 2 * batch:
        cond, uncond = out[:batch], out[batch:]
        guided = uncond + guidance * (cond - uncond)
    else:  # w = 1 or w = 0: the B rows evaluated are the guided output
        guided = out
    std_fwd, mu_x0, mu_xn, std = coefs.view(batch, N_COEFS, 1, 1, 1).unbind(1)
    xn = x_n.float()
    x0 = xn - std_fwd * guided
    if clamp:
        x0 = x0.clamp(-1.0, 1.0)
    x_prev = mu_x0 * x0 + mu_xn * xn
    if add_noise:
        pixels = x_n[0].numel()
        n = int(step_index[0]) if step_index is not None else int(step)
        x_prev = x_prev + std * keyed_randn(seeds, n * pixels, pixels).view(x_n.shape)
    next_input[:batch, :chans].copy_(x_prev)
    if next_input.shape[0] == 2 * batch:
        next_input[batch:, :chans].copy_(x_prev)
    if x0_out is not None:
        x0_out.copy_(x0)


if HAS_TRITON:

    @triton.jit
    def _cfg_step_kernel(
        xn_ptr, xn_sb, xn_sc, xn_sh, xn_sw,      # x_n (B, C, H, W), any strides
        out_ptr, out_sb, out_sc, out_sh, out_sw,  # net output (2B or B, C, H, W): cond rows then uncond rows
        nxt_ptr, nxt_sb, nxt_sc, nxt_sh, nxt_sw,  # next input buffer (as many rows); channels [0, C) get x_prev
        x0_ptr, x0_sb, x0_sc, x0_sh, x0_sw,       # optional x0̂ output (B, C, H, W)
        coef_ptr, coef_sb, coef_sk,               # (B, 4) [std_fwd[n], mu_x0, mu_xn, std], stride 0 allowed
        seed_ptr,                                 # (B,) int64 Philox keys
        step_ptr,                                 # (1,) int64 step n, read when STEP_FROM_PTR
        guidance, step,                           # w; the step n that keys the noise (offset n * pixels)
        B, C, H, W,
        TWO_HALVES: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
        ADD_NOISE: tl.constexpr, CLAMP: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        hw = H * W
        mask = p < C * hw
        c = p // hw
        h = (p % hw) // W
        w = p % W

        std_fwd = tl.load(coef_ptr + b * coef_sb)
        mu_x0 = tl.load(coef_ptr + b * coef_sb + coef_sk)
        mu_xn = tl.load(coef_ptr + b * coef_sb + 2 * coef_sk)

        x_n = tl.load(xn_ptr + b * xn_sb + c * xn_sc + h * xn_sh + w * xn_sw, mask=mask, other=0.0).to(tl.float32)
        out_off = c * out_sc + h * out_sh + w * out_sw
        guided = tl.load(out_ptr + b * out_sb + out_off, mask=mask, other=0.0).to(tl.float32)
        if TWO_HALVES:
            uncond = tl.load(out_ptr + (b + B) * out_sb + out_off, mask=mask, other=0.0).to(tl.float32)
            guided = uncond + guidance * (guided - uncond)

        x0 = x_n - std_fwd * guided
        if CLAMP:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        x_prev = mu_x0 * x0 + mu_xn * x_n
        if ADD_NOISE:
            std = tl.load(coef_ptr + b * coef_sb + 3 * coef_sk)
            seed = tl.load(seed_ptr + b)
            if STEP_FROM_PTR:
                n = tl.load(step_ptr)
            else:
                n = step.to(tl.int64)
            x_prev += std * tl.randn(seed, (n * C * hw + p).to(tl.uint32))

        nxt_off = c * nxt_sc + h * nxt_sh + w * nxt_sw
        x_prev = x_prev.to(nxt_ptr.dtype.element_ty)
        tl.store(nxt_ptr + b * nxt_sb + nxt_off, x_prev, mask=mask)
        if TWO_HALVES:
            tl.store(nxt_ptr + (b + B) * nxt_sb + nxt_off, x_prev, mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + b * x0_sb + c * x0_sc + h * x0_sh + w * x0_sw,
                     x0.to(x0_ptr.dtype.element_ty), mask=mask)


def cfg_step_triton(x_n: torch.Tensor, net_out: torch.Tensor, coefs: torch.Tensor, seeds: torch.Tensor,
                    guidance: float, step: int, add_noise: bool, clamp: bool, next_input: torch.Tensor,
                    x0_out: torch.Tensor | None = None, step_index: torch.Tensor | None = None) -> None:
    """Triton launcher. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    check_args(x_n, net_out, coefs, seeds, step, next_input, x0_out, step_index)
    batch, chans, height, width = x_n.shape
    pixels = chans * height * width
    if batch == 0 or pixels == 0:
        return
    block, warps = elementwise_launch(pixels)
    x0_arg = x0_out if x0_out is not None else x_n  # never written when WRITE_X0 is off
    step_arg = step_index if step_index is not None else seeds  # never read when STEP_FROM_PTR is off
    grid = (batch, triton.cdiv(pixels, block))
    _cfg_step_kernel[grid](
        x_n, *x_n.stride(),
        net_out, *net_out.stride(),
        next_input, *next_input.stride(),
        x0_arg, *x0_arg.stride(),
        coefs, *coefs.stride(),
        seeds.contiguous(),
        step_arg,
        float(guidance), int(step),
        batch, chans, height, width,
        TWO_HALVES=net_out.shape[0] == 2 * batch, STEP_FROM_PTR=step_index is not None,
        ADD_NOISE=bool(add_noise), CLAMP=bool(clamp), WRITE_X0=x0_out is not None,
        BLOCK=block, num_warps=warps,
    )


@torch.library.custom_op(OP_NAME, mutates_args=("next_input", "x0_out"))
def cfg_step(x_n: torch.Tensor, net_out: torch.Tensor, coefs: torch.Tensor, seeds: torch.Tensor,
             guidance: float, step: int, add_noise: bool, clamp: bool, next_input: torch.Tensor,
             x0_out: torch.Tensor | None = None, step_index: torch.Tensor | None = None) -> None:
    """Fused CFG + x0̂ + posterior + keyed noise; writes x_prev into every half of `next_input`.

    net_out has 2B rows (cond, uncond: out = u + w (c - u)) or B rows (the guided output at w = 1 or 0).
    step_index, a (1,) int64 tensor on the device, overrides `step` as the noise key's step; `step` must
    then bound it, for the 32-bit noise-span check. CUDA tensors run the Triton kernel; every other
    device runs the PyTorch reference.
    """
    cfg_step_ref(x_n, net_out, coefs, seeds, guidance, step, add_noise, clamp, next_input, x0_out, step_index)


if HAS_TRITON:

    @cfg_step.register_kernel("cuda")
    def _cfg_step_cuda(x_n, net_out, coefs, seeds, guidance, step, add_noise, clamp, next_input, x0_out=None,
                       step_index=None):
        cfg_step_triton(x_n, net_out, coefs, seeds, guidance, step, add_noise, clamp, next_input, x0_out,
                        step_index)


@cfg_step.register_fake
def _cfg_step_fake(x_n, net_out, coefs, seeds, guidance, step, add_noise, clamp, next_input, x0_out=None,
                   step_index=None):
    check_args(x_n, net_out, coefs, seeds, step, next_input, x0_out, step_index)


def bytes_moved(batch: int, pixels: int, x_dtype: torch.dtype = torch.float32,
                out_dtype: torch.dtype = torch.float32, write_x0: bool = False, halves: int = 2) -> int:
    """Bytes the op must move: read x_n and the output's `halves` x B rows, write x_prev into each half
    of the next input (+ x0̂ when asked)."""
    xs = torch.empty((), dtype=x_dtype).element_size()
    os_ = torch.empty((), dtype=out_dtype).element_size()
    return batch * pixels * (xs + halves * os_ + halves * xs + (xs if write_x0 else 0))
