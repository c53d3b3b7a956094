"""`ssb_fast::pairwise_jsd`: Jensen–Shannon divergences between all rows of a batch of distributions.

For scan b with R distributions over L outcomes (rows P_i, each non-negative and summing to 1):

    JS(P_i, P_k) = 1/2 sum_l [ p_l log2(2 p_l / (p_l + q_l)) + q_l log2(2 q_l / (p_l + q_l)) ]

with 0 log 0 = 0. Base 2 bounds every value in [0, 1]. This is the form DDI needs: R rows of a
Dice matrix normalised to distributions, hundreds of them per scan. Each element's term is
symmetric in (p, q) bit for bit, the diagonal is exactly 0, and only tiles on or above the
diagonal are computed (each stored twice). Output is float32.
"""

from __future__ import annotations

import math

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, check_float, check_same_device, interpreting, tl, triton

OP_NAME = "ssb_fast::pairwise_jsd"


def check_args(dists: torch.Tensor) -> None:
    """Shape and dtype checks shared by the reference, the Triton launcher and the fake.

    Rows are used as given (not renormalised, not scanned): callers pass distributions.
    """
    check_float("dists", dists, FLOAT_DTYPES)
    if dists.dim() != 3:
        raise ValueError(f"dists must be (B, R, L): B scans of R distributions over L outcomes; "
                         f"got shape {tuple(dists.shape)}")
    check_same_device(dists=dists)


