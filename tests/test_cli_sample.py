"""`ssb-fast sample`: the folder it writes, `evaluate` right after it, --continue, image files, exit codes,
and an interrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import sample_cli
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.sampler import Sampler
from ssb_fast.samples_io import read_samples_npz

runner = CliRunner()
FAST = ["--n-samples", "4", "--nfe", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


sample = sample_cli


def test_sample_a_dataset_then_evaluate_it(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "out"
    result = sample("--model", run_dir, "--data", data, "--split", "train", "--cases", 3, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "sampled 3 case(s) x 4 masks, NFE 3" in result.output and "masks/s" in result.output
    assert f"next: ssb-fast evaluate {out}" in result.output
    assert sorted(p.name for p in (out / "cases").iterdir()) == [
        f"synthetic_0000{i}{ext}" for i in (0, 2, 3) for ext in ("", ".npz", ".png")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["masks"] == 12 and summary["device"].startswith("cpu")
    assert all(case["seconds"] > 0 and case["network_rows"] > 0 for case in summary["cases"])
    assert json.loads((out / "args.json").read_text())["input"]["cases"] == 3
    evaluated = runner.invoke(app, ["evaluate", str(out), "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "N = 4 samples per scan, M ≤ 4 experts" in evaluated.output and "synthetic_00003" in evaluated.output


def test_json_output_and_a_run_file_path(run, tmp_path):
    run_dir, data = run
    result = sample("--model", run_dir / "model.safetensors", "--data", data, "--split", "train",
                    "--case-ids", "synthetic_00002,synthetic_00000", "--out", tmp_path / "out", "--json", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [c["case_id"] for c in summary["cases"]] == ["synthetic_00002", "synthetic_00000"]
    assert summary["nfe"] == 3 and summary["n_samples"] == 4 and summary["masks_per_s"] > 0


def test_continue_skips_finished_cases_and_gives_the_same_samples(run, tmp_path):
    run_dir, data = run
    base = ["--model", run_dir, "--data", data, "--split", "train", *FAST]
    assert sample(*base, "--cases", 4, "--out", tmp_path / "fresh").exit_code == 0
    assert sample(*base, "--cases", 2, "--out", tmp_path / "out").exit_code == 0
    before = (tmp_path / "out" / "cases" / "synthetic_00000.npz").stat().st_mtime_ns
    result = sample(*base, "--cases", 4, "--out", tmp_path / "out", "--continue", "--max-batch", 3)
    assert result.exit_code == 0, result.output
    assert "sampled 2 case(s)" in result.output and "reused 2 finished case(s)" in result.output
    assert (tmp_path / "out" / "cases" / "synthetic_00000.npz").stat().st_mtime_ns == before
    a, b = read_samples_npz(tmp_path / "fresh"), read_samples_npz(tmp_path / "out")
    assert np.array_equal(a.samples, b.samples) and a.case_ids == b.case_ids
    again = sample(*base, "--cases", 4, "--out", tmp_path / "out", "--continue", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["reused_cases"] == 4
    other = sample(*base, "--cases", 4, "--out", tmp_path / "out", "--continue", "--guidance", 2)
    assert other.exit_code == 2 and "guidance 1.0 there, 2.0 now" in other.output
    plain = sample(*base, "--cases", 4, "--out", tmp_path / "out")
    assert plain.exit_code == 2 and "pass --continue" in plain.output


def test_image_files(run, tmp_path):
    run_dir, _ = run
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", (rng.random((32, 32)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    # --images FILE... : the shell expands a glob into several words after one --images
    result = sample("--model", run_dir, "--images", tmp_path / "a.png", tmp_path / "b.npy", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "next: ssb-fast evaluate" not in result.output
    got = read_samples_npz(out)
    assert got.case_ids == ["a", "b"] and got.experts.shape == (2, 0, 32, 32)
    assert (out / "cases" / "a.png").exists()
    evaluated = runner.invoke(app, ["evaluate", str(out), "--device", "cpu"])
    assert evaluated.exit_code == 3 and "M = 0" in evaluated.output and "Traceback" not in evaluated.output
    folder = sample("--model", run_dir, "--images", tmp_path, "--out", tmp_path / "all", *FAST)  # a folder of images
    assert folder.exit_code == 0 and read_samples_npz(tmp_path / "all").case_ids == ["a", "b"]


def test_bad_model_exits_4(run, tmp_path):
    run_dir, data = run
    base = ["--data", data, "--out", tmp_path / "out", *FAST]
    missing = sample("--model", tmp_path / "nowhere", *base)
    assert missing.exit_code == 4 and "no such checkpoint file" in missing.output
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes((run_dir / "model.safetensors").read_bytes()[:5000])
    result = sample("--model", corrupt, *base)
    assert result.exit_code == 4 and "truncated or corrupt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_data_exits_3(run, tmp_path):
    run_dir, _ = run
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    result = sample("--model", run_dir, "--images", tmp_path / "rgb.png", "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 3 and "rgb.png" in result.output and "3 channel(s); the model expects 1" in result.output
    result = sample("--model", run_dir, "--data", tmp_path / "nowhere", "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 3 and "no such dataset folder" in result.output


@pytest.mark.parametrize("args, message", [
    (["--demo", "--model", "M"], "--demo samples the bundled model"),
    (["--demo", "--images", "x.png"], "--demo samples the bundled model"),
    (["--data", "D", "--out", "O"], "--model is required"),
    (["--model", "M", "--out", "O"], "no scans given"),
    (["--model", "M", "--data", "D", "--images", "x.png", "--out", "O"], "not both"),
    (["--model", "M", "--data", "D", "--cases", "2", "--case-ids", "a", "--out", "O"], "not both"),
    (["--model", "M", "--images", "x.png", "--cases", "2", "--out", "O"], "choose scans of --data"),
    (["--model", "M", "--data", "D"], "--out OUT is required"),
    (["--model", "M", "--data", "D", "--out", "O", "--n-samples", "0"], "--n-samples"),
    (["--model", "M", "--data", "D", "--out", "O", "--nfe", "0"], "--nfe"),
    (["--model", "M", "--data", "D", "--out", "O", "--guidance", "-1"], "--guidance"),
    (["--model", "M", "--data", "D", "--out", "O", "--max-batch", "0"], "--max-batch"),
    (["--model", "M", "--data", "D", "--out", "O", "--labels", "all"], "--labels"),
])
def test_bad_options_exit_2_before_any_work(tmp_path, args, message):
    result = sample(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_options_found_with_the_model_exit_2(run, tmp_path):
    run_dir, data = run
    base = ["--model", run_dir, "--data", data, "--split", "train", "--out", tmp_path / "out", *FAST]
    result = sample(*base, "--device", "tpu")
    assert result.exit_code == 2 and "device must be auto, cpu, cuda or cuda:N" in result.output
    result = sample(*base, "--cuda-graphs")
    assert result.exit_code == 2 and "cuda_graphs needs a CUDA device" in result.output
    result = sample(*base, "--case-ids", "synthetic_00000,nope")
    assert result.exit_code == 2 and "no case 'nope' in split 'train'" in result.output
    result = sample(*base, "--nfe", 1000)
    assert result.exit_code == 2 and "nfe must be an int in [1, 999]" in result.output
    assert not (tmp_path / "out").exists()


def test_ctrl_c_keeps_the_finished_cases(run, tmp_path, monkeypatch):
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
    args = ["--model", run_dir, "--data", data, "--split", "train", "--cases", 3, "--max-batch", 4, "--out", out, *FAST]
    result = sample(*args)
    assert result.exit_code == 130
    assert "interrupted: 1 finished case file(s) kept" in result.output and "--continue" in result.output
    assert [p.name for p in (out / "cases").glob("*.npz")] == ["synthetic_00000.npz"]
    monkeypatch.setattr(Sampler, "sample", original)
    result = sample(*args, "--continue")
    assert result.exit_code == 0 and "reused 1 finished case(s)" in result.output
    assert read_samples_npz(out).n_scans == 3
