"""`ssb-fast evaluate` and the samples file it reads: table, JSON, metrics.json, bad input, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.metrics import evaluate
from ssb_fast.samples_io import SAMPLES_FILE, SamplesFormatError, read_samples_npz, write_samples_npz

runner = CliRunner()
METRICS = ("ged", "d_max", "d_a", "s_c", "ci", "hm_iou", "ddi_e", "ddi_g")


def make_set(batch=3, n=6, m=4, size=(9, 7), seed=0):
    rng = np.random.default_rng(seed)
    samples = (rng.random((batch, n, *size)) < 0.35).astype(np.uint8)
    experts = (rng.random((batch, m, *size)) < 0.35).astype(np.uint8)
    present = np.ones((batch, m), dtype=bool)
    present[1, 3] = False
    experts[1, 3] = 0
    case_ids = [f"LIDC-{i:04d}" for i in range(batch)]
    return samples, experts, present, case_ids


@pytest.fixture
def samples_dir(tmp_path):
    folder = tmp_path / "run"
    write_samples_npz(folder, *make_set())
    return folder


def test_samples_file_round_trip(tmp_path):
    samples, experts, present, case_ids = make_set()
    path = write_samples_npz(tmp_path / "out", samples, experts, present, case_ids)
    assert path == tmp_path / "out" / SAMPLES_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [SAMPLES_FILE]  # no temp file left behind
    got = read_samples_npz(tmp_path / "out")
    assert np.array_equal(got.samples, samples) and got.samples.dtype == np.uint8
    assert np.array_equal(got.experts, experts) and np.array_equal(got.present, present)
    assert got.case_ids == case_ids and got.n_scans == 3
    with np.load(path, allow_pickle=False) as raw:  # the documented layout, readable without pickle
        assert raw["samples"].dtype == np.uint8 and raw["present"].dtype == np.bool_
        assert raw["case_ids"].dtype.kind == "U"


def test_failed_write_keeps_the_previous_file(tmp_path):
    samples, experts, present, case_ids = make_set()
    path = write_samples_npz(tmp_path, samples, experts, present, case_ids)
    before = path.read_bytes()
    with pytest.raises(SamplesFormatError, match="'samples' must be binary"):
        write_samples_npz(tmp_path, samples * 3, experts, present, case_ids)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAMPLES_FILE]


def test_evaluate_prints_table_and_writes_metrics_json(samples_dir):
    result = runner.invoke(app, ["evaluate", str(samples_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "N = 6 samples per scan" in out and "3 scan(s)" in out
    assert "IoU(∅,∅) = Dice(∅,∅) = 1" in out and "S_c = 1 when the expert union is empty" in out
    for case in ("LIDC-0000", "LIDC-0001", "LIDC-0002", "mean"):
        assert case in out
    report = json.loads((samples_dir / "metrics.json").read_text())
    samples, experts, present, _ = make_set()
    want = evaluate(samples, experts, present)
    assert report["n_samples"] == 6 and report["n_scans"] == 3 and report["n_experts_max"] == 4
    assert [s["n_experts"] for s in report["scans"]] == [4, 3, 4]
    for key in METRICS:
        assert [s[key] for s in report["scans"]] == pytest.approx(want[key].tolist(), abs=1e-12)
        assert report["mean"][key] == pytest.approx(float(want[key].mean()), abs=1e-12)
    # The table shows the same numbers, rounded.
    row = next(line for line in out.splitlines() if line.startswith("LIDC-0001"))
    assert row.split()[1] == "3"
    assert float(row.split()[2]) == pytest.approx(want["ged"][1].item(), abs=5e-5)
    assert report["conventions"]["s_c_when_expert_union_empty"] == 1.0


def test_json_flag_prints_the_written_report(samples_dir, tmp_path):
    target = tmp_path / "elsewhere" / "m.json"
    result = runner.invoke(app, ["evaluate", str(samples_dir / SAMPLES_FILE), "--json", "--out", str(target),
                                 "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(target.read_text())
    assert not (samples_dir / "metrics.json").exists()
    # Chunks of 2 scans give the same numbers as one call over all 3.
    samples, experts, present, _ = make_set()
    want = evaluate(samples, experts, present)["ci"].tolist()
    assert [s["ci"] for s in printed["scans"]] == pytest.approx(want)


def test_plain_npz_with_only_samples_and_experts(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "mine.npz"
    experts = (rng.random((2, 6, 6)) < 0.5).astype(np.float32)
    np.savez(path, samples=rng.random((5, 6, 6)) < 0.5, experts=experts)
    result = runner.invoke(app, ["evaluate", str(path), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_scans"] == 1 and report["scans"][0]["case_id"] == "scan0"
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("arrays, match", [
    ({"samples": np.zeros((1, 2, 3, 3))}, "missing array\\(s\\) experts"),
    ({"samples": np.full((1, 2, 3, 3), 2), "experts": np.zeros((1, 1, 3, 3))}, "'samples' must be binary"),
    ({"samples": np.array([[[[np.nan]]]]), "experts": np.zeros((1, 1, 1, 1))},
     "'samples' must be binary.*nan"),
    ({"samples": np.zeros((1, 2, 3, 3)), "experts": np.zeros((1, 1, 3, 4))}, "does not match 'samples'"),
    ({"samples": np.zeros((1, 0, 3, 3)), "experts": np.zeros((1, 1, 3, 3))}, "N = 0"),
    ({"samples": np.zeros((1, 2, 3, 3)), "experts": np.zeros((1, 0, 3, 3))}, "M = 0"),
    ({"samples": np.zeros((2, 2, 3, 3)), "experts": np.zeros((2, 2, 3, 3)),
      "present": np.array([[True, True], [False, False]])}, "scan 1 has no present expert"),
    ({"samples": np.zeros((1, 2, 3, 3)), "experts": np.zeros((1, 1, 3, 3)), "present": np.ones((2, 1), bool)},
     "'present' must be \\(B, M\\)"),
    ({"samples": np.zeros((2, 3, 3, 3, 1)), "experts": np.zeros((1, 1, 3, 3))},
     "'samples' must be \\(B, N, H, W\\)"),
    ({"samples": np.zeros((1, 2, 3, 3)), "experts": np.zeros((1, 1, 3, 3)), "case_ids": np.array([1.5])},
     "'case_ids' must be 1 strings"),
])
def test_bad_input_exits_3_with_a_clear_error(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    result = runner.invoke(app, ["evaluate", str(path), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert str(path) in result.output
    import re

    assert re.search(match, result.output), result.output


def test_missing_and_unreadable_files_exit_3(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 3 and "a samples folder must hold samples.npz" in result.output
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    result = runner.invoke(app, ["evaluate", str(garbage)])
    assert result.exit_code == 3 and "not a readable .npz file" in result.output
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, samples=np.zeros((1, 1, 2, 2)), experts=np.zeros((1, 1, 2, 2)),
             case_ids=np.array([{"id": 1}], dtype=object))
    result = runner.invoke(app, ["evaluate", str(pickled)])
    assert result.exit_code == 3 and "without unpickling" in result.output


def test_bad_arguments_exit_2(samples_dir):
    result = runner.invoke(app, ["evaluate", str(samples_dir), "--device", "tpu"])
    assert result.exit_code == 2 and "device must be auto, cpu, cuda or cuda:N" in result.output
    result = runner.invoke(app, ["evaluate", str(samples_dir), "--batch-size", "0"])
    assert result.exit_code == 2


def test_no_progress_bar_when_not_a_terminal(samples_dir):
    result = runner.invoke(app, ["evaluate", str(samples_dir), "--batch-size", "1", "--device", "cpu"])
    assert result.exit_code == 0
    assert "evaluating" not in result.output  # CliRunner's stderr is not a TTY: no bar
