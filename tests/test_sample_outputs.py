"""What `ssb-fast sample` writes per case and per run: the mean, entropy and majority maps, the grid and heat
maps, each case's metrics against its readers, run.json, and the exit codes of bad input (with earlier
cases' outputs left intact)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import sample_cli
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.case_figures import GRID_COLUMNS, grid_size, grid_tile_size
from ssb_fast.cli import app
from ssb_fast.metrics import METRIC_NAMES, evaluate
from ssb_fast.sample_folder import CASES_DIR, RUN_FILE, SUMMARY_FILE, case_maps, read_case_file
from ssb_fast.samples_io import read_samples_npz

runner = CliRunner()
FAST = ["--n-samples", "8", "--nfe", "2", "--device", "cpu", "--threads", "1"]
MAP_FILES = ["case.json", "entropy.npy", "entropy.png", "grid.png", "majority.npy", "majority.png", "mean.npy",
             "mean.png"]


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


sample = sample_cli


@pytest.fixture(scope="module")
def sampled(run, tmp_path_factory) -> Path:
    run_dir, data = run
    out = tmp_path_factory.mktemp("sampled") / "out"
    result = sample("--model", run_dir, "--data", data, "--split", "train", "--cases", 3, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_maps_are_the_frequency_its_entropy_and_the_majority():
    samples = np.zeros((4, 2, 3), dtype=np.uint8)
    samples[:, 0, 0] = 1            # all four: p = 1
    samples[:2, 0, 1] = 1           # two of four: p = 0.5, a tie, no majority
    samples[:3, 0, 2] = 1           # three of four: p = 0.75
    samples[:1, 1, 0] = 1           # one of four: p = 0.25
    maps = case_maps(samples)
    assert maps["mean"].dtype == np.float32 and maps["entropy"].dtype == np.float32
    assert maps["majority"].dtype == np.uint8
    np.testing.assert_allclose(maps["mean"], [[1, 0.5, 0.75], [0.25, 0, 0]])
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))  # 0.811 bits
    np.testing.assert_allclose(maps["entropy"], [[0, 1, h], [h, 0, 0]], rtol=1e-6)
    assert maps["majority"].tolist() == [[1, 0, 1], [0, 0, 0]]


def test_every_case_has_its_maps_grid_and_metrics(sampled):
    got = read_samples_npz(sampled)
    summary = json.loads((sampled / SUMMARY_FILE).read_text())
    for i, case_id in enumerate(got.case_ids):
        folder = sampled / CASES_DIR / case_id
        assert sorted(p.name for p in folder.iterdir()) == MAP_FILES
        maps = {name: np.load(folder / f"{name}.npy") for name in ("mean", "entropy", "majority")}
        want = case_maps(got.samples[i])
        for name, values in maps.items():
            assert values.shape == (32, 32) and np.array_equal(values, want[name]), name
        # heat maps and the majority mask: one PNG pixel per scan pixel
        for name in ("mean", "entropy", "majority"):
            with Image.open(folder / f"{name}.png") as png:
                assert png.size == (32, 32)
        with Image.open(folder / "majority.png") as png:
            assert np.array_equal(np.asarray(png) > 0, maps["majority"] > 0)
        with Image.open(folder / "mean.png") as png:
            rgb = np.asarray(png.convert("RGB")).astype(int)
        hot, cold = np.unravel_index(np.argmax(maps["mean"]), (32, 32)), np.unravel_index(np.argmin(maps["mean"]),
                                                                                          (32, 32))
        if maps["mean"][hot] > maps["mean"][cold]:  # brighter where more masks mark the pixel
            assert rgb[hot].sum() > rgb[cold].sum()
        record = json.loads((folder / "case.json").read_text())
        scores = evaluate(got.samples[i], got.experts[i], got.present[i])
        assert record["metrics"] == pytest.approx({k: scores[k] for k in record["metrics"]})
        assert set(METRIC_NAMES) <= set(record["metrics"]) and record["metrics"]["n_samples"] == 8
        assert record["uncertainty"]["entropy_bits_mean"] == pytest.approx(float(want["entropy"].mean()))
        assert summary["cases"][i]["metrics"] == record["metrics"]
        assert summary["cases"][i]["grid"] == f"{CASES_DIR}/{case_id}/grid.png"
    assert summary["metrics"]["n_cases"] == 3
    for name in METRIC_NAMES:
        assert summary["metrics"]["mean"][name] == pytest.approx(np.mean([c["metrics"][name]
                                                                          for c in summary["cases"]]))


def test_the_grid_shows_scan_readers_a_dozen_samples_and_the_maps(sampled):
    case_id = read_samples_npz(sampled).case_ids[0]
    with Image.open(sampled / CASES_DIR / case_id / "grid.png") as png:
        assert png.size == grid_size(32, 32, 8, 4, 3)  # N = 8, 4 reader slots, 3 caption lines (with metrics)
        pixels = np.asarray(png.convert("RGB")).astype(int)
    th, tw = grid_tile_size(32, 32)
    assert (th, tw) == (128, 128)  # 32 px scans drawn 4x
    assert png.size[0] == GRID_COLUMNS * (tw + 4) - 4  # six samples to a row
    scan_tile = pixels[22 + 14:22 + 14 + th, :tw]
    assert scan_tile.std() > 0  # the scan, not an empty tile
    # the mean's colour bar: from the top (1) to the bottom (0) it darkens
    maps_top = 22 + 3 * (14 + th + 4) + 14
    bar = pixels[maps_top:maps_top + th, tw + 4 + 5].sum(axis=1)
    assert bar[0] > bar[th // 2] > bar[-1]


def test_evaluate_still_reads_the_folder_and_agrees_with_the_case_files(sampled):
    result = runner.invoke(app, ["evaluate", str(sampled), "--device", "cpu", "--json",
                                 "--out", str(sampled.parent / "metrics.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for scan in report["scans"]:
        record = json.loads((sampled / CASES_DIR / scan["case_id"] / "case.json").read_text())
        for name in METRIC_NAMES:
            assert scan[name] == pytest.approx(record["metrics"][name])


def test_run_json_records_arguments_versions_device_timing_and_layout(sampled):
    record = json.loads((sampled / RUN_FILE).read_text())
    assert record["args"]["n_samples"] == 8 and record["args"]["nfe"] == 2 and record["args"]["device"] == "cpu"
    assert set(record["versions"]) >= {"ssb_fast", "torch", "triton", "cuda", "driver", "python"}
    assert record["versions"]["torch"].startswith("2.") and record["versions"]["ssb_fast"]
    assert set(record["device"]) >= {"device", "name", "uuid", "host"} and record["device"]["device"] == "cpu"
    assert record["wall_seconds"] > 0 and record["seconds"] > 0 and record["warmup_seconds"] >= 0
    assert record["steady_masks_per_s"] == pytest.approx(24 / record["seconds"])
    layout = record["shard_layout"]
    assert layout["num_parts"] == 1 and layout["this_process"]["launcher"] == "single"
    assert [p["part"] for p in layout["parts"]] == ["part-0-of-1"] and layout["parts"][0]["cases"] == 3


def test_image_files_without_readers_get_maps_but_no_metrics(run, tmp_path):
    run_dir, _ = run
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    result = sample("--model", run_dir, "--images", tmp_path / "a.png", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads((out / CASES_DIR / "a" / "case.json").read_text())
    assert record["metrics"] is None and record["n_experts"] == 0
    with Image.open(out / CASES_DIR / "a" / "grid.png") as png:
        assert png.size == grid_size(32, 32, 8, 0, 2)
    assert json.loads((out / SUMMARY_FILE).read_text())["metrics"] is None


def test_no_png_writes_the_maps_and_a_continue_draws_the_pictures(run, tmp_path):
    run_dir, data = run
    args = ["--model", run_dir, "--data", data, "--split", "train", "--cases", 1, "--out", tmp_path / "out", *FAST]
    assert sample(*args, "--no-png").exit_code == 0
    folder = tmp_path / "out" / CASES_DIR / "synthetic_00000"
    assert sorted(p.name for p in folder.iterdir()) == ["case.json", "entropy.npy", "majority.npy", "mean.npy"]
    assert sample(*args, "--continue").exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == MAP_FILES


# ---- bad input -----------------------------------------------------------------------------------------------
def _good_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(path)
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """File -> the words the error must hold besides the file's name."""
    odd = tmp_path / "odd.npy"
    np.save(odd, np.zeros((30, 30), dtype=np.float32))
    big = tmp_path / "big.npy"
    np.save(big, np.zeros((64, 64), dtype=np.float32))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(rgb)
    nan = tmp_path / "nan.npy"
    pixels = np.zeros((32, 32), dtype=np.float32)
    pixels[5, 7] = np.nan
    np.save(nan, pixels)
    return {
        "odd": (odd, "30x30 pixels, which the model's 2 down-sampling steps cannot take (both sides must be "
                     "multiples of 4); it was trained on 32x32 scans and takes only that size. Resize the images "
                     "to 32x32 first, by area averaging (`ssb-fast data import-folder --size 32` does that), or, for a "
                     "model trained at the scans' own pixel size on a smaller field of view, cut out their central "
                     "pixels (`--center-crop 32`)"),
        "big": (big, "64x64 pixels; the model was trained on 32x32 scans and takes only that size"),
        "rgb": (rgb, "3 channel(s); the model expects 1"),
        "nan": (nan, "1 NaN/Inf value(s)"),
    }


