"""A synthetic CT-like lung crop around given reader masks: parenchyma texture, vessels, sometimes chest wall
with ribs, and a nodule whose density follows the readers' soft consensus, then blur and noise.

Grey levels follow the real 8-bit LIDC crops (lung tissue about 5-20, soft tissue 65-115, bone up to 230);
`realism.py` measures how close the result comes to them. The image is semi-synthetic: only the masks are
real.
"""

from __future__ import annotations

import numpy as np

from ssb_fast.data.filters import gaussian_blur, smooth_noise

GREY = 127.5


def _splat_tubes(canvas: np.ndarray, centres: np.ndarray, radii: np.ndarray, levels: np.ndarray) -> None:
    """Draw discs (a tube is a chain of them) as cylinders seen in a thick slice: the density at distance d
    from the axis is level * sqrt(1 - (d/r)^2), so thin vessels come out dim (partial volume). Overlaps take
    the maximum."""
    h, w = canvas.shape
    if len(centres) == 0:
        return
    reach = int(np.ceil(radii.max())) + 1
    off = np.arange(-reach, reach + 1)
    rr = np.floor(centres[:, 0]).astype(int)[:, None, None] + off[None, :, None]
    cc = np.floor(centres[:, 1]).astype(int)[:, None, None] + off[None, None, :]
    d2 = (rr - centres[:, 0, None, None]) ** 2 + (cc - centres[:, 1, None, None]) ** 2
    value = levels[:, None, None] * np.sqrt(np.clip(1.0 - d2 / radii[:, None, None] ** 2, 0.0, 1.0))
    keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w) & (value > 0)
    rr, cc, value = (
        np.broadcast_to(rr, value.shape)[keep],
        np.broadcast_to(cc, value.shape)[keep],
        value[keep],
    )
    np.maximum.at(canvas, (rr, cc), value.astype(canvas.dtype))


def _vessel_tree(rng: np.random.Generator, size: int, pixel_mm: float, n_trees: int):
    """Centres, radii and levels of discs along nearly straight, tapering, forking vessels, plus vessel
    cross-sections (the round dots of vessels running through the slice)."""
    centres, radii, levels = [], [], []
    stack = []
    for _ in range(n_trees):
        start = rng.uniform(0.0, 1.0, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        stack.append((start, angle, rng.uniform(0.4, 2.6) / pixel_mm, rng.uniform(0.8, 1.0), 0))
    while stack:
        pos, angle, radius, gain, depth = stack.pop()
        length = rng.uniform(6, 22) / pixel_mm
        bend = rng.normal(0.0, 0.004)
        n_steps = max(int(length / 0.5), 1)
        angles = angle + np.cumsum(bend + rng.normal(0.0, 0.004, n_steps))
        path = pos + 0.5 * np.cumsum(np.c_[np.sin(angles), np.cos(angles)], axis=0)
        inside = np.all((path > -5) & (path < size + 5), axis=1)
        taper = radius * (1.0 - 0.25 * np.arange(n_steps) / n_steps)
        centres.extend(path[inside])
        radii.extend(np.maximum(taper[inside], 0.45))
        levels.extend([gain] * int(inside.sum()))
        pos, angle = path[-1], angles[-1]
        radius *= 0.75
        if depth < 4 and radius > 0.5:
            spread = rng.uniform(0.25, 0.7)
            for sign in (-1.0, 1.0):
                if rng.random() < 0.8:
                    stack.append((pos.copy(), angle + sign * spread, radius * rng.uniform(0.7, 1.0), gain, depth + 1))
    n_dots = rng.poisson(10 * (size * pixel_mm / 64.0) ** 2)
    for _ in range(n_dots):
        centres.append(rng.uniform(0, size, 2))
        radii.append(rng.uniform(0.4, 1.4) / pixel_mm)
        levels.append(rng.uniform(0.7, 1.0))
    if not centres:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0)
    return np.asarray(centres), np.asarray(radii, dtype=np.float64), np.asarray(levels, dtype=np.float64)


