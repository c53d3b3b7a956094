"""Keyed Gaussian noise: Philox-4x32-10, the generator behind Triton's `tl.randn`.

Noise is keyed, not streamed. The value added to pixel p of mask i of scan c at step k is

    randn(seed = blake2b(run seed, scan id, mask index), offset = k * pixels + p)

so a mask's noise does not depend on which batch, chunk or GPU computed it. The Triton kernels call
`tl.randn(seed, offset)` with a uint32 offset (32-bit Philox, counter (offset, 0, 0, 0), key
(seed_lo, seed_hi)). This file holds the bit-exact PyTorch twin of that integer stream, the same
Box-Muller float transform (agrees to ~1e-6: libm vs. device sin/cos/log), and the seed hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ._common import HAS_TRITON, tl, triton

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
# Box-Muller constants exactly as tl.randn uses them.
_INT32_TO_UNIFORM = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_SEED_MASK = (1 << 63) - 1


def hash_seed(*parts) -> int:
    """A stable 63-bit seed from any parts: blake2b over their str() joined by \\x1f.

    Never Python's `hash()`, which is salted per process. The one seed hash of the project: the noise
    keys below and every random choice of training (ssb_fast.train) derive from it.
    """
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & _SEED_MASK


def noise_seed(run_seed: int, scan_id: str, mask_index: int) -> int:
    """Stable 63-bit Philox key for one mask: `hash_seed(run seed, scan id, mask index)`."""
    return hash_seed(int(run_seed), scan_id, int(mask_index))


def noise_seeds(
    run_seed: int, scan_ids: Sequence[str], mask_indices: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 (B,) keys for masks (scan_ids[b], mask_indices[b]) under one run seed."""
    if len(scan_ids) != len(mask_indices):
        raise ValueError(f"scan_ids has {len(scan_ids)} entries but mask_indices has {len(mask_indices)}")
    seeds = [noise_seed(run_seed, s, i) for s, i in zip(scan_ids, mask_indices)]
    return torch.tensor(seeds, dtype=torch.int64, device=device)


def _mulhilo32_limbs(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of const * x for const, x < 2**32, with no int64 overflow.

    Splits x into 16-bit limbs so every partial product stays below 2**34. Portable but ~3x the ops
    of `_mulhilo32_wrap`; used only where wrapping int64 multiplication fails the import-time check.
    """
    ch, cl = const >> 16, const & _M16
    xh, xl = x >> 16, x & _M16
    mid = ch * xl + cl * xh
    low = cl * xl + ((mid & _M16) << 16)
    hi = ch * xh + (mid >> 16) + (low >> 32)
    return hi & _M32, low & _M32


def _mulhilo32_wrap(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) halves from one int64 product, relying on two's-complement wrap-around (checked at import)."""
    prod = x * const
    return (prod >> 32) & _M32, prod & _M32


def _philox_rounds(mulhilo, k0, k1, c0, n_rounds):
    # c1..c3 start as zero scalars and the keys stay per-seed: broadcasting keeps them small until
    # they mix with the counter, which saves most of the first two rounds' work.
    zero = torch.zeros((), dtype=torch.int64, device=c0.device)
    c1 = c2 = c3 = zero
    for _ in range(n_rounds):
        hi_b, lo_b = mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    return tuple(c.expand(shape) for c in (c0, c1, c2, c3))


def philox4x32(
    seed: torch.Tensor, c0: torch.Tensor, n_rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 on counter (c0, 0, 0, 0) and key (seed_lo, seed_hi), as `tl.randint4x` with uint32 offsets.

    `seed` (int64) broadcasts against `c0` (int64 holding values in [0, 2**32)). Returns four int64
    tensors holding the uint32 outputs.
    """
    seed = seed.to(torch.int64)
    c0 = c0.to(torch.int64) & _M32
    return _philox_rounds(_MULHILO, seed & _M32, (seed >> 32) & _M32, c0, n_rounds)


def _wrapping_multiply_is_exact() -> bool:
    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x89ABCDEF, 0x12345678], dtype=torch.int64)
    return all(torch.equal(a, b) for const in (PHILOX_ROUND_A, PHILOX_ROUND_B)
               for a, b in zip(_mulhilo32_wrap(const, x), _mulhilo32_limbs(const, x)))


_MULHILO = _mulhilo32_wrap if _wrapping_multiply_is_exact() else _mulhilo32_limbs


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """tl's uint_to_uniform_float: reinterpret as int32, fold negatives (~x), scale into [0, 1)."""
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * _INT32_TO_UNIFORM


def philox_randn(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 standard normals equal to `tl.randn(seed, offsets.to(uint32))` (to ~1e-6)."""
    i1, i2, _, _ = philox4x32(seed, offsets)
    u1 = _uint32_to_uniform(i1).clamp_min(1.0e-7)
    u2 = _uint32_to_uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


# Elements per block in `keyed_randn`: Philox's ~120 full-tensor int64 ops run out of cache instead of
# DRAM at this size, ~12x faster on CPU than one pass over a 4M-element batch.
_CHUNK = 1 << 16


def keyed_randn(seeds: torch.Tensor, first_offset: int, n_per_sample: int) -> torch.Tensor:
    """(B, n_per_sample) float32 noise: row b is randn(seeds[b], first_offset + arange(n_per_sample))."""
    seeds = seeds.to(torch.int64).view(-1, 1)
    out = torch.empty(seeds.shape[0], n_per_sample, dtype=torch.float32, device=seeds.device)
    if out.numel() == 0:
        return out
    cols = min(n_per_sample, _CHUNK)
    rows = max(1, _CHUNK // cols)
    for c in range(0, n_per_sample, cols):
        offsets = torch.arange(c, min(n_per_sample, c + cols), dtype=torch.int64, device=seeds.device)
        offsets = (offsets + int(first_offset)).view(1, -1)
        for r in range(0, seeds.shape[0], rows):
            out[r : r + rows, c : c + cols] = philox_randn(seeds[r : r + rows], offsets)
    return out


if HAS_TRITON:

    @triton.jit
    def _philox_kernel(seed_ptr, offset_ptr, out_ptr, n, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
        # One seed for the launch; out is (4, n) int64 of uint32 words, or (n,) float32 normals.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr + i, mask=mask, other=0).to(tl.uint32)
        if NORMAL:
            tl.store(out_ptr + i, tl.randn(seed, offset), mask=mask)
        else:
            r0, r1, r2, r3 = tl.randint4x(seed, offset)
            tl.store(out_ptr + i, r0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(out_ptr + n + i, r1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(out_ptr + 2 * n + i, r2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(out_ptr + 3 * n + i, r3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


def triton_philox(seed: int, offsets: torch.Tensor, normal: bool = False) -> torch.Tensor:
    """Run Triton's own `tl.randint4x` / `tl.randn` on `offsets`: the ground truth for the torch twin.

    Returns (4, n) int64 uint32 words, or (n,) float32 normals when `normal`. Works on CUDA tensors
    and, under TRITON_INTERPRET=1, on CPU tensors.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    offsets = offsets.to(torch.int64).contiguous()
    n = offsets.numel()
    seed_t = torch.tensor([int(seed)], dtype=torch.int64, device=offsets.device)
    out = torch.empty((n,) if normal else (4, n), dtype=torch.float32 if normal else torch.int64,
                      device=offsets.device)
    if n:
        block = 1024
        _philox_kernel[(triton.cdiv(n, block),)](seed_t, offsets, out, n, NORMAL=normal, BLOCK=block)
    return out
