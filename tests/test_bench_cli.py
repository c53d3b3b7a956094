"""`ssb-fast bench nfe | throughput | gpu-check` at tiny sizes: the files, their fields, the exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ssb_fast.cli import app

runner = CliRunner()


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


def test_bench_nfe_writes_the_table_the_references_and_the_plot(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "nfe"
    result = runner.invoke(app, ["bench", "nfe", "--model", str(run_dir), "--data", str(data), "--split", "train",
                                 "--nfe", "2,1", "-n", "3", "--cases", "4", "--device", "cpu", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "nfe.json").read_text())
    assert [r["nfe"] for r in report["rows"]] == [1, 2] and report["n_samples"] == 3
    picks = report["data"]["case_indices"]
    assert len(picks) == 4 and picks[0] == 0 and picks[-1] == report["data"]["split_cases"] - 1  # spread
    for row in report["rows"]:
        assert {"ged", "d_max", "d_a", "s_c", "ci", "hm_iou", "ddi_e", "ddi_g"} <= set(row)
        assert row["ged"]["se"] >= 0 and row["masks_per_s"] > 0
        ratio = row["ged_ratio_to_no_diversity"]
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert set(report["references"]) == {"no_diversity", "consensus", "readers"}
    assert all(ref["ged"]["mean"] >= 0 and 0 <= ref["empty_rate"] <= 1 for ref in report["references"].values())
    assert (out / "nfe.md").read_text().startswith("# NFE against quality")
    for row in report["rows"]:  # the non-empty samples' GED covers only the subset's cases that have one
        for name, shapes in row["subsets_nonempty"].items():
            assert 0 <= shapes["n"] <= report["data"]["subset_sizes"][name]
            assert shapes["n"] == 0 or shapes["ged"] >= -1e-9
    assert "non-empty samples only" in (out / "nfe.md").read_text()
    cases = report["cases"]  # per case: its scores, so that the costliest cases can be found
    assert len({c["case_id"] for c in cases}) == len(cases) == len(picks)
    for row in report["rows"]:
        nfe = str(row["nfe"])
        assert sum(c["ged"][nfe] for c in cases) / len(cases) == pytest.approx(row["ged"]["mean"])
        assert sum(c["empty"][nfe] for c in cases) / len(cases) == pytest.approx(row["empty_rate"])
    no_div = report["references"]["no_diversity"]["ged"]["mean"]
    assert sum(c["no_diversity_ged"] for c in cases) / len(cases) == pytest.approx(no_div)
    assert all(0 <= c["readers_marked"] <= c["readers"] <= 4 for c in cases)
    assert "furthest above no diversity at NFE 2" in (out / "nfe.md").read_text()
    every_marked = [c for c in cases if c["readers_marked"] == c["readers"]]
    for row in report["rows"]:  # the all-marked ratio is over exactly those cases, and nfe.md quotes it
        if not every_marked:
            assert "ged_ratio_all_readers_marked" not in row
            continue
        marked = row["ged_ratio_all_readers_marked"]
        assert marked["ratio"] == pytest.approx(sum(c["ged"][str(row["nfe"])] for c in every_marked)
                                                / sum(c["no_diversity_ged"] for c in every_marked))
        assert f"NFE {row['nfe']} {marked['ratio']:.2f} ({marked['low']:.2f}–" in (out / "nfe.md").read_text()
    assert (out / "nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "N = 3" in result.output


def test_bench_nfe_names_how_the_images_were_drawn(run, tmp_path):
    """Two builds of lidc-contours share masks and path but not pixels: the report says which images it scored."""
    import shutil

    run_dir, data = run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta.setdefault("build", {})["appearance"] = "nodule solidity drawn"
    (copy / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "nfe"
    result = runner.invoke(app, ["bench", "nfe", "--model", str(run_dir), "--data", str(copy), "--split", "train",
                                 "--nfe", "1", "-n", "2", "--cases", "2", "--device", "cpu", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "nfe.json").read_text())["data"]["appearance"] == "nodule solidity drawn"
    assert "(images: nodule solidity drawn)" in (out / "nfe.md").read_text()


def test_bench_nfe_in_parts_writes_the_report_one_process_writes(run, tmp_path):
    """Two parts into one folder: the first waits, the second assembles; every score equals the single
    process's (the noise is keyed by case), and a part sampled with other settings is refused by name."""
    run_dir, data = run
    common = ["bench", "nfe", "--model", str(run_dir), "--data", str(data), "--split", "train", "--nfe", "1,2",
              "-n", "3", "--cases", "5", "--device", "cpu", "--no-progress"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, [*common, "--out", str(whole)]).exit_code == 0
    parts = tmp_path / "parts"
    first = runner.invoke(app, [*common, "--out", str(parts), "--num-parts", "2", "--part-id", "1"])
    assert first.exit_code == 0, first.output
    assert "waiting for part(s) 0" in first.output and not (parts / "nfe.json").exists()
    second = runner.invoke(app, [*common, "--out", str(parts), "--num-parts", "2", "--part-id", "0"])
    assert second.exit_code == 0, second.output
    one, two = (json.loads((d / "nfe.json").read_text()) for d in (whole, parts))
    assert two["data"]["parts"] == 2 and two["data"]["case_indices"] == one["data"]["case_indices"]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("ged", "d_max", "hm_iou", "ddi_e"):
            assert a[key] == b[key], key
        assert a["empty_rate"] == b["empty_rate"] and a["empty_rate_by_label"] == b["empty_rate_by_label"]
        assert a["ged_ratio_to_no_diversity"] == b["ged_ratio_to_no_diversity"]
        assert a["subsets"] == b["subsets"] and a["subsets_nonempty"] == b["subsets_nonempty"]  # case order kept
    assert one["references"] == two["references"]
    assert "sampled in 2 parts" in (parts / "nfe.md").read_text()

    other = runner.invoke(app, [*common, "--seed", "1", "--out", str(parts), "--num-parts", "2", "--part-id", "0"])
    assert other.exit_code == 3 and "nfe-part-1-of-2.npz" in other.output and "seed" in other.output
    other = runner.invoke(app, [*common, "--first-step-noise", "2", "--out", str(parts), "--num-parts", "2",
                                "--part-id", "0"])
    assert other.exit_code == 3 and "first_step_noise" in other.output
    lost = runner.invoke(app, [*common, "--num-parts", "2", "--part-id", "0"])
    assert lost.exit_code == 2 and "--out" in lost.output
    alone = runner.invoke(app, [*common, "--out", str(parts), "--num-parts", "2"])
    assert alone.exit_code == 2 and "go together" in alone.output