def _chest_wall(rng: np.random.Generator, size: int, pixel_mm: float, keep_clear: np.ndarray):
    """Signed distance (pixels, > 0 beyond the pleura) of a chest wall or mediastinum whose curved edge
    crosses the crop without covering the pixels in `keep_clear`; None when no placement fits."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(12):
        radius = rng.uniform(40, 160) / pixel_mm
        direction = rng.uniform(0, 2 * np.pi)
        unit = np.array([np.sin(direction), np.cos(direction)])
        # The lung is a disc of `radius`, centred so that its edge lies `depth` pixels from the crop centre.
        depth = rng.uniform(-0.1, 0.4) * size
        centre = np.array([size / 2, size / 2]) - unit * (radius - depth)
        dist = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) - radius
        dist += 1.5 * smooth_noise(rng, (size, size), 8.0)
        if not np.any(dist[keep_clear] > -2.0):
            return dist
    return None


def _ribs(rng: np.random.Generator, wall: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Rib sections inside the wall: bands along the pleura with a bright cortex and a darker marrow."""
    size = wall.shape[0]
    out = np.zeros_like(wall)
    depth = rng.uniform(4.0, 9.0) / pixel_mm
    band = np.abs(wall - depth) < 1.0
    if not band.any():
        return out
    gy, gx = np.gradient(wall)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        rows, cols = np.nonzero(band)
        pick = rng.integers(len(rows))
        p = np.array([rows[pick], cols[pick]], dtype=np.float32)
        normal = np.array([gy[rows[pick], cols[pick]], gx[rows[pick], cols[pick]]])
        tangent = np.array([-normal[1], normal[0]]) / max(float(np.hypot(*normal)), 1e-6)
        half = rng.uniform(5.0, 15.0) / pixel_mm
        a, b = p - tangent * half, p + tangent * half
        ab = b - a
        t = np.clip(((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1]) / float(ab @ ab), 0.0, 1.0)
        d = np.hypot(yy - (a[0] + t * ab[0]), xx - (a[1] + t * ab[1]))
        radius = rng.uniform(2.5, 4.5) / pixel_mm
        cortex = rng.uniform(135.0, 200.0)
        marrow = cortex - rng.uniform(15.0, 45.0)
        shell = np.clip((d - (radius - 1.5 / pixel_mm)) / (1.0 / pixel_mm), 0.0, 1.0)
        rib = (marrow + (cortex - marrow) * shell + 6.0 * smooth_noise(rng, wall.shape, 1.0)) * (d < radius)
        out = np.maximum(out, gaussian_blur(rib.astype(np.float32), 0.8))
    return out


# The power on the readers' consensus that gives the nodule's density (drawn per nodule in this range).
# 1.0-1.4 puts the nodules a single reader marked at the real crops' contrast (docs/data.md); builds made
# before 2026-12-04 used 0.6-1.0.
CONSENSUS_POWER = (1.0, 1.4)


