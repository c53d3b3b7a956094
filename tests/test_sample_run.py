"""The sampling run behind `ssb-fast sample`: same masks as the Sampler, case files, --continue, interruption,
image files, scans that do not fit the model, preview PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssb_fast import Bridge, load_model
from ssb_fast.case_figures import PREVIEW_SAMPLES
from ssb_fast.data import DataFormatError, load
from ssb_fast.sample_folder import (
    ARGS_FILE,
    CASES_DIR,
    LOCK_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    case_file_stems,
    read_case_file,
)
from ssb_fast.sample_inputs import SampleRunError, scans_from_dataset
from ssb_fast.sample_run import sample_dataset, sample_images
from ssb_fast.sampler import Sampler
from ssb_fast.samples_io import SAMPLES_FILE, read_samples_npz

FAST = dict(n_samples=5, nfe=3, device="cpu", progress=False)


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


def test_same_masks_as_the_sampler_whatever_max_batch(run, tmp_path):
    run_dir, data = run
    summary = sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=4, max_batch=3, seed=7,
                             png=False, n_samples=6, nfe=4, device="cpu", progress=False)
    got = read_samples_npz(tmp_path / "out")
    model = load_model(run_dir / "model.safetensors")
    ds = load(data, "train")
    direct = Sampler(model, Bridge(**model.run_config["bridge"]), nfe=4, seed=7, max_batch=64).sample(
        ds.images[:4], 6, case_ids=ds.case_ids[:4])
    assert np.array_equal(got.samples, direct.masks.numpy())
    assert got.case_ids == ds.case_ids[:4]
    assert np.array_equal(got.experts, ds.masks[:4].numpy()) and np.array_equal(got.present, ds.present[:4].numpy())
    with np.load(tmp_path / "out" / SAMPLES_FILE) as raw:
        assert np.array_equal(raw["labels"], direct.labels.numpy())
    assert summary["masks"] == 24 and summary["sampled_cases"] == 4 and summary["groups"] == 4  # ceil(3/6) = 1 scan
    assert summary["network_rows"] > 0 and summary["masks_per_s"] > 0
    # the masks are not all identical: the noise and the labels make them differ
    assert len({m.tobytes() for m in got.samples.reshape(24, -1)}) > 1


def test_folder_layout_and_case_files(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "out"
    summary = sample_dataset(run_dir, data, out, split="train", case_ids=["synthetic_00004", "synthetic_00000"],
                             soft=True, **FAST)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, ARGS_FILE, CASES_DIR, RUN_FILE, SAMPLES_FILE,
                                                     SUMMARY_FILE]
    assert sorted(p.name for p in (out / CASES_DIR).iterdir()) == [
        "synthetic_00000", "synthetic_00000.npz", "synthetic_00000.png",
        "synthetic_00004", "synthetic_00004.npz", "synthetic_00004.png"]
    args = json.loads((out / ARGS_FILE).read_text())
    assert args["n_samples"] == 5 and args["nfe"] == 3 and args["max_batch"] == 32 and args["soft"] is True
    assert args["case_ids"] == ["synthetic_00004", "synthetic_00000"] and args["input"]["split"] == "train"
    trained = json.loads((run_dir / "config.json").read_text())["bridge"]  # the run's bridge, not a default
    assert trained["beta_max"] == 10.0
    assert len(args["model_sha256"]) == 64 and args["bridge"] == trained
    assert json.loads((out / SUMMARY_FILE).read_text()) == json.loads(json.dumps(summary))
    assert [c["case_id"] for c in summary["cases"]] == ["synthetic_00004", "synthetic_00000"]
    case = read_case_file(out / CASES_DIR / "synthetic_00004.npz")
    got = read_samples_npz(out)
    assert got.case_ids == ["synthetic_00004", "synthetic_00000"]
    assert np.array_equal(case["samples"], got.samples[0]) and case["case_id"] == "synthetic_00004"
    assert case["soft"].dtype == np.float16 and case["soft"].shape == (5, 32, 32)
    sure = np.abs(case["soft"].astype(np.float32)) > 1e-3  # x0̂ > 0 is the mask, up to float16 rounding near 0
    assert np.array_equal((case["soft"] > 0)[sure], case["samples"].astype(bool)[sure])
    with np.load(out / SAMPLES_FILE) as raw:
        assert raw["soft"].dtype == np.float16 and raw["soft"].shape == (2, 5, 32, 32)


def test_preview_png_shows_scan_experts_samples_mean_and_std(run, tmp_path):
    run_dir, data = run
    sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=1, **{**FAST, "n_samples": 9})
    png = Image.open(next((tmp_path / "out" / CASES_DIR).glob("*.png")))
    tiles = 1 + 4 + PREVIEW_SAMPLES + 2  # scan, 4 experts, the first samples, mean, std
    assert png.size == (tiles * (128 + 2), 16 + 128 + 16)  # 32 px scans drawn 4x
    pixels = np.asarray(png.convert("RGB"))
    scan_tile = pixels[16:144, 0:128]
    assert scan_tile.std() > 0  # the scan itself, not a blank tile


def test_continue_reuses_finished_cases_and_gives_the_same_file(run, tmp_path, monkeypatch):
    run_dir, data = run
    fresh = sample_dataset(run_dir, data, tmp_path / "fresh", split="train", cases=5, **FAST)
    sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=3, **FAST)
    (tmp_path / "out" / CASES_DIR / "synthetic_00002.png").unlink()  # a lost preview is drawn again
    sampled = []
    original = Sampler.sample

    def spy(self, scans, n_samples, case_ids=None, **kw):
        sampled.extend(case_ids)
        return original(self, scans, n_samples, case_ids=case_ids, **kw)

    monkeypatch.setattr(Sampler, "sample", spy)
    summary = sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=5, resume=True, **FAST)
    assert summary["reused_cases"] == 3 and summary["sampled_cases"] == 2
    assert sampled == [c["case_id"] for c in fresh["cases"][3:]]
    assert [c["reused"] for c in summary["cases"]] == [True, True, True, False, False]
    assert (tmp_path / "out" / CASES_DIR / "synthetic_00002.png").exists()
    a, b = read_samples_npz(tmp_path / "fresh"), read_samples_npz(tmp_path / "out")
    assert np.array_equal(a.samples, b.samples) and np.array_equal(a.experts, b.experts) and a.case_ids == b.case_ids


def test_continue_refuses_other_settings_and_a_plain_rerun_refuses_the_folder(run, tmp_path):
    run_dir, data = run
    sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, **FAST)
    with pytest.raises(SampleRunError, match="pass --continue"):
        sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, **FAST)
    with pytest.raises(SampleRunError, match="nfe 3 there, 4 now"):
        sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, resume=True, **{**FAST, "nfe": 4})
    with pytest.raises(SampleRunError, match="first_step_noise 1.0 there, 1.5 now"):
        sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, resume=True, first_step_noise=1.5,
                       **FAST)
    # a folder written before the setting existed was sampled with 1 and continues at 1
    args = json.loads((tmp_path / "out" / ARGS_FILE).read_text())
    del args["first_step_noise"]
    (tmp_path / "out" / ARGS_FILE).write_text(json.dumps(args))
    summary = sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, resume=True, **FAST)
    assert summary["reused_cases"] == 2 and summary["first_step_noise"] == 1.0
    # a case file from other settings is refused even without args.json beside it, and no file changes
    (tmp_path / "out" / ARGS_FILE).unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "out" / CASES_DIR).rglob("*") if p.is_file()}
    with pytest.raises(SampleRunError, match="seed 0 there, 1 now"):
        sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=2, resume=True, seed=1, **FAST)
    assert not (tmp_path / "out" / ARGS_FILE).exists()
    assert {p: p.read_bytes() for p in (tmp_path / "out" / CASES_DIR).rglob("*") if p.is_file()} == before


def test_interrupted_run_keeps_the_finished_cases(run, tmp_path, monkeypatch):
    run_dir, data = run
    calls = []
    original = Sampler.sample

    def interrupt_second_group(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(Sampler, "sample", interrupt_second_group)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # max_batch = n_samples: one scan per group
        sample_dataset(run_dir, data, out, split="train", cases=3, max_batch=5, **FAST)
    assert sorted(p.name for p in (out / CASES_DIR).iterdir()) == [
        "synthetic_00000", "synthetic_00000.npz", "synthetic_00000.png"]
    assert not (out / SAMPLES_FILE).exists()
    assert read_case_file(out / CASES_DIR / "synthetic_00000.npz")["samples"].shape == (5, 32, 32)
    monkeypatch.setattr(Sampler, "sample", original)
    summary = sample_dataset(run_dir, data, out, split="train", cases=3, max_batch=5, resume=True, **FAST)
    assert summary["reused_cases"] == 1 and summary["sampled_cases"] == 2
    fresh = sample_dataset(run_dir, data, tmp_path / "fresh", split="train", cases=3, **FAST)
    assert fresh["n_cases"] == 3
    assert np.array_equal(read_samples_npz(out).samples, read_samples_npz(tmp_path / "fresh").samples)


def test_image_files_have_no_experts(run, tmp_path):
    run_dir, _ = run
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "scan_a.png")
    pixels_b = (rng.random((32, 32)) * 255).astype(np.uint8)
    np.save(tmp_path / "scan_b.npy", pixels_b)
    summary = sample_images(run_dir, [tmp_path / "scan_a.png", tmp_path / "scan_b.npy"], tmp_path / "out", **FAST)
    got = read_samples_npz(tmp_path / "out")
    assert got.case_ids == ["scan_a", "scan_b"] and not got.has_experts and not summary["has_experts"]
    assert got.samples.shape == (2, 5, 32, 32) and got.experts.shape == (2, 0, 32, 32) and got.present.shape == (2, 0)
    args = json.loads((tmp_path / "out" / ARGS_FILE).read_text())
    assert args["input"]["kind"] == "images" and args["input"]["image_scaling"]["rule"] == "8-bit"
    # 8-bit pixels map 0..255 onto [-1, 1]; then the masks are the Sampler's for that scan and case id
    model = load_model(run_dir / "model.safetensors")
    scan = torch.from_numpy((pixels_b / 255.0 * 2 - 1).astype(np.float32))[None, None]
    direct = Sampler(model, Bridge(**model.run_config["bridge"]), nfe=3).sample(scan, 5, case_ids=["scan_b"])
    assert np.array_equal(got.samples[1], direct.masks[0].numpy())
    # a file changed since: its finished case belongs to other pixels and is not reused
    np.save(tmp_path / "scan_b.npy", 255 - pixels_b)
    with pytest.raises(SampleRunError, match="scan_b.npz was sampled from a different scan 'scan_b'"):
        sample_images(run_dir, [tmp_path / "scan_a.png", tmp_path / "scan_b.npy"], tmp_path / "out", resume=True,
                      **FAST)


def test_scans_that_do_not_fit_the_model(run, tmp_path):
    run_dir, data = run
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataFormatError, match=r"rgb\.png.*3 channel\(s\); the model expects 1"):
        sample_images(run_dir, [tmp_path / "rgb.png"], tmp_path / "out", **FAST)
    np.save(tmp_path / "big.npy", np.zeros((48, 48), dtype=np.float32))
    with pytest.raises(DataFormatError, match=r"big\.npy.*48x48 pixels; the model was trained on 32x32"):
        sample_images(run_dir, [tmp_path / "big.npy"], tmp_path / "out", **FAST)
    with pytest.raises(DataFormatError, match="no such image file"):
        sample_images(run_dir, [tmp_path / "missing.png"], tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()  # nothing written before the scans were checked
    with pytest.raises(SampleRunError, match="no case 'nope' in split 'train'"):
        scans_from_dataset(data, "train", case_ids=["nope"])
    with pytest.raises(SampleRunError, match="n_samples must be an int >= 1"):
        sample_dataset(run_dir, data, tmp_path / "out", **{**FAST, "n_samples": 0})
    with pytest.raises(SampleRunError, match="nfe must be an int in \\[1, 999\\]"):
        sample_dataset(run_dir, data, tmp_path / "out", split="train", **{**FAST, "nfe": 1000})


def test_progress_advances_once_per_chunk_up_to_every_mask(run, tmp_path, monkeypatch):
    import contextlib

    import ssb_fast.sample_run as sample_run

    steps, totals = [], []

    @contextlib.contextmanager
    def recording_bar(description, total, enabled=True, fields="", unit="it"):
        totals.append(total)
        yield lambda n=1, **kw: steps.append(n)

    monkeypatch.setattr(sample_run, "progress_bar", recording_bar)
    run_dir, data = run
    sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=3, max_batch=4, png=False, **FAST)
    assert totals == [15] and sum(steps) == 15
    assert steps == [4, 1, 4, 1, 4, 1]  # one group per scan (ceil(4/5) = 1): chunks of 4 and 1 masks


def test_case_file_stems_are_safe_and_unique():
    stems = case_file_stems(["LIDC/0001 a", "LIDC_0001_a", "lidc_0001_a", "..hidden", "", "ok-1.2"])
    assert stems == ["LIDC_0001_a", "LIDC_0001_a-2", "lidc_0001_a-3", "hidden", "case", "ok-1.2"]


def test_samples_file_without_experts_and_with_extra_arrays(tmp_path):
    from ssb_fast.samples_io import SamplesFormatError, write_samples_npz

    samples = np.ones((2, 3, 4, 4), dtype=np.uint8)
    no_experts = np.zeros((2, 0, 4, 4), dtype=np.uint8)
    write_samples_npz(tmp_path, samples, no_experts, np.zeros((2, 0), bool), ["a", "b"],
                      extra={"labels": np.arange(6).reshape(2, 3)})
    got = read_samples_npz(tmp_path)
    assert not got.has_experts and got.present.shape == (2, 0) and got.case_ids == ["a", "b"]
    with np.load(tmp_path / SAMPLES_FILE) as raw:
        assert np.array_equal(raw["labels"], np.arange(6).reshape(2, 3))
    with pytest.raises(SamplesFormatError, match="extra array 'labels' must be numeric with one row per scan"):
        write_samples_npz(tmp_path / "x.npz", samples, no_experts, extra={"labels": np.zeros(3)})
    with pytest.raises(ValueError, match="would replace a required array"):
        write_samples_npz(tmp_path / "x.npz", samples, no_experts, extra={"present": np.zeros((2, 0))})
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_a_compiled_run_sees_at_most_two_shapes(run, tmp_path, guidance):
    """N = 100, --max-batch 32, 3 scans (one scan per group): the chunk and the shared first step are the
    only row counts dynamo ever traces (partial chunks are padded), and the masks are the eager run's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    run_dir, data = run
    opts = dict(split="train", cases=3, n_samples=100, nfe=2, max_batch=32, guidance=guidance, png=False,
                device="cpu", progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = sample_dataset(run_dir, data, tmp_path / "compiled", compile="eager", **opts)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    halves = 1 if guidance == 1.0 else 2
    assert compiled["compiled_shapes"] == [8, 32 * halves] and compiled["groups"] == 3
    assert compiled["padding_rows"] > 0 and compiled["rows_per_step"] == f"{halves}B"
    eager = sample_dataset(run_dir, data, tmp_path / "eager", compile=False, **opts)
    assert eager["padding_rows"] == 0 and eager["compiled_shapes"] == []
    assert np.array_equal(read_samples_npz(tmp_path / "compiled").samples, read_samples_npz(tmp_path / "eager").samples)
    assert set(compiled) >= {"warmup_seconds", "seconds", "masks_per_s"} and eager["warmup_seconds"] == 0


@pytest.mark.slow
def test_inductor_compiles_two_shapes(run, tmp_path):
    """The same count with the real Inductor backend (minutes of C++ compilation on a CPU)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    run_dir, data = run
    torch._dynamo.reset()
    counters.clear()
    summary = sample_dataset(run_dir, data, tmp_path / "out", split="train", cases=3, n_samples=100, nfe=2,
                             max_batch=32, compile=True, png=False, device="cpu", progress=False)
    assert counters["stats"]["unique_graphs"] <= 2 and summary["compiled_shapes"] == [8, 32]