def test_bench_throughput_reports_every_sampler_and_the_ratios(tmp_path):
    out = tmp_path / "tp"
    result = runner.invoke(app, ["bench", "throughput", "--preset", "tiny", "--size", "16", "-n", "3", "--nfe", "2",
                                 "--guidance", "1.5,1", "--rounds", "1", "--sampler", "ours,ours-2B,eager",
                                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "throughput.json").read_text())
    got = [(r["sampler"], r["guidance"], r["rows_per_step"]) for r in report["rows"]]
    assert got == [("ours", 1.5, "2B"), ("eager", 1.5, "2B"), ("ours", 1.0, "B"), ("ours-2B", 1.0, "2B"),
                   ("eager", 1.0, "2B")]
    rows = {(r["sampler"], r["guidance"]): r for r in report["rows"]}
    # network rows: ours at w = 1 evaluates B rows (+ the shared first step), the eager loop 2B every step
    assert rows[("eager", 1.0)]["network_rows"] == 2 * 3 * 2
    assert rows[("ours", 1.0)]["network_rows"] == 3 + 3  # 3 distinct (scan, expert) pairs, then 3 rows
    assert rows[("eager", 1.0)]["vs_eager"] == pytest.approx(1.0)
    assert all(r["masks_per_s"] > 0 and r["telemetry"]["gpu"] is None for r in report["rows"])
    assert "| ours |" in (out / "throughput.md").read_text()


