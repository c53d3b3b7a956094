"""The bundled demo: `ssb-fast sample` with no arguments writes ./ssb-out and prints each scan's metrics
beside the no-diversity reference; the assets are complete and small; the exporter writes what the demo
reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import sample_cli
from safetensors import safe_open

from ssb_fast.data import load
from ssb_fast.demo import DEMO_DIR, DEMO_SPLIT, find_demo
from ssb_fast.metrics import evaluate

BUDGET = ["--nfe", "2", "-n", "4"]  # the no-argument command on a tiny budget


def _run_demo(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ssb_fast.cli", "sample", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _majority_ged(experts: np.ndarray, present: np.ndarray, n: int) -> float:
    """GED of n copies of the readers' majority (half or more of the present readers), computed here."""
    votes = experts[present].sum(0)
    vote = ((2 * votes >= present.sum()) & (votes > 0)).astype(np.uint8)
    return float(evaluate(np.repeat(vote[None], n, 0), experts, present)["ged"])


def test_sample_with_no_arguments_writes_ssb_out_and_prints_the_metrics(tmp_path):
    result = _run_demo(tmp_path, *BUDGET)
    assert result.returncode == 0, result.stderr + result.stdout
    out = tmp_path / "ssb-out"
    scans = load(DEMO_DIR / "scans", DEMO_SPLIT)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == 4 and summary["nfe"] == 2 and summary["n_cases"] == len(scans)
    assert (out / "samples.npz").is_file()
    printed = result.stdout
    assert "wrote ssb-out" in printed and "masks/s steady" in printed
    for i, case in enumerate(summary["cases"]):
        assert (out / case["grid"]).is_file() and case["case_id"] == scans.case_ids[i]
        line = next(x for x in printed.splitlines() if x.startswith(case["case_id"] + " "))
        fields = line.split()
        ged, no_div = float(fields[-4]), float(fields[-3])
        assert ged == pytest.approx(case["metrics"]["ged"], abs=5e-4)
        want = _majority_ged(scans.masks[i].numpy(), scans.present[i].numpy(), 4)
        assert no_div == pytest.approx(want, abs=5e-4)
        with np.load(out / case["file"]) as f:
            empty = int((f["samples"].reshape(4, -1).max(1) == 0).sum())
        assert fields[-1] == f"{empty}/4"
    assert "mean over the" in printed and "for no diversity" in printed

    again = _run_demo(tmp_path, *BUDGET)  # ./ssb-out is kept, and the message says how to get a fresh folder
    assert again.returncode == 2 and "--out DIR" in again.stderr + again.stdout
    assert json.loads((out / "summary.json").read_text()) == summary


def test_demo_flag_writes_into_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sample_cli("--demo", "--out", tmp_path / "demo", *BUDGET, "--cases", "2", "--no-png")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "demo" / "summary.json").read_text())["cases"]) == 2
    assert "GED_4" in result.output and not (tmp_path / "ssb-out").exists()


def test_missing_demo_files_are_named(tmp_path, monkeypatch):
    import ssb_fast.demo as demo

    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "nowhere")
    result = sample_cli("--out", tmp_path / "out")
    assert result.exit_code == 1 and "model.safetensors" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_bundled_assets_are_complete_small_and_credited():
    demo = find_demo()
    assert demo.model.stat().st_size < 8_000_000
    with safe_open(str(demo.model), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    scans = load(demo.data, DEMO_SPLIT)
    listed = {s["case_id"]: s for s in demo.manifest["scans"]}
    assert sorted(listed) == sorted(scans.case_ids) and len(scans) >= 4
    assert {s["source"] for s in listed.values()} == {"lidc-contours", "real crop"}
    for s in listed.values():
        assert "CC BY 3.0" in s["licence"] and s["credit"].startswith("Armato") and s["why"]
    assert demo.manifest["model"]["training"]["data"] and demo.nfe >= 1
    check = demo.manifest["model"]["float16_check"]
    assert check["pixels_changed"] < 1e-3


def test_the_exporter_writes_what_the_demo_reads(tiny_run, tmp_path):
    from ssb_fast.bench.nfe import run_nfe_sweep
    from ssb_fast.train.export_demo import export, reader_stats

    from ssb_fast.sample_run import load_for_sampling

    run, data = tiny_run
    net, _, bridge = load_for_sampling(run / "model.safetensors", torch.device("cpu"))
    report = run_nfe_sweep(net, bridge, load(data, "test"), [1], n_samples=2, cases=2)
    (tmp_path / "nfe.json").write_text(json.dumps(report))
    manifest = export(run / "model.safetensors", data, data, tmp_path / "demo", nfe=2,
                      quality=[tmp_path / "nfe.json"], check_samples=2)
    quality = manifest["quality"][0]
    assert quality["rows"][0]["ged"] == report["rows"][0]["ged"] and quality["cases"] == 2
    assert quality["no_diversity_ged"] == report["references"]["no_diversity"]["ged"]
    demo = find_demo(tmp_path / "demo")
    scans = load(demo.data, DEMO_SPLIT)
    assert scans.case_ids == [s["case_id"] for s in manifest["scans"]]
    assert any(cid.startswith("real-") for cid in scans.case_ids)
    for s, masks, present in zip(manifest["scans"], scans.masks.numpy(), scans.present.numpy(), strict=True):
        assert s["readers"] == reader_stats(masks, present)
    assert manifest["model"]["float16_check"]["n_samples"] == 2


def test_reader_stats_counts_marks_and_agreement():
    from ssb_fast.train.export_demo import reader_stats

    masks = np.zeros((4, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[1, 2:4, 2:6] = 1
    stats = reader_stats(masks, np.array([True, True, True, False]))
    assert stats == {"readers": 3, "marked": 2, "mean_iou": 0.5, "area_px": 6.0}
