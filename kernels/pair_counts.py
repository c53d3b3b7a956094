"""`ssb_fast::pair_counts`: the Gram matrix of intersections of binary masks, exactly.

For scan b with K binary masks of P pixels (rows x_i in {0,1}^P):

    G[b, i, j] = |x_i ∩ x_j| = sum_p x_i[p] x_j[p]        (G[b, i, i] = |x_i|, the mask size)

Every pair metric of a set of masks derives from G: |a ∪ b| = |a| + |b| - |a ∩ b|, IoU, Dice, and so
GED, D_max, D_a, HM-IoU and DDI. The kernel computes G with `tl.dot` on 0/1 fp16 tiles (exact
operands) and fp32 accumulation. An fp32 sum of integers is exact while it stays at most 2**24, so
each fp32 accumulator covers at most FLUSH_PIXELS = 2**24 pixels before it is flushed into an int64
total: the counts are exact for any P. The result is int64.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, check_same_device, interpreting, tl, triton

OP_NAME = "ssb_fast::pair_counts"
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)
# The largest run of 0/1 products an fp32 accumulator sums exactly (integers up to 2**24).
FLUSH_PIXELS = 2**24


def check_args(masks: torch.Tensor) -> None:
    """Shape and dtype checks shared by the reference, the Triton launcher and the fake.

    Values are not scanned here (that would cost a pass and a host sync): callers pass 0/1 masks;
    `ssb_fast.metrics` validates them once before calling.
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dtype not in MASK_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in MASK_DTYPES)
        raise TypeError(f"masks must have dtype {allowed} (values 0 or 1); "
                        f"got {str(masks.dtype).removeprefix('torch.')}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, K, P): B scans of K masks of P pixels; "
                         f"got shape {tuple(masks.shape)}")
    check_same_device(masks=masks)