@pytest.mark.parametrize("which", ["odd", "big", "rgb", "nan"])
def test_bad_scans_exit_3_naming_the_file_and_keep_earlier_cases(run, tmp_path, which):
    run_dir, _ = run
    good = _good_image(tmp_path / "good.png")
    out = tmp_path / "out"
    assert sample("--model", run_dir, "--images", good, "--out", out, *FAST).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad, words = _bad_inputs(tmp_path)[which]
    result = sample("--model", run_dir, "--images", good, bad, "--out", out, "--continue", *FAST)
    assert result.exit_code == 3, result.output
    assert f"error: {bad}" in result.output and words in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_output_folder_that_is_a_file_exits_3(run, tmp_path):
    run_dir, data = run
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "inside"):
        result = sample("--model", run_dir, "--data", data, "--split", "train", "--cases", 1, "--out", out, *FAST)
        assert result.exit_code == 3, result.output
        assert f"{tmp_path / 'taken'}: exists and is not a folder" in result.output
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_old_case_files_with_timings_still_read(tmp_path):
    """Case files of the previous version carried a `stats` string; they are still reused."""
    arrays = {"samples": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.int64),
              "experts": np.zeros((1, 4, 4), np.uint8), "present": np.ones(1, bool), "case_id": np.array("a"),
              "scan_digest": np.array("d"), "settings": np.array("{}"), "stats": np.array('{"seconds": 1.0}')}
    np.savez_compressed(tmp_path / "a.npz", **arrays)
    case = read_case_file(tmp_path / "a.npz")
    assert case["case_id"] == "a" and "stats" not in case and case["settings"] == {}


def test_run_record_names_a_gpu_by_name_and_uuid(monkeypatch):
    """The CUDA branch of the run record, with torch's and NVML's answers stood in (no GPU needed)."""
    import torch

    import ssb_fast.telemetry as telemetry
    from ssb_fast.run_record import device_record, versions

    class Props:
        name, uuid = "NVIDIA H200", "58e4fd8e-0000-1111-2222-333344445555"
        major, minor, total_memory = 9, 0, 141 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    record = device_record(torch.device("cuda", 3))
    assert record["device"] == "cuda:3" and record["name"] == "NVIDIA H200" and record["capability"] == "sm_90"
    assert record["uuid"] == "GPU-58e4fd8e-0000-1111-2222-333344445555" and record["memory_gib"] == 141.0
    monkeypatch.setattr(telemetry, "gpu_inventory", lambda: ([{"driver": "570.86.15"}], None))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    assert versions(torch.device("cuda", 0))["driver"] == "570.86.15"
    assert versions(torch.device("cpu"))["driver"] is None