def semi_synthetic_ct(
    consensus: np.ndarray,
    rng: np.random.Generator,
    pixel_mm: float = 0.5,
    texture: float | None = None,
    subtlety: float | None = None,
    consensus_power: tuple[float, float] = CONSENSUS_POWER,
) -> np.ndarray:
    """A (H, W) float32 image in [-1, 1] around a nodule whose soft reader consensus is `consensus` (H, W)
    in [0, 1] (the mean of the reader masks, readers who did not mark the nodule counted as zeros).

    Where all readers agree the nodule is dense; where only some drew it the density falls off, so the image
    carries the readers' disagreement. `pixel_mm` scales anatomy (vessel widths, ribs) to the pixel size.

    `texture` and `subtlety` are the readers' own LIDC ratings of the nodule (1-5, mean over the readers who
    marked it). Texture sets its solidity: 1 non-solid (ground glass: faint and mottled), 3 part solid,
    5 solid (soft-tissue dense). Subtlety sets its contrast: 1 extremely subtle (0.6 of the contrast),
    5 obvious (all of it). Without ratings, 15% of nodules are ground glass and every nodule is obvious.

    `consensus_power` (lo, hi) sets how the density falls with the consensus: density = blurred
    consensus ** p, p drawn uniformly in [lo, hi]. Where every reader drew the nodule (consensus 1) the power
    changes nothing; a higher one makes the parts and the nodules that fewer readers drew fainter.
    """
    lo, hi = consensus_power
    if not 0.0 < lo <= hi <= 5.0:
        raise ValueError(f"consensus_power is (lo, hi) with 0 < lo <= hi <= 5, got {consensus_power}")
    for name, rating in (("texture", texture), ("subtlety", subtlety)):
        if rating is not None and not 1.0 <= rating <= 5.0:
            raise ValueError(f"{name} is a LIDC rating in [1, 5], got {rating}")
    consensus = np.clip(np.asarray(consensus, dtype=np.float32), 0.0, 1.0)
    size_h, size_w = consensus.shape
    size = max(size_h, size_w)
    # Anatomy is drawn on a square canvas and cropped back at the end.
    consensus = np.pad(consensus, ((0, size - size_h), (0, size - size_w)))

    # Lung parenchyma: dark, with a slow density drift and a fine mottled texture.
    grey = rng.uniform(11.0, 18.0) + rng.uniform(1.0, 3.0) * smooth_noise(rng, (size, size), 12.0)
    grey = grey + rng.uniform(7.0, 9.5) * smooth_noise(rng, (size, size), 1.0)

    # Vessels and their cross-sections.
    soft_tissue = rng.uniform(90.0, 118.0)
    vessels = np.zeros((size, size), dtype=np.float32)
    centres, radii, levels = _vessel_tree(rng, size, pixel_mm, int(rng.integers(1, 4)))
    _splat_tubes(vessels, centres, radii, levels * soft_tissue)
    grey = np.maximum(grey, vessels)

    # Often chest wall or mediastinum: soft tissue, a fat layer and ribs beyond the pleura, never over
    # the nodule.
    nodule_zone = consensus > 0.01
    if rng.random() < 0.8:
        wall = _chest_wall(rng, size, pixel_mm, nodule_zone)
        if wall is not None:
            muscle = rng.uniform(62.0, 118.0)
            tissue = muscle + 2.5 * smooth_noise(rng, (size, size), 1.5)
            fat_band = (wall > rng.uniform(0.5, 2.0) / pixel_mm) & (wall < rng.uniform(3.0, 8.0) / pixel_mm)
            tissue = np.where(fat_band, tissue - rng.uniform(8.0, 25.0), tissue)
            if rng.random() < 0.5:
                tissue = np.maximum(tissue, _ribs(rng, wall, pixel_mm))
            edge = np.clip(wall / 1.5 + 0.5, 0.0, 1.0)
            grey = grey * (1 - edge) + tissue * edge

    # The nodule: density follows the readers' consensus, softened at the edge, with internal texture.
    if consensus.any():
        if texture is None:  # no ratings: ground glass or solid, drawn
            if rng.random() < 0.15:  # ground glass: faint and mottled
                level = rng.uniform(35.0, 60.0)
                mottle = 0.15
            else:
                level = soft_tissue * rng.uniform(0.85, 1.05)
                mottle = 0.06
        else:  # from ground glass (texture 1) to solid (texture 5)
            solid = (texture - 1.0) / 4.0
            ground_glass_level, solid_level = rng.uniform(35.0, 60.0), soft_tissue * rng.uniform(0.85, 1.05)
            level = ground_glass_level + solid * (solid_level - ground_glass_level)
            mottle = 0.15 + solid * (0.06 - 0.15)
        density = gaussian_blur(consensus, rng.uniform(0.6, 1.2)) ** rng.uniform(lo, hi)
        density = density * (1.0 + mottle * smooth_noise(rng, consensus.shape, 1.2))
        visibility = 1.0 if subtlety is None else 0.6 + 0.1 * (subtlety - 1.0)
        grey = grey + (level - grey) * visibility * np.clip(density, 0.0, 1.0)

    # Scanner blur and quantum noise.
    grey = gaussian_blur(grey[:size_h, :size_w], rng.uniform(0.4, 0.7))
    grey = grey + rng.uniform(1.5, 3.0) * smooth_noise(rng, grey.shape, 0.7)
    grey = np.clip(np.round(grey), 0.0, 255.0)
    return (grey / GREY - 1.0).astype(np.float32)