def test_bench_bad_options_exit_2_and_gpu_check_without_a_gpu_exits_0(tmp_path):
    bad = runner.invoke(app, ["bench", "throughput", "-n", "0,4", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "-n needs finite numbers >= 1" in bad.output
    bad = runner.invoke(app, ["bench", "throughput", "--sampler", "fastest", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--sampler must be among" in bad.output
    import torch

    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", "gpu-check"])
        assert result.exit_code == 0 and "no GPU" in result.output


def test_bench_nfe_counts_cases_whose_every_sample_is_empty(run, monkeypatch):
    """A sampler that draws only empty masks: every case that two or more readers marked is counted."""
    import torch
    from ssb_fast.bench import nfe as nfe_module

    from ssb_fast.data import load
    from ssb_fast.sample_run import load_for_sampling
    from ssb_fast.sampler import SampleResult

    class EmptySampler:
        def __init__(self, *args, **kwargs):
            pass

        def sample(self, scans, n, case_ids=None):
            masks = torch.zeros(len(scans), n, *scans.shape[-2:], dtype=torch.uint8)
            return SampleResult(masks, torch.zeros(len(scans), n, dtype=torch.int64),
                                stats={"masks_per_s": 1.0, "warmup_seconds": 0.0})

    monkeypatch.setattr(nfe_module, "Sampler", EmptySampler)
    run_dir, data = run
    net, _, bridge = load_for_sampling(run_dir / "model.safetensors", torch.device("cpu"))
    dataset = load(data, "train")
    report = nfe_module.run_nfe_sweep(net, bridge, dataset, [1], n_samples=2)
    marked = ((dataset.masks.flatten(2).sum(-1) > 0) & dataset.present).sum(1)
    want = [dataset.case_ids[i] for i in (marked >= 2).nonzero().flatten().tolist()]
    row = report["rows"][0]
    assert want and row["all_empty_case_ids_2plus_marked"] == want
    assert row["all_empty_cases_2plus_marked"] == len(want) and row["empty_rate"] == 1.0
    # every mask was drawn with label 0 and is empty, whoever marked the case
    assert row["empty_rate_by_label"] == [1.0] + [None] * (net.config.n_labels - 1)
    assert row["mixed_share_by_label"] == [0.0] + [None] * (net.config.n_labels - 1)  # all empty: none disagree
    assert all(s["n"] == 0 for s in row["subsets_nonempty"].values())  # no shape to score
    by_marked = row["empty_rate_by_marked"]
    assert sum(v["cases"] for v in by_marked.values()) == len(dataset)
    assert all(v["samples"] == 1.0 for v in by_marked.values())
    assert report["readers_empty"]["by_rank"][0] == 0.0  # the widest reading of a case is never empty here
    markdown = nfe_module.render_markdown(report)
    assert "| 1 |" in markdown and "| 1 | 100% | — |" in markdown
    assert "disagree on empty vs marked" in markdown and "| 1 | 0% | — |" in markdown


def test_bench_settings_scores_every_setting_and_agrees_with_bench_nfe(run, tmp_path):
    run_dir, data = run
    common = ["--model", str(run_dir), "--data", str(data), "--split", "train", "-n", "3", "--cases", "4",
              "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, ["bench", "settings", *common, "--nfe", "2", "--guidance", "1,0",
                                 "--labels", "cycle,random", "--first-step-noise", "1,3", "--threshold", "-0.5,0",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "settings.json").read_text())
    got = [(r["labels"], r["guidance"], r["first_step_noise"], r["threshold"]) for r in report["rows"]]
    assert got == [(m, w, s, t) for m in ("cycle", "random") for w in (1.0, 0.0) for s in (1.0, 3.0)
                   for t in (-0.5, 0.0)]
    rows = {k: r for k, r in zip(got, report["rows"], strict=True)}
    for m in ("cycle", "random"):
        for w in (1.0, 0.0):  # a lower threshold marks a superset of the pixels: never more empty masks
            assert rows[(m, w, 1.0, -0.5)]["empty_rate"] <= rows[(m, w, 1.0, 0.0)]["empty_rate"]
    for key in ("nfe", "nfe-noise"):
        noise = ["--first-step-noise", "3"] if key == "nfe-noise" else []
        result = runner.invoke(app, ["bench", "nfe", *common, "--nfe", "2", *noise, "--out", str(tmp_path / key)])
        assert result.exit_code == 0, result.output
        nfe_report = json.loads((tmp_path / key / "nfe.json").read_text())
        s = 3.0 if noise else 1.0
        assert nfe_report["first_step_noise"] == s
        assert rows[("cycle", 1.0, s, 0.0)]["ged"]["mean"] == pytest.approx(nfe_report["rows"][0]["ged"]["mean"],
                                                                            abs=1e-9)
    assert rows[("cycle", 1.0, 1.0, 0.0)]["ged"] != rows[("cycle", 1.0, 3.0, 0.0)]["ged"]
    assert "first-step noise 3" in (tmp_path / "nfe-noise" / "nfe.md").read_text()
    assert "| cycle | 1 | 1 | 0 |" in (tmp_path / "s" / "settings.md").read_text()
    assert "| cycle | 1 | 3 | 0 |" in (tmp_path / "s" / "settings.md").read_text()
    bad = runner.invoke(app, ["bench", "settings", *common, "--labels", "all", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--labels" in bad.output