def pairwise_jsd_ref(dists: torch.Tensor) -> torch.Tensor:
    """PyTorch reference in float64, rounded once to float32.

    Uses JS(P, Q) = (sum xlogx(p) + sum xlogx(q)) / 2 - sum xlogx((p + q) / 2), in nats then / ln 2:
    in float64 the cancellation costs ~1e-15, and only the mixture term needs the (R, R, L) pairs
    (processed in row blocks of at most 2**24 terms).
    """
    check_args(dists)
    batch, rows, outcomes = dists.shape
    out = torch.zeros(batch, rows, rows, dtype=torch.float32, device=dists.device)
    if batch == 0 or rows == 0 or outcomes == 0:
        return out
    x = dists.to(torch.float64)
    neg_entropy = torch.special.xlogy(x, x).sum(-1)  # (B, R); xlogy(0, 0) = 0
    step = max(1, 2**24 // max(1, batch * rows * outcomes))
    for start in range(0, rows, step):
        mix = 0.5 * (x[:, start:start + step, None, :] + x[:, None, :, :])
        mixed = torch.special.xlogy(mix, mix).sum(-1)  # (B, step, R)
        js = 0.5 * (neg_entropy[:, start:start + step, None] + neg_entropy[:, None, :]) - mixed
        out[:, start:start + step] = (js / math.log(2.0)).clamp(0.0, 1.0).to(torch.float32)
    out.diagonal(dim1=1, dim2=2).zero_()  # JS(P, P) = 0 exactly, not a rounding residue
    return out


if HAS_TRITON:

    @triton.jit
    def _pairwise_jsd_kernel(
        x_ptr, x_sb, x_sr, x_sl,          # distributions (B, R, L), any strides
        out_ptr, out_sb, out_si, out_sj,  # (B, R, R) float32
        R, L,
        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pid_i = tl.program_id(1)
        pid_j = tl.program_id(2)
        if pid_j < pid_i:  # symmetric: compute the upper tiles, store each twice
            return
        rows_i = pid_i * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_j = pid_j * BLOCK_R + tl.arange(0, BLOCK_R)
        in_i = rows_i < R
        in_j = rows_j < R
        base = x_ptr + b * x_sb
        off_i = rows_i.to(tl.int64)[:, None] * x_sr
        off_j = rows_j.to(tl.int64)[:, None] * x_sr
        cols = tl.arange(0, BLOCK_L)

        acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            outcome = l0 + cols
            in_l = (outcome < L)[None, :]
            l_off = outcome.to(tl.int64)[None, :] * x_sl
            p = tl.load(base + off_i + l_off, mask=in_i[:, None] & in_l, other=0.0).to(tl.float32)
            q = tl.load(base + off_j + l_off, mask=in_j[:, None] & in_l, other=0.0).to(tl.float32)
            p3 = p[:, None, :]
            q3 = q[None, :, :]
            m = p3 + q3
            # 0 log 0 = 0: a zero p (or q) contributes nothing; a positive one has m > 0. The
            # placeholders keep log2 away from 0 in the discarded branch (no inf or NaN computed).
            m_safe = tl.where(m > 0, m, 1.0)
            tp = tl.where(p3 > 0, p3 * tl.log2(2.0 * tl.where(p3 > 0, p3, 1.0) / m_safe), 0.0)
            tq = tl.where(q3 > 0, q3 * tl.log2(2.0 * tl.where(q3 > 0, q3, 1.0) / m_safe), 0.0)
            acc += tl.sum(tp + tq, axis=2)
        js = tl.minimum(tl.maximum(0.5 * acc, 0.0), 1.0)

        out_base = out_ptr + b * out_sb
        r = rows_i.to(tl.int64)[:, None]
        c = rows_j.to(tl.int64)[None, :]
        ok = in_i[:, None] & in_j[None, :]
        tl.store(out_base + r * out_si + c * out_sj, js, mask=ok)
        tl.store(out_base + c * out_si + r * out_sj, js, mask=ok)  # the mirrored tile (j, i)


def launch_config(rows: int, outcomes: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_L, num_warps) for a (BLOCK_R, BLOCK_R, BLOCK_L) tile of log terms per step.

    On a GPU 16x16x32 terms over 4 warps is 64 per thread, two log2 each; the interpreter runs
    numpy on whole tiles, so there wider tiles (up to 2**18 terms) cut its per-step overhead.
    """
    if interpreting():
        block_r = min(32, triton.next_power_of_2(max(rows, 1)))
        block_l = min(256, triton.next_power_of_2(max(outcomes, 1)))
    else:
        block_r = min(16, triton.next_power_of_2(max(rows, 1)))
        block_l = min(32, triton.next_power_of_2(max(outcomes, 1)))
    return block_r, block_l, 4


def pairwise_jsd_triton(dists: torch.Tensor) -> torch.Tensor:
    """Triton launcher. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    check_args(dists)
    batch, rows, outcomes = dists.shape
    out = torch.empty(batch, rows, rows, dtype=torch.float32, device=dists.device)
    if batch == 0 or rows == 0:
        return out
    x = dists if (dists.stride(2) == 1 or outcomes <= 1) else dists.contiguous()
    block_r, block_l, warps = launch_config(rows, outcomes)
    grid = (batch, triton.cdiv(rows, block_r), triton.cdiv(rows, block_r))
    _pairwise_jsd_kernel[grid](
        x, *x.stride(), out, *out.stride(), rows, outcomes,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps,
    )
    return out


@torch.library.custom_op(OP_NAME, mutates_args=())
def pairwise_jsd(dists: torch.Tensor) -> torch.Tensor:
    """(B, R, L) distributions -> (B, R, R) float32 Jensen–Shannon divergences, base 2, 0 log 0 = 0.

    CUDA tensors run the Triton kernel; every other device runs the PyTorch reference.
    """
    return pairwise_jsd_ref(dists)


if HAS_TRITON:

    @pairwise_jsd.register_kernel("cuda")
    def _pairwise_jsd_cuda(dists):
        return pairwise_jsd_triton(dists)


@pairwise_jsd.register_fake
def _pairwise_jsd_fake(dists):
    check_args(dists)
    batch, rows, _ = dists.shape
    return dists.new_empty((batch, rows, rows), dtype=torch.float32)


def bytes_moved(batch: int, rows: int, outcomes: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the op must move: read every distribution once, write the (B, R, R) float32 result."""
    return batch * rows * outcomes * torch.empty((), dtype=dtype).element_size() + batch * rows * rows * 4


def flops(batch: int, rows: int, outcomes: int) -> int:
    """About 12 flops per (i, k, l) term, two log2 included, over the dense R x R pairs."""
    return 12 * batch * rows * rows * outcomes
