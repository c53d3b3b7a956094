"""Small numpy image filters (Gaussian blur, smooth noise, binary dilation) so the data code needs no
SciPy."""

from __future__ import annotations

import numpy as np


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes, edges reflected; sigma in pixels (0 = copy)."""
    image = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return image.copy()
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = image
    for axis in (-2, -1):
        moved = np.moveaxis(out, axis, -1)
        n = moved.shape[-1]
        # Reflection is only defined for pads shorter than the axis; tile first for tiny images.
        reps = int(np.ceil((r + 1) / n)) if r >= n else 0
        src = np.concatenate([moved] * (2 * reps + 1), axis=-1) if reps else moved
        padded = np.pad(src, [(0, 0)] * (moved.ndim - 1) + [(r, r)], mode="reflect")
        start = reps * n
        acc = np.zeros_like(moved)
        for i, w in enumerate(k):
            acc += w * padded[..., start + i : start + i + n]
        out = np.moveaxis(acc, -1, axis)
    return np.ascontiguousarray(out)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise correlated over `sigma` pixels in the last two axes (periodic; filtered in Fourier
    space), scaled to unit std per image."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.rfftfreq(shape[-1])[None, :]
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=shape[-2:])
    std = field.std(axis=(-2, -1), keepdims=True)
    return (field / np.maximum(std, 1e-12)).astype(np.float32)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of the last two axes by a disc of `radius` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(radius, radius), (radius, radius)])
    out = np.zeros_like(mask)
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            if dr * dr + dc * dc <= radius * radius:
                out |= padded[..., radius + dr : radius + dr + h, radius + dc : radius + dc + w]
    return out
