"""The procedural generator: fast, seeded, in range, and its annotator styles behave as documented."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ssb_fast.data import load, write_synthetic
from ssb_fast.data.synthetic import FAINT_CONTRAST, synthetic_cases


def test_write_synthetic_is_fast_and_loadable(tmp_path):
    started = time.perf_counter()
    out = write_synthetic(tmp_path / "syn", n_cases=300, size=64, seed=0)
    assert time.perf_counter() - started < 10.0
    sizes = {s: len(load(out, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 210, "val": 45, "test": 45}
    ds = load(out, "train")
    assert ds.n_raters == 4 and ds.image_size == (64, 64) and ds.image_channels == 1
    assert ds.meta["annotator_styles"] == ["larger", "smaller", "misses_faint", "jitter"]
    assert ds.meta["semi_synthetic"] is False


def test_seeded_and_deterministic():
    a = synthetic_cases(20, size=32, seed=5)
    b = synthetic_cases(20, size=32, seed=5)
    c = synthetic_cases(20, size=32, seed=6)
    for key in ("images", "masks"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], c["images"])


def test_annotator_styles():
    cases = synthetic_cases(400, size=64, seed=1)
    masks, images, contrast = cases["masks"], cases["images"][:, 0], cases["contrast"]
    area = masks.reshape(400, 4, -1).sum(-1).astype(float)
    larger, smaller, faint_reader, jitter = 0, 1, 2, 3
    # `larger` draws bigger than the lesion's half-level outline, `smaller` smaller, in every case.
    assert (area[:, larger] > area[:, faint_reader])[contrast >= FAINT_CONTRAST].all()
    assert (area[:, smaller] < area[:, faint_reader])[contrast >= FAINT_CONTRAST].all()
    # `misses_faint` draws nothing exactly when the lesion is faint; the others always draw.
    np.testing.assert_array_equal(area[:, faint_reader] == 0, contrast < FAINT_CONTRAST)
    assert (area[:, [larger, smaller, jitter]] > 0).all()
    # `jitter` disagrees with the plain outline more than two plain readers' own noise makes them differ
    # (median IoU about 0.95 between two plain readers of this generator).
    plain = masks[:, faint_reader].astype(bool)
    shown = contrast >= FAINT_CONTRAST
    iou = (plain & masks[:, jitter].astype(bool)).sum((1, 2)) / (plain | masks[:, jitter].astype(bool)).sum((1, 2))
    assert np.median(iou[shown]) < 0.9
    twin = synthetic_cases(400, size=64, seed=1, styles=("larger", "smaller", "misses_faint", "misses_faint"))
    a, b = twin["masks"][:, 2].astype(bool), twin["masks"][:, 3].astype(bool)
    assert np.median(((a & b).sum((1, 2)) / (a | b).sum((1, 2)).clip(1))[shown]) > 0.92
    # Images in [-1, 1], lesion brighter than its surroundings: a model can see it.
    assert images.min() >= -1 and images.max() <= 1
    inside = (images * plain).sum((1, 2))[shown] / plain.sum((1, 2))[shown]
    outside = (images * ~masks[:, larger].astype(bool)).sum((1, 2)) / (~masks[:, larger].astype(bool)).sum((1, 2))
    assert (inside - outside[shown] > 0.1).mean() > 0.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="styles"):
        synthetic_cases(4, styles=("larger", "bogus", "jitter", "smaller"))
    with pytest.raises(ValueError, match="size"):
        synthetic_cases(4, size=4)
