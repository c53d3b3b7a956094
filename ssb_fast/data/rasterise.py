"""Polygon fill on the pixel grid, for readers' contours given as integer pixel coordinates.

Pixel (r, c) is the point with those integer coordinates (its centre). A pixel is inside a polygon when a
ray from its centre crosses the outline an odd number of times (even-odd rule, edges taken half-open in
the row direction so that a vertex is never counted twice). Pixels that lie exactly on the outline are
then set by `include_boundary`, so the result does not depend on how a boundary point tests.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _closed_edges(rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rc = np.asarray(rc)
    if rc.ndim != 2 or rc.shape[1] != 2 or rc.shape[0] == 0:
        raise ValueError(f"polygon must be a (K, 2) array of (row, col) vertices with K >= 1, got {rc.shape}")
    if not np.issubdtype(rc.dtype, np.integer):
        if not np.all(np.isfinite(rc)) or not np.all(rc == np.round(rc)):
            raise ValueError("polygon vertices must be integer pixel coordinates")
        rc = rc.astype(np.int64)
    rc = rc.astype(np.int64)
    return rc, np.roll(rc, -1, axis=0)


def boundary_pixels(rc: np.ndarray) -> np.ndarray:
    """All lattice points on the closed outline through the vertices `rc` ((K, 2) int), as (P, 2) row, col."""
    a, b = _closed_edges(rc)
    d = b - a
    steps = np.gcd(np.abs(d[:, 0]), np.abs(d[:, 1]))
    # Edge a -> b passes through the lattice points a + t * d / g, t = 0 .. g-1 (b starts the next edge).
    n = np.maximum(steps, 1)
    edge = np.repeat(np.arange(len(a)), n)
    t = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    unit = d // np.maximum(steps, 1)[:, None]
    return a[edge] + t[:, None] * unit[edge]


def polygon_interior(rc: np.ndarray, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bool mask of `shape` (window whose pixel [0, 0] is at `origin`) of the pixels inside the polygon `rc`
    by the even-odd rule; pixels on the outline may come out either way (see `fill_polygon`)."""
    a, b = _closed_edges(rc)
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    r0, c0 = origin
    rows = np.arange(max(a[:, 0].min(), r0), min(a[:, 0].max(), r0 + height - 1) + 1)
    if rows.size == 0 or len(a) < 3:
        return mask
    ra, ca = a[:, 0][None, :].astype(np.float64), a[:, 1][None, :].astype(np.float64)
    rb, cb = b[:, 0][None, :].astype(np.float64), b[:, 1][None, :].astype(np.float64)
    r = rows[:, None].astype(np.float64)
    crosses = ((ra <= r) & (r < rb)) | ((rb <= r) & (r < ra))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = ca + (r - ra) * (cb - ca) / (rb - ra)
    ri, ei = np.nonzero(crosses)
    # Every crossing at x flips inside/outside for all columns c > x: record the flip at the first such
    # column, then a running sum along the row gives the crossing count left of each pixel.
    first_col = np.clip(np.floor(x[ri, ei]).astype(np.int64) + 1 - c0, 0, width)
    flips = np.zeros((rows.size, width + 1), dtype=np.int32)
    np.add.at(flips, (ri, first_col), 1)
    inside = (np.cumsum(flips[:, :width], axis=1) & 1).astype(bool)
    mask[rows - r0] = inside
    return mask


def fill_polygon(
    rc: np.ndarray,
    shape: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
    include_boundary: bool = False,
) -> np.ndarray:
    """Bool mask of the polygon with integer vertices `rc` ((K, 2) row, col) on a `shape` window at `origin`.

    `include_boundary=False` leaves out every pixel on the outline (the LIDC readers drew the outline on the
    first pixel outside the nodule); True adds them all. A closed square with side s therefore covers
    (s - 1)^2 pixels without its boundary and (s + 1)^2 with it.
    """
    mask = polygon_interior(rc, shape, origin)
    _set_pixels(mask, boundary_pixels(rc), origin, include_boundary)
    return mask


def _set_pixels(mask: np.ndarray, rc: np.ndarray, origin: tuple[int, int], value: bool) -> None:
    r = rc[:, 0] - origin[0]
    c = rc[:, 1] - origin[1]
    keep = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    mask[r[keep], c[keep]] = value


def rasterise_contours(
    contours: Iterable[tuple[bool, np.ndarray]],
    shape: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
    include_contour: bool = False,
) -> np.ndarray:
    """One reader's mask on one slice from its contours `(inclusion, rc)`.

    As pylidc's `Annotation.boolean_mask`: the union of the inclusion contours' interiors, their outline
    pixels removed unless `include_contour`, then the exclusion contours' interiors and outlines cut out.
    (pylidc removes only the listed vertices; LIDC outlines step one pixel at a time, so these coincide.)
    """
    contours = list(contours)
    mask = np.zeros(shape, dtype=bool)
    for inclusion, rc in contours:
        if inclusion:
            mask |= polygon_interior(rc, shape, origin)
    for inclusion, rc in contours:
        if inclusion:
            _set_pixels(mask, boundary_pixels(rc), origin, include_contour)
    for inclusion, rc in contours:
        if not inclusion:
            mask &= ~fill_polygon(rc, shape, origin, include_boundary=True)
    return mask
