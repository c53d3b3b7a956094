"""Rasterising readers' outlines, and grouping a scan's annotations into nodules."""

from __future__ import annotations

import numpy as np
import pytest

from ssb_fast.data.lidc_contours import Annotation, Scan, cluster_annotations, min_point_distance
from ssb_fast.data.rasterise import boundary_pixels, fill_polygon, polygon_interior, rasterise_contours


def _square(r0: int, c0: int, side: int) -> np.ndarray:
    return np.array([[r0, c0], [r0, c0 + side], [r0 + side, c0 + side], [r0 + side, c0]])


def _dense_outline(rc: np.ndarray) -> np.ndarray:
    """The outline through every boundary pixel, as LIDC stores it (one-pixel steps)."""
    return boundary_pixels(rc)


@pytest.mark.parametrize("side", [1, 2, 5, 9])
def test_square_pixel_counts(side):
    sq = _square(3, 4, side)
    assert fill_polygon(sq, (20, 20)).sum() == (side - 1) ** 2
    assert fill_polygon(sq, (20, 20), include_boundary=True).sum() == (side + 1) ** 2
    # The same square given as a dense outline (every boundary pixel a vertex) fills the same pixels.
    assert fill_polygon(_dense_outline(sq), (20, 20)).sum() == (side - 1) ** 2
    inside = fill_polygon(sq, (20, 20))
    assert inside[4 : 3 + side, 5 : 4 + side].all() if side > 1 else not inside.any()


def test_concave_polygon_is_filled_correctly():
    # A U: outer 10x10 square with a notch cut from the bottom, columns 3..6, rows 3..9.
    u = np.array([[0, 0], [0, 9], [9, 9], [9, 6], [3, 6], [3, 3], [9, 3], [9, 0]])
    expected = np.zeros((10, 10), dtype=bool)
    expected[0:10, 0:10] = True
    expected[4:10, 4:6] = False  # inside the notch (its own outline excluded)
    with_boundary = fill_polygon(u, (10, 10), include_boundary=True)
    np.testing.assert_array_equal(with_boundary, expected)
    # Without the outline: the strict interior of the U.
    interior = fill_polygon(u, (10, 10))
    strict = np.zeros((10, 10), dtype=bool)
    strict[1:9, 1:9] = True
    strict[3:9, 3:7] = False
    np.testing.assert_array_equal(interior, strict)
    # Concave arms are both filled in every row that crosses the notch (two spans per row).
    for row in range(4, 9):
        assert interior[row, 1:3].all() and interior[row, 7:9].all() and not interior[row, 3:7].any()


def test_triangle_and_window_offset():
    tri = np.array([[10, 10], [16, 16], [16, 10]])
    full = fill_polygon(tri, (30, 30), include_boundary=True)
    # Rows 10..16, each from column 10 to the diagonal: 1 + 2 + ... + 7 pixels.
    assert full.sum() == sum(range(1, 8))
    window = fill_polygon(tri, (8, 8), origin=(9, 9), include_boundary=True)
    np.testing.assert_array_equal(window, full[9:17, 9:17])


def test_polygon_interior_matches_brute_force_even_odd():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = rng.uniform(4, 12, 9)
    poly = np.c_[15 + radii * np.sin(angles), 15 + radii * np.cos(angles)].round().astype(int)
    got = polygon_interior(poly, (30, 30))
    a, b = poly.astype(float), np.roll(poly, -1, 0).astype(float)
    for r in range(30):
        for c in range(30):
            crossings = 0
            for (ra, ca), (rb, cb) in zip(a, b, strict=True):
                if (ra <= r < rb) or (rb <= r < ra):
                    if ca + (r - ra) * (cb - ca) / (rb - ra) < c:
                        crossings += 1
            assert got[r, c] == bool(crossings % 2), (r, c)


def test_exclusion_contour_cuts_a_hole():
    outer = _square(0, 0, 10)
    hole = _square(3, 3, 4)
    mask = rasterise_contours([(True, outer), (False, hole)], (11, 11))
    assert mask.sum() == 9 * 9 - 5 * 5  # the hole's interior and its outline are removed
    assert not mask[3:8, 3:8].any() and mask[1:3, 1:10].all()
    with_contour = rasterise_contours([(True, outer)], (11, 11), include_contour=True)
    assert with_contour.sum() == 11 * 11


def test_polygon_vertices_must_be_integers():
    with pytest.raises(ValueError, match="integer"):
        fill_polygon(np.array([[0.5, 0.0], [3.0, 0.0], [3.0, 3.0]]), (5, 5))


def _annotation(ann_id: int, centre: tuple[int, int], k: int, half: int = 3) -> Annotation:
    ann = Annotation(ann_id)
    ann.contours[k] = [(True, _dense_outline(_square(centre[0] - half, centre[1] - half, 2 * half)))]
    return ann


def test_min_point_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 30, (40, 3)).astype(float)
    b = rng.integers(20, 50, (30, 3)).astype(float)
    brute = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min()
    assert min_point_distance(a, b, cutoff=100.0) == pytest.approx(brute)
    assert min_point_distance(a, b, cutoff=brute - 1e-3) == np.inf


def test_clustering_groups_nearby_annotations_and_splits_crowds():
    # Two nodules: readers' outlines overlapping around (50, 50) and around (200, 200).
    anns = [
        _annotation(1, (50, 50), 10),
        _annotation(2, (51, 50), 10),
        _annotation(3, (200, 200), 20),
        _annotation(4, (50, 52), 11),
        _annotation(5, (201, 199), 20),
    ]
    scan = Scan(1, "P1", "uid", slice_thickness=2.5, pixel_spacing=0.7, annotations=anns)
    groups, ok = cluster_annotations(scan)
    assert ok and sorted(sorted(a.id for a in g) for g in groups) == [[1, 2, 4], [3, 5]]
    # Ordered by mean slice index of the annotations (pylidc's order).
    assert [a.id for a in groups[0]] == [1, 2, 4]
    # Six annotations 2 pixels apart (within tol 2.5): more than four readers in one group, so the
    # tolerance shrinks by 0.9 until the two sets of three (identical outlines within each) come apart.
    crowd = [_annotation(i, (100, 100), 5) for i in range(3)]
    crowd += [_annotation(10 + i, (100, 108), 5) for i in range(3)]
    groups, ok = cluster_annotations(Scan(2, "P2", "uid", 2.5, 0.7, crowd))
    assert ok and sorted(sorted(a.id for a in g) for g in groups) == [[0, 1, 2], [10, 11, 12]]
    # Identical outlines cannot be split: reported as not ok, the group kept as it is.
    same = [_annotation(i, (100, 100), 5) for i in range(5)]
    groups, ok = cluster_annotations(Scan(3, "P3", "uid", 2.5, 0.7, same))
    assert not ok and [len(g) for g in groups] == [5]