def pair_counts_ref(masks: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: float32 batched matmuls over runs of at most 2**24 pixels, summed in int64.

    Each run's products are 0/1 and its sums integers below 2**24, so every fp32 rounding step is
    exact whatever order the BLAS adds in; the runs are added as int64.
    """
    check_args(masks)
    batch, k, pixels = masks.shape
    out = torch.zeros(batch, k, k, dtype=torch.int64, device=masks.device)
    if batch == 0 or k == 0:
        return out
    # Bound the float32 copy to ~256 MiB; runs never exceed the exact span.
    span = max(1024, min(FLUSH_PIXELS, 2**26 // (batch * k)))
    for start in range(0, pixels, span):
        chunk = masks[..., start:start + span].to(torch.float32)
        out += torch.bmm(chunk, chunk.transpose(1, 2)).to(torch.int64)
    return out


if HAS_TRITON:

    @triton.jit
    def _pair_counts_kernel(
        x_ptr, x_sb, x_sk, x_sp,        # masks (B, K, P), 0/1 in any of MASK_DTYPES (bool viewed as uint8)
        out_ptr, out_sb, out_si, out_sj,  # (B, K, K) int64 intersections
        K, P,
        FLUSH: tl.constexpr,            # pixels summed in fp32 before flushing to int64 (<= 2**24)
        BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pid_i = tl.program_id(1)
        pid_j = tl.program_id(2)
        # G is symmetric: only tiles on or above the diagonal are computed, each stored twice.
        if pid_j < pid_i:
            return
        rows_i = pid_i * BLOCK_K + tl.arange(0, BLOCK_K)
        rows_j = pid_j * BLOCK_K + tl.arange(0, BLOCK_K)
        in_i = rows_i < K
        in_j = rows_j < K
        base = x_ptr + b * x_sb
        off_i = rows_i.to(tl.int64)[:, None] * x_sk
        off_j = rows_j.to(tl.int64)[:, None] * x_sk
        cols = tl.arange(0, BLOCK_P)

        total = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.int64)
        for start in range(0, P, FLUSH):
            acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
            stop = tl.minimum(start + FLUSH, P)
            for p0 in range(start, stop, BLOCK_P):
                p = p0 + cols
                in_p = (p < P)[None, :]
                p_off = p.to(tl.int64)[None, :] * x_sp
                a = tl.load(base + off_i + p_off, mask=in_i[:, None] & in_p, other=0).to(tl.float16)
                c = tl.load(base + off_j + p_off, mask=in_j[:, None] & in_p, other=0).to(tl.float16)
                # Triton folds `acc += dot` into the dot's accumulator operand (tl.dot(a, b, acc)), so the
                # running sum is made by the MMA itself, not by a separate fp32 add. Still exact: every addend
                # (a 0/1 product, or acc) is an integer and every partial sum is at most FLUSH <= 2**24, so an
                # adder at least fp32-wide that aligns to its largest addend and truncates (as tensor cores do)
                # never drops a unit bit. FLUSH, not BLOCK_P, is what bounds the sum.
                acc += tl.dot(a, tl.trans(c))
            total += acc.to(tl.int64)

        out_base = out_ptr + b * out_sb
        r = rows_i.to(tl.int64)[:, None]
        c2 = rows_j.to(tl.int64)[None, :]
        ok = in_i[:, None] & in_j[None, :]
        tl.store(out_base + r * out_si + c2 * out_sj, total, mask=ok)
        tl.store(out_base + c2 * out_si + r * out_sj, total, mask=ok)  # the mirrored tile (j, i)


def launch_config(k: int, pixels: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_P, num_warps). tl.dot needs at least 16 in every dimension.

    Under the interpreter wide pixel blocks amortise its per-instruction cost (numpy does the dot);
    on a GPU 64x64 output tiles over 128-pixel chunks keep two 8 KiB uint8 tiles per step in flight.
    """
    block_k = min(64, max(16, triton.next_power_of_2(max(k, 1))))
    if interpreting():
        return block_k, min(4096, max(16, triton.next_power_of_2(max(pixels, 1)))), 4
    return block_k, 128, 4


def pair_counts_triton(masks: torch.Tensor, block_p: int | None = None,
                       flush_pixels: int = FLUSH_PIXELS) -> torch.Tensor:
    """Triton launcher. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

    `block_p` and `flush_pixels` exist for tests: a small flush exercises the int64 flush path on
    small inputs; `flush_pixels` must be a multiple of the pixel block and at most 2**24.
    """
    check_args(masks)
    batch, k, pixels = masks.shape
    out = torch.empty(batch, k, k, dtype=torch.int64, device=masks.device)
    if batch == 0 or k == 0:
        return out
    block_k, default_block_p, warps = launch_config(k, pixels)
    block_p = int(block_p or default_block_p)
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two >= 16; got {block_p}")
    if not (0 < flush_pixels <= FLUSH_PIXELS) or flush_pixels % block_p:
        raise ValueError(f"flush_pixels must be a multiple of block_p={block_p} in (0, 2**24]; "
                         f"got {flush_pixels}")
    x = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    if x.stride(2) != 1 and pixels > 1:
        x = x.contiguous()  # one copy, so that pixel loads are unit-stride
    grid = (batch, triton.cdiv(k, block_k), triton.cdiv(k, block_k))
    _pair_counts_kernel[grid](
        x, *x.stride(), out, *out.stride(), k, pixels,
        FLUSH=int(flush_pixels), BLOCK_K=block_k, BLOCK_P=block_p, num_warps=warps,
    )
    return out


@torch.library.custom_op(OP_NAME, mutates_args=())
def pair_counts(masks: torch.Tensor) -> torch.Tensor:
    """(B, K, P) binary masks -> (B, K, K) int64 intersection counts, exact; sizes on the diagonal.

    CUDA tensors run the Triton kernel; every other device runs the PyTorch reference.
    """
    return pair_counts_ref(masks)


if HAS_TRITON:

    @pair_counts.register_kernel("cuda")
    def _pair_counts_cuda(masks):
        return pair_counts_triton(masks)


@pair_counts.register_fake
def _pair_counts_fake(masks):
    check_args(masks)
    batch, k, _ = masks.shape
    return masks.new_empty((batch, k, k), dtype=torch.int64)


def bytes_moved(batch: int, k: int, pixels: int, dtype: torch.dtype = torch.uint8) -> int:
    """Bytes the op must move: read every mask once, write the (B, K, K) int64 Gram."""
    return batch * k * pixels * torch.empty((), dtype=dtype).element_size() + batch * k * k * 8


def flops(batch: int, k: int, pixels: int) -> int:
    """Multiply-adds of the Gram counted as a dense (K x P)(P x K) matmul per scan, 2 flops each."""
    return 2 * batch * k * k * pixels
