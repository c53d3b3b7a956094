"""Duplicate case ids in one input are refused with exit code 3 naming the id, never silently renamed: outputs
are named and matched by case id (cases/<case>.npz, --continue, --case-ids), so two scans with one id would be
renamed or mixed up. Ids that differ only in letter case are distinct cases and get distinct files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import sample_cli
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.data import DataFormatError, load, write_synthetic
from ssb_fast.sample_inputs import ScanSet
from ssb_fast.sample_run import sample_scans
from ssb_fast.samples_io import save_npz

runner = CliRunner()


def assert_refused(result, *names: str) -> None:
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.output, (name, result.output)


def with_ids(data: Path, split: str, ids: list[str]) -> None:
    with np.load(data / f"{split}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays = {k: v[: len(ids)] for k, v in arrays.items()}
    arrays["case_ids"] = np.array(ids, dtype=np.str_)
    with open(data / f"{split}.npz", "wb") as fh:
        save_npz(fh, arrays)


def test_dataset_split_with_a_repeated_id(tiny_run, tmp_path):
    run, _ = tiny_run
    data = write_synthetic(tmp_path / "data", n_cases=8, size=32, seed=0)
    with_ids(data, "train", ["a", "b", "a"])
    with pytest.raises(DataFormatError, match="'a' appears 2 times"):
        load(data, "train")
    out = tmp_path / "out"
    assert_refused(sample_cli("--model", run, "--data", data, "--split", "train", "--out", out, "--no-progress"),
                   "train.npz", "'a' appears 2 times")
    assert not out.exists()


def test_two_image_files_with_one_case_id(tiny_run, tmp_path):
    run, _ = tiny_run
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / folder / "scan.png")
    np.save(tmp_path / "a" / "other.npy", np.zeros((32, 32), np.float32))
    np.save(tmp_path / "b" / "other.npy", np.zeros((32, 32), np.float32))
    out = tmp_path / "out"
    assert_refused(sample_cli("--model", run, "--images", tmp_path / "a" / "scan.png", tmp_path / "b" / "scan.png",
                              "--out", out, "--no-progress"), "case id 'scan'")
    assert_refused(sample_cli("--model", run, "--images", tmp_path / "a", tmp_path / "b", "--out", out,
                              "--no-progress"), "case id 'other'")
    assert not out.exists()


def test_scan_set_with_a_repeated_id(tiny_run, tmp_path):
    run, _ = tiny_run
    scans = ScanSet(images=torch.zeros(2, 1, 32, 32), case_ids=["x", "x"], sources=["s", "s"],
                    experts=np.zeros((2, 0, 32, 32), np.uint8), present=np.zeros((2, 0), bool), input={})
    with pytest.raises(DataFormatError, match="'x' appears 2 times"):
        sample_scans(run, scans, tmp_path / "out", n_samples=1, nfe=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_lidc_pickle_keys_that_read_as_one_id(tmp_path):
    rng = np.random.default_rng(0)

    def record():
        return {"image": rng.random((16, 16), dtype=np.float32),
                "masks": [(rng.random((16, 16)) > 0.5).astype(np.uint8)], "series_uid": "s"}

    path = tmp_path / "dup.pickle"
    path.write_bytes(pickle.dumps({1: record(), "1": record()}))
    result = runner.invoke(app, ["data", "import-lidc-pickle", str(path), "--out", str(tmp_path / "out"),
                                 "--no-progress"])
    assert_refused(result, "case ids must be unique", "1")


def test_folder_with_one_case_in_two_formats(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "images" / "c0.png")
    np.save(src / "images" / "c0.npy", np.zeros((16, 16), np.float32))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "masks" / "c0_r0.png")
    result = runner.invoke(app, ["data", "import-folder", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    assert_refused(result, "c0", "two image files for one case")


def test_ids_differing_only_in_case_are_kept_apart(tiny_run, tmp_path):
    run, _ = tiny_run
    data = write_synthetic(tmp_path / "data", n_cases=8, size=32, seed=0)
    with_ids(data, "train", ["Lesion", "lesion", "LESION"])
    out = tmp_path / "out"
    result = sample_cli("--model", run, "--data", data, "--split", "train", "--out", out, "--n-samples", "1",
                        "--nfe", "1", "--no-progress", "--no-png")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "cases").glob("*.npz"))
    assert len({n.lower() for n in names}) == 3, names
