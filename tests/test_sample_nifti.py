"""NIfTI in and out: a 2-D (or single-slice) scan gives its mean, entropy and majority back as NIfTI with its
affine and spacing; a volume is sampled on the slices named along the chosen axis and written back as
volumes of its shape; broken files and slices outside the volume exit 3 naming the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import sample_cli
from typer.testing import CliRunner

from ssb_fast.nifti_io import parse_slices
from ssb_fast.sample_folder import CASES_DIR, NIFTI_DIR, case_maps
from ssb_fast.samples_io import read_samples_npz

nib = pytest.importorskip("nibabel")

runner = CliRunner()
FAST = ["--n-samples", "4", "--nfe", "2", "--device", "cpu", "--threads", "1"]
# an oblique, anisotropic, shifted affine: 0.7 x 0.8 x 2.5 mm voxels with the first two axes swapped
AFFINE = np.array([[0.0, -0.8, 0.1, 30.0], [0.7, 0.0, 0.0, -12.0], [0.0, 0.05, 2.5, 40.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


sample = sample_cli


def _save(path: Path, data: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def _ct(shape, seed=0) -> np.ndarray:
    """CT-like int16 values in Hounsfield units."""
    return np.random.default_rng(seed).integers(-1000, 400, size=shape).astype(np.int16)


def _maps(out: Path, stem: str) -> dict:
    return {name: nib.load(str(out / NIFTI_DIR / f"{stem}_{name}.nii.gz")) for name in ("mean", "entropy", "majority")}


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1)])
def test_a_2d_scan_gives_nifti_maps_with_its_affine_and_spacing(run, tmp_path, shape):
    run_dir, _ = run
    scan = _save(tmp_path / "scan.nii.gz", _ct(shape))
    out = tmp_path / "out"
    result = sample("--model", run_dir, "--images", scan, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "nifti/ (3 files)" in result.output
    source = nib.load(str(scan))
    masks = read_samples_npz(out).samples[0]
    want = case_maps(masks)
    for name, img in _maps(out, "scan").items():
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, source.affine)
        assert img.header.get_zooms() == source.header.get_zooms()
        assert img.header.get_xyzt_units() == ("mm", "unknown")
        values = np.asanyarray(img.dataobj)
        assert values.dtype == want[name].dtype
        assert np.array_equal(values.reshape(32, 32), want[name]), name
    # the maps in the case folder are the same numbers
    assert np.array_equal(np.load(out / CASES_DIR / "scan" / "mean.npy"), want["mean"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"]["nifti"] == [f"nifti/scan_{n}.nii.gz" for n in ("mean", "entropy", "majority")]


def test_a_volume_is_sampled_on_the_named_slices_and_written_back_whole(run, tmp_path):
    run_dir, _ = run
    volume = _ct((32, 32, 6), seed=1)
    path = _save(tmp_path / "vol.nii.gz", volume)
    out = tmp_path / "out"
    result = sample("--model", run_dir, "--images", path, "--slices", "1:3,5", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    got = read_samples_npz(out)
    assert got.case_ids == ["vol_slice1", "vol_slice2", "vol_slice5"]
    maps = _maps(out, "vol")
    for img in maps.values():
        assert img.shape == (32, 32, 6)
        np.testing.assert_allclose(img.affine, AFFINE)
        assert img.header.get_zooms() == nib.load(str(path)).header.get_zooms()
    mean = np.asanyarray(maps["mean"].dataobj)
    majority = np.asanyarray(maps["majority"].dataobj)
    for k, masks in zip((1, 2, 5), got.samples):
        assert np.array_equal(mean[:, :, k], case_maps(masks)["mean"])
        assert np.array_equal(majority[:, :, k], case_maps(masks)["majority"])
    for k in (0, 3, 4):  # not sampled: NaN in the float maps, 0 in the mask
        assert np.isnan(mean[:, :, k]).all() and not majority[:, :, k].any()
    # the scans sampled are the slices, scaled as one volume (min..max of its Hounsfield values)
    args = json.loads((out / "args.json").read_text())
    assert args["input"]["nifti"][0]["slices"] == [1, 2, 5] and args["input"]["nifti"][0]["axis"] == 2
    assert args["input"]["image_scaling"]["from"] == [float(volume.min()), float(volume.max())]


def test_another_axis(run, tmp_path):
    run_dir, _ = run
    path = _save(tmp_path / "vol.nii", _ct((3, 32, 32), seed=2))
    out = tmp_path / "out"
    result = sample("--model", run_dir, "--images", path, "--axis", 0, "--slices", "2", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert read_samples_npz(out).case_ids == ["vol_slice2"]
    mean = np.asanyarray(_maps(out, "vol")["mean"].dataobj)
    assert mean.shape == (3, 32, 32) and np.isnan(mean[:2]).all() and not np.isnan(mean[2]).any()


def test_volume_errors(run, tmp_path):
    run_dir, _ = run
    path = _save(tmp_path / "vol.nii.gz", _ct((32, 32, 6)))
    args = ["--model", run_dir, "--images", path, "--out", tmp_path / "out", *FAST]
    outside = sample(*args, "--slices", "4:9")
    assert outside.exit_code == 3 and f"{path}: --slices 4:9 reaches slice 8, outside the volume: it has 6 " \
                                      f"slices along axis 2 (0..5)" in outside.output
    unnamed = sample(*args)
    assert unnamed.exit_code == 2 and "name the slices to sample with --slices" in unnamed.output
    wrong_axis = sample(*args, "--axis", 0, "--slices", "0")
    assert wrong_axis.exit_code == 3 and "32x6 pixels" in wrong_axis.output and "--axis" in wrong_axis.output
    assert not (tmp_path / "out").exists()
    flat = _save(tmp_path / "flat.nii.gz", _ct((32, 32)))
    no_volume = sample("--model", run_dir, "--images", flat, "--slices", "0", "--out", tmp_path / "o2", *FAST)
    assert no_volume.exit_code == 2 and "none of the images is one" in no_volume.output


@pytest.mark.parametrize("text, message", [
    ("a:b", "expected slice numbers"), ("5:5", "is empty"), ("3:1", "is empty"), ("", "expected slice numbers"),
    ("1,,2", "expected slice numbers"), ("-1", "expected slice numbers"),
])
def test_bad_slices_exit_2_before_any_work(text, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        parse_slices(text)
    result = sample("--model", "M", "--images", "x.nii.gz", "--slices", text, "--out", tmp_path / "o")
    assert result.exit_code == 2 and message in result.output


def test_slice_syntax():
    assert parse_slices("3").indices(10, "f", 2) == [3]
    assert parse_slices("2:5,4:7,9").indices(10, "f", 2) == [2, 3, 4, 5, 6, 9]
    assert parse_slices(":2,8:").indices(10, "f", 2) == [0, 1, 8, 9]
    assert parse_slices("0:").indices(4, "f", 2) == [0, 1, 2, 3]


def test_broken_nifti_files_exit_3_naming_the_file(run, tmp_path):
    run_dir, _ = run
    good = _save(tmp_path / "good.nii", _ct((32, 32)))
    raw = good.read_bytes()
    header = tmp_path / "header.nii"
    header.write_bytes(b"\x07" * 348 + raw[348:])  # no valid sizeof_hdr, magic or dims
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(raw[:600])  # the header, then too few voxels
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a gzip stream")
    out = tmp_path / "out"
    assert sample("--model", run_dir, "--images", good, "--out", out, *FAST).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in (header, truncated, garbage):
        result = sample("--model", run_dir, "--images", good, bad, "--out", out, "--continue", *FAST)
        assert result.exit_code == 3, result.output
        assert f"error: {bad}" in result.output and "unreadable NIfTI file" in result.output
        assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_without_nibabel_the_message_names_the_extra(run, tmp_path, monkeypatch):
    run_dir, _ = run
    path = _save(tmp_path / "scan.nii.gz", _ct((32, 32)))
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    result = sample("--model", run_dir, "--images", path, "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{path}: NIfTI files need nibabel, an optional extra: pip install 'ssb-fast[nifti]'" in result.output


def test_axis_and_slices_are_for_image_files(run, tmp_path):
    run_dir, data = run
    result = sample("--model", run_dir, "--data", data, "--slices", "1", "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 2 and "--axis and --slices cut NIfTI volumes" in result.output
