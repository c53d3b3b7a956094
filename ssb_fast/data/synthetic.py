"""Procedural ambiguous lesions with known annotator styles, for tests and quick experiments.

Each case is a blob with a soft edge (its width sets how ambiguous the boundary is) and a contrast (faint
lesions are easy to miss). Reader styles: `larger` draws the outer edge of the blur, `smaller` the inner
edge, `misses_faint` draws the lesion only when its contrast is high enough, `jitter` wobbles the boundary;
every reader adds a little boundary noise of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ssb_fast.data.dataset_format import SPLITS, split_by_group, write_dataset
from ssb_fast.data.filters import smooth_noise

STYLES = ("larger", "smaller", "misses_faint", "jitter")
FAINT_CONTRAST = 0.4  # below this the `misses_faint` reader draws nothing


def synthetic_cases(
    n_cases: int, size: int = 64, n_raters: int = 4, seed: int = 0, styles: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Arrays of `n_cases` synthetic cases: images (N, 1, size, size) in [-1, 1], masks (N, M, size, size),
    present (N, M), and per-case `contrast` and `edge_width` (pixels) of the lesion."""
    styles = tuple(styles) if styles is not None else tuple(STYLES[k % len(STYLES)] for k in range(n_raters))
    if len(styles) != n_raters or any(s not in STYLES for s in styles):
        raise ValueError(f"styles must be {n_raters} of {STYLES}, got {styles}")
    if n_cases < 0 or size < 8 or n_raters < 1:
        raise ValueError(f"need n_cases >= 0, size >= 8, n_raters >= 1; got {n_cases}, {size}, {n_raters}")
    rng = np.random.default_rng(seed)
    n = n_cases
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 - 0.5 + rng.uniform(-0.12, 0.12, (n, 2)).astype(np.float32) * size
    dy = yy[None] - centre[:, 0, None, None]
    dx = xx[None] - centre[:, 1, None, None]
    rho = np.sqrt(dy**2 + dx**2)
    theta = np.arctan2(dy, dx)

    radius = rng.uniform(0.08, 0.22, n).astype(np.float32) * size
    shape = 1.0 + _theta_harmonics(rng, theta, rng.uniform(0.0, 0.15, n))
    r_true = radius[:, None, None] * shape
    edge = rng.uniform(0.6, 2.5, n).astype(np.float32)  # blur width of the boundary, pixels
    contrast = rng.uniform(0.2, 1.0, n).astype(np.float32)

    lesion = 1.0 / (1.0 + np.exp(-(r_true - rho) / edge[:, None, None]))
    background = (
        -0.6 + 0.06 * smooth_noise(rng, (n, size, size), size / 10) + 0.03 * smooth_noise(rng, (n, size, size), 1.0)
    )
    image = background + contrast[:, None, None] * lesion + 0.04 * rng.standard_normal((n, size, size))
    image = np.clip(image, -1.0, 1.0).astype(np.float32)[:, None]

    masks = np.zeros((n, n_raters, size, size), dtype=np.uint8)
    for k, style in enumerate(styles):
        own = 1.0 + _theta_harmonics(rng, theta, np.full(n, 0.03))
        if style == "larger":
            r = r_true * 1.08 + 0.8 * edge[:, None, None]
        elif style == "smaller":
            r = np.maximum(r_true * 0.92 - 0.8 * edge[:, None, None], 0.6 * r_true)
        elif style == "jitter":
            r = r_true * (1.0 + _theta_harmonics(rng, theta, np.full(n, 0.12), orders=(3, 5, 7)))
        else:
            r = r_true.copy()
        masks[:, k] = rho < r * own
        if style == "misses_faint":
            masks[contrast < FAINT_CONTRAST, k] = 0
    present = np.ones((n, n_raters), dtype=bool)
    return {"images": image, "masks": masks, "present": present, "contrast": contrast, "edge_width": edge}


def _theta_harmonics(rng, theta: np.ndarray, amplitude: np.ndarray, orders=(2, 3, 4)) -> np.ndarray:
    """Relative radius perturbation (n, H, W): random low-order harmonics of each case's polar angle."""
    n = len(amplitude)
    out = np.zeros(theta.shape, dtype=np.float32)
    for k in orders:
        a = (rng.uniform(0.0, 1.0, n) * amplitude)[:, None, None]
        phase = rng.uniform(0.0, 2 * np.pi, n)[:, None, None]
        out += (a * np.cos(k * theta + phase)).astype(np.float32)
    return out


def write_synthetic(
    out_dir: str | os.PathLike,
    n_cases: int = 200,
    size: int = 64,
    seed: int = 0,
    n_raters: int = 4,
    styles: tuple[str, ...] | None = None,
) -> Path:
    """Write a synthetic dataset folder (train/val/test 70/15/15 by case, with `seed`) and return its path."""
    cases = synthetic_cases(n_cases, size=size, n_raters=n_raters, seed=seed, styles=styles)
    case_ids = [f"synthetic_{i:05d}" for i in range(n_cases)]
    parts = split_by_group(case_ids, seed=seed)
    splits = {
        name: {
            "images": cases["images"][idx],
            "masks": cases["masks"][idx],
            "present": cases["present"][idx],
            "case_ids": [case_ids[i] for i in idx],
        }
        for name, idx in ((s, parts[s]) for s in SPLITS)
    }
    used = tuple(styles) if styles is not None else tuple(STYLES[k % len(STYLES)] for k in range(n_raters))
    meta = {
        "name": "synthetic",
        "semi_synthetic": False,
        "description": "Procedural ambiguous lesions with known annotator styles (for tests).",
        "source": "ssb_fast.data.synthetic",
        "licence": "generated data, no restrictions",
        "credit": None,
        "build": {"n_cases": n_cases, "size": size, "seed": seed, "n_raters": n_raters},
        "annotator_styles": list(used),
        "faint_contrast_threshold": FAINT_CONTRAST,
        "split_rule": f"by case, train/val/test 70/15/15, seed {seed}",
        "counts": {"cases": n_cases, "faint_lesions": int((cases["contrast"] < FAINT_CONTRAST).sum())},
    }
    return write_dataset(out_dir, splits, meta)
