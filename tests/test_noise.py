"""Keyed Philox noise: the torch twin equals Triton's generator; noise follows the mask, not the batch."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ssb_fast.kernels import noise

EDGE_OFFSETS = [0, 1, 2, 3, 4, 1023, 1024, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
SEEDS = [0, 1, 42, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 0x123456789ABCDEF, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_philox_equals_tl_randint4x_bit_for_bit(seed, triton_device):
    g = torch.Generator().manual_seed(seed % 1000)
    offsets = torch.cat([torch.tensor(EDGE_OFFSETS), torch.randint(0, 2**32, (2000,), generator=g)])
    want = noise.triton_philox(seed, offsets.to(triton_device)).cpu()
    got = torch.stack(noise.philox4x32(torch.tensor(seed), offsets))
    assert got.dtype == torch.int64 and got.min() >= 0 and got.max() < 2**32
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"first mismatches (word, index): {mismatch[:5].tolist()}"


@pytest.mark.parametrize("seed", [0, 7, 0x123456789ABCDEF])
def test_torch_randn_matches_tl_randn(seed, triton_device):
    offsets = torch.arange(4096, dtype=torch.int64) * 977 + 5
    want = noise.triton_philox(seed, offsets.to(triton_device), normal=True).cpu()
    got = noise.philox_randn(torch.tensor(seed), offsets)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_philox_known_answer():
    """Random123's published Philox-4x32-10 known-answer vector (counter 0, key 0)."""
    words = [int(w) for w in noise.philox4x32(torch.tensor(0), torch.tensor([0]))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_seed_hash_is_stable_blake2b():
    key = f"{123}\x1f{'LIDC-0001'}\x1f{5}".encode()
    want = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    assert noise.noise_seed(123, "LIDC-0001", 5) == want
    seeds = noise.noise_seeds(123, ["LIDC-0001", "LIDC-0001", "LIDC-0002"], [5, 6, 5])
    assert seeds.dtype == torch.int64 and seeds[0].item() == want
    assert len(set(seeds.tolist())) == 3
    with pytest.raises(ValueError, match="mask_indices"):
        noise.noise_seeds(0, ["a"], [0, 1])


def test_noise_follows_the_key_not_the_batch():
    seeds7 = noise.noise_seeds(0, ["scan"] * 7, list(range(7)))
    batch = noise.keyed_randn(seeds7, 3 * 100, 100)
    for i in range(7):
        alone = noise.keyed_randn(seeds7[i : i + 1], 3 * 100, 100)
        assert torch.equal(alone[0], batch[i])


def test_different_keys_and_steps_give_uncorrelated_standard_normals():
    n = 1 << 15
    seeds = noise.noise_seeds(0, ["a", "a", "b"], [0, 1, 0])
    z = noise.keyed_randn(seeds, 0, n)
    later_step = noise.keyed_randn(seeds[:1], n, n)[0]
    rows = torch.stack([z[0], z[1], z[2], later_step])
    assert rows.mean(1).abs().max() < 0.03
    assert (rows.std(1) - 1).abs().max() < 0.03
    corr = torch.corrcoef(rows)
    off_diag = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.03, corr
    # tail mass of a standard normal: P(|z| > 2) = 4.55%
    assert abs((z.abs() > 2).float().mean().item() - 0.0455) < 0.004


def test_one_seed_hash_for_noise_and_training():
    """Training's seeds (batches, draws, dropout) and the noise keys come from the one hash in kernels/noise.py."""
    from ssb_fast.train import batches, loop

    assert batches.hash_seed is noise.hash_seed and loop.hash_seed is noise.hash_seed
    assert noise.hash_seed(123, "LIDC-0001", 5) == noise.noise_seed(123, "LIDC-0001", 5)
    key = b"3\x1fepoch\x1f0"
    assert noise.hash_seed(3, "epoch", 0) == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(),
                                                            "little") & (2**63 - 1)
