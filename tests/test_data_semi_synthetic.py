"""The semi-synthetic CT image: range, determinism, and a nodule that follows the readers' consensus."""

from __future__ import annotations

import numpy as np
import pytest

from ssb_fast.data.filters import dilate, gaussian_blur, gaussian_kernel, smooth_noise
from ssb_fast.data.semi_synthetic_ct import semi_synthetic_ct


def _consensus(shape=(64, 64)) -> np.ndarray:
    """Four readers: a core all of them drew, and a rim only one of them drew."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return np.where(r < 6, 1.0, np.where(r < 9, 0.25, 0.0)).astype(np.float32)


def test_image_range_shape_and_determinism():
    for shape in ((64, 64), (40, 72)):
        a = semi_synthetic_ct(_consensus(shape), np.random.default_rng(7), pixel_mm=0.5)
        b = semi_synthetic_ct(_consensus(shape), np.random.default_rng(7), pixel_mm=0.5)
        assert a.shape == shape and a.dtype == np.float32
        assert a.min() >= -1.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        # 8-bit grey levels, as the real crops: (x + 1) * 127.5 is an integer.
        np.testing.assert_allclose((a + 1) * 127.5, np.round((a + 1) * 127.5), atol=1e-3)


def test_nodule_density_follows_the_consensus():
    consensus = _consensus()
    core, rim = consensus == 1.0, consensus == 0.25
    ring = dilate(consensus > 0, 6) & ~dilate(consensus > 0, 2)
    core_minus_rim, rim_minus_ring = [], []
    for seed in range(40):
        image = semi_synthetic_ct(consensus, np.random.default_rng(seed), pixel_mm=0.5)
        core_minus_rim.append(image[core].mean() - image[rim].mean())
        rim_minus_ring.append(np.median(image[rim]) - np.median(image[ring]))
    # Where all four readers drew, denser than where one did; where one did, denser than lung tissue.
    assert np.median(core_minus_rim) > 0.1 and np.mean(np.array(core_minus_rim) > 0) > 0.9
    assert np.median(rim_minus_ring) > 0.05


def test_readers_ratings_set_solidity_and_contrast():
    """A nodule its readers rated ground glass (texture 1) or extremely subtle (subtlety 1) is fainter than one
    rated solid and obvious (5); everything else in the image comes from the same seeded draws."""
    consensus = _consensus()
    core = consensus == 1.0
    far = ~dilate(consensus > 0, 6)
    for seed in range(12):
        solid, ground_glass, subtle = (
            semi_synthetic_ct(consensus, np.random.default_rng(seed), 0.5, texture=t, subtlety=s)
            for t, s in ((5, 5), (1, 5), (5, 1))
        )
        assert image_mean(ground_glass, core) < image_mean(solid, core) - 0.15
        assert image_mean(subtle, core) < image_mean(solid, core) - 0.05
        np.testing.assert_allclose(ground_glass[far], solid[far], atol=0.02)
    for bad in ({"texture": 0.0}, {"subtlety": 6}):
        with pytest.raises(ValueError, match="rating"):
            semi_synthetic_ct(consensus, np.random.default_rng(0), 0.5, **bad)


def test_consensus_power_fades_what_fewer_readers_drew():
    """A higher power on the consensus makes the rim one reader drew fainter, and leaves the core all four
    drew (and everything away from the nodule) as it was: the same seeded draws, one exponent."""
    consensus = _consensus()
    rim = consensus == 0.25
    inner_core = (consensus == 1.0) & ~dilate(consensus < 1.0, 3)  # beyond the blur's reach from the rim
    far = ~dilate(consensus > 0, 6)
    for seed in range(12):
        default = semi_synthetic_ct(consensus, np.random.default_rng(seed), 0.5, texture=5, subtlety=5)
        same = semi_synthetic_ct(consensus, np.random.default_rng(seed), 0.5, texture=5, subtlety=5,
                                 consensus_power=(1.0, 1.4))
        gentle = semi_synthetic_ct(consensus, np.random.default_rng(seed), 0.5, texture=5, subtlety=5,
                                   consensus_power=(0.6, 1.0))
        steep = semi_synthetic_ct(consensus, np.random.default_rng(seed), 0.5, texture=5, subtlety=5,
                                  consensus_power=(1.6, 1.6))
        np.testing.assert_array_equal(default, same)
        assert image_mean(steep, rim) < image_mean(gentle, rim) - 0.05
        assert image_mean(steep, rim) < image_mean(default, rim) < image_mean(gentle, rim)
        assert abs(image_mean(steep, inner_core) - image_mean(gentle, inner_core)) < 0.01
        np.testing.assert_array_equal(steep[far], gentle[far])
        np.testing.assert_array_equal(default[far], gentle[far])
    for bad in ((0.0, 1.0), (1.4, 1.0), (1.0, 6.0)):
        with pytest.raises(ValueError, match="consensus_power"):
            semi_synthetic_ct(consensus, np.random.default_rng(0), 0.5, consensus_power=bad)


def image_mean(image: np.ndarray, where: np.ndarray) -> float:
    return float(image[where].mean())


def test_filters():
    k = gaussian_kernel(1.5)
    assert abs(float(k.sum()) - 1.0) < 1e-6
    impulse = np.zeros((21, 21), np.float32)
    impulse[10, 10] = 1.0
    blurred = gaussian_blur(impulse, 1.5)
    np.testing.assert_allclose(blurred, _outer_padded(k, 21), atol=1e-7)
    noise = smooth_noise(np.random.default_rng(0), (3, 32, 32), 2.0)
    np.testing.assert_allclose(noise.std(axis=(1, 2)), 1.0, rtol=1e-5)
    # Correlated over ~sigma pixels: neighbours agree far more than in white noise.
    assert np.corrcoef(noise[0, :, :-1].ravel(), noise[0, :, 1:].ravel())[0, 1] > 0.8
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    assert dilate(mask, 2).sum() == 13  # a disc of radius 2


def _outer_padded(k: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n), np.float32)
    r = len(k) // 2
    out[n // 2 - r : n // 2 + r + 1, n // 2 - r : n // 2 + r + 1] = np.outer(k, k)
    return out
