"""`ssb-fast bench kernels` and what it is built on: the cases' bytes and FLOPs, the peaks, timing, findings,
the report files. No test here asserts a time: only that timings exist and are ordered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ssb_fast.bench.kernels import (
    BUILDERS,
    IMPLS,
    OPS,
    KernelSizes,
    Timing,
    _result_row,
    cfg_step_eager,
    findings,
    make_cfg_step_case,
    render_markdown,
    run_kernel_bench,
    time_cpu,
)
from ssb_fast.bench.peaks import lookup_peak, measure_copy_bandwidth, peak_report
from ssb_fast.kernels.cfg_step import bytes_moved as cfg_step_bytes
from ssb_fast.kernels.cfg_step import cfg_step_ref
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.cli.bench import default_out_dir, device_slug

runner = CliRunner()
TINY = ["--device", "cpu", "--batch", "2", "--size", "8", "--scans", "1", "--experts", "2", "--repeat", "2"]


# ------------------------------------------------------------------------------ bytes and FLOPs
def test_bytes_and_flops_match_a_hand_count():
    sizes = KernelSizes(batch=2, size=4, scans=1, experts=2)
    cpu = torch.device("cpu")
    benches = {op: BUILDERS[op](sizes, cpu) for op in OPS}
    # bridge_sample: read x0, x1, write x_t, label: 4 tensors x 2 masks x 16 px x 4 B
    assert benches["bridge_sample"].bytes_moved == 4 * 2 * 16 * 4 == 512
    # cfg_step: read x_n (2 x 16 x 4 B) and the bf16 2B output (4 x 16 x 2 B), write x_prev into both halves
    assert benches["cfg_step"].bytes_moved == 128 + 128 + 2 * 128 == 512
    assert cfg_step_bytes(2, 16, torch.float32, torch.float32, write_x0=True) == 2 * 16 * 4 * (1 + 2 + 2 + 1)
    # pair_counts: K = 2 samples + 2 experts + 2 unions = 6 uint8 masks of 16 px, then a 6 x 6 int64 Gram
    assert benches["pair_counts"].bytes_moved == 6 * 16 + 36 * 8 == 384
    assert benches["pair_counts"].flops == 2 * 36 * 16 == 1152
    # pairwise_jsd (DDI_g): 2 rows over 2 outcomes fp32, a 2 x 2 fp32 result
    assert benches["pairwise_jsd"].bytes_moved == 2 * 2 * 4 + 2 * 2 * 4 == 32
    assert benches["pairwise_jsd"].flops == 12 * 2 * 2 * 2
    for bench in benches.values():  # on CPU the Triton kernel is never timed
        assert "triton" not in bench.calls and "interpreter" in bench.skipped["triton"]
        assert set(bench.calls) == {"compiled", "eager"}


def test_eager_cfg_step_is_the_same_step_without_noise():
    case = make_cfg_step_case(3, 8, out_dtype=torch.bfloat16, channels_last=True)
    nxt, x0 = cfg_step_eager(case.x_n, case.net_out, case.coefs, case.scan, case.guidance, add_noise=False)
    ref_x0 = torch.empty_like(case.x_n)
    cfg_step_ref(case.x_n, case.net_out, case.coefs, case.seeds, case.guidance, case.step, False, True,
                 case.next_input, ref_x0)
    torch.testing.assert_close(x0, ref_x0)
    torch.testing.assert_close(nxt, case.next_input.contiguous())
    assert case.next_input.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ peaks
@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup(name, model):
    peak = lookup_peak(name)
    assert (peak.model if peak else None) == model


def test_peak_report_figures_and_no_known_peak():
    h200 = peak_report("NVIDIA H200")
    assert h200["known"] and h200["bf16_dense_tflops"] == 989.0 and h200["hbm_tb_per_s"] == 4.8
    assert lookup_peak("NVIDIA H100 80GB HBM3").hbm_tb_per_s == 3.35
    assert lookup_peak("NVIDIA A100-SXM4-80GB").bf16_dense_tflops == 312.0
    other = peak_report("Intel(R) Xeon(R)")
    assert other["known"] is False and other["note"].startswith("no known peak for 'Intel(R) Xeon(R)'")
    assert measure_copy_bandwidth("cpu", n_bytes=2**16, repeat=2) > 0


# ------------------------------------------------------------------------------ timing, rows, findings
def test_time_cpu_counts_the_first_call_apart():
    calls = []
    timing = time_cpu(lambda: calls.append(1), repeat=5, warmup=2)
    assert len(calls) == 1 + 2 + 5 and timing.calls == 5
    assert 0 <= timing.p20_s <= timing.median_s <= timing.p80_s and timing.first_call_s >= 0


def test_rates_and_percent_of_peak():
    bench = BUILDERS["pair_counts"](KernelSizes(batch=2, size=4, scans=1, experts=2), torch.device("cpu"))
    peak = {"known": True, "hbm_tb_per_s": 0.001, "bf16_dense_tflops": 1e-6}  # 1 GB/s, 1 MFLOP/s
    row = _result_row(bench, "compiled", Timing(1e-3, 1e-3, 2e-3, 0.5, 10), peak, 0.5, "ok", None, None)
    assert row["gb_per_s"] == pytest.approx(384 / 1e-3 / 1e9)
    assert row["pct_peak_bandwidth"] == pytest.approx(100 * 384e-6)
    assert row["pct_copy_bandwidth"] == pytest.approx(2 * 100 * 384e-6)
    assert row["tflop_per_s"] == pytest.approx(1152 / 1e-3 / 1e12)
    assert row["pct_peak_flops"] == pytest.approx(100 * 1152e3 / 1e6) and row["flop_peak"] == "bf16_dense_tflops"
    jsd = BUILDERS["pairwise_jsd"](KernelSizes(batch=2, size=4, scans=1, experts=2), torch.device("cpu"))
    row = _result_row(jsd, "eager", Timing(1e-3, 1e-3, 1e-3, 0.0, 1), peak, None, "ok", None, None)
    assert row["pct_peak_flops"] is None and row["pct_copy_bandwidth"] is None  # no listed peak applies


def test_findings_flag_a_triton_kernel_that_loses_to_the_compiled_reference():
    rows = [
        {"op": "cfg_step", "impl": "triton", "status": "ok", "median_ms": 0.030},
        {"op": "cfg_step", "impl": "compiled", "status": "ok", "median_ms": 0.020},
        {"op": "cfg_step", "impl": "eager", "status": "ok", "median_ms": 0.100},
        {"op": "pair_counts", "impl": "triton", "status": "ok", "median_ms": 0.5},
        {"op": "pair_counts", "impl": "compiled", "status": "ok", "median_ms": 1.0},
        {"op": "pair_counts", "impl": "eager", "status": "failed", "median_ms": None},
    ]
    found = findings(rows)
    assert [(f["op"], f["kind"]) for f in found] == [("cfg_step", "triton_loses_to_compiled")]
    assert "1.50x slower" in found[0]["text"]


# ------------------------------------------------------------------------------ the report
def test_report_of_eager_versions_renders_every_op():
    report = run_kernel_bench(KernelSizes(batch=2, size=8, scans=1, experts=2), "cpu", repeat=2,
                              impls=("eager",), copy_bytes=2**16)
    assert [(r["op"], r["impl"]) for r in report["results"]] == [(op, impl) for op in OPS for impl in IMPLS]
    status = {(r["op"], r["impl"]): (r["status"], r["reason"]) for r in report["results"]}
    for op in OPS:
        assert status[op, "eager"] == ("ok", None)
        assert status[op, "compiled"] == ("skipped", "not asked for")
        assert status[op, "triton"][0] == "skipped" and "interpreter" in status[op, "triton"][1]
    assert report["telemetry"] == {"gpu": None, "reason": "device is cpu: no GPU to monitor"}
    assert report["notes"][0].startswith("CPU run: only the compiled reference and eager PyTorch are timed")
    # The GPU side of the markdown, from a scripted telemetry summary.
    report["telemetry"] = {"gpu": {"name": "NVIDIA H200", "matched_by": "uuid"}, "duration_s": 2.0, "samples": 80,
                           "power_w": {"mean": 350.0, "p95": 600.0, "max": 650.0}, "energy_j": 700.0,
                           "energy_source": "NVML total-energy counter", "notes": []}
    md = render_markdown(report)
    assert "NVIDIA H200 (matched by uuid)" in md and "power mean 350 W / p95 600 W / max 650 W" in md
    assert "energy 700.0 J (NVML total-energy counter)" in md
    with pytest.raises(ValueError, match="unknown ops or implementations"):
        run_kernel_bench(KernelSizes(batch=2, size=8), "cpu", impls=("fused",))


def test_a_failing_version_is_reported_not_raised(monkeypatch):
    def broken(sizes, device):
        bench = BUILDERS_BEFORE["pairwise_jsd"](sizes, device)
        bench.calls["eager"] = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))
        return bench

    BUILDERS_BEFORE = dict(BUILDERS)
    monkeypatch.setitem(BUILDERS, "pairwise_jsd", broken)
    report = run_kernel_bench(KernelSizes(batch=2, size=4, scans=1, experts=2), "cpu", repeat=1,
                              ops=("pairwise_jsd",), impls=("eager",), copy_bytes=2**16)
    row = next(r for r in report["results"] if r["impl"] == "eager")
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: out of memory"
    assert "| pairwise_jsd | eager | failed: RuntimeError: out of memory |" in render_markdown(report)


def test_cli_smoke_writes_json_and_markdown(tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["bench", "kernels", *TINY, "--impl", "eager", "--out", str(out), "--json",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((out / "kernels.json").read_text())
    assert printed == written
    assert written["report"] == "ssb-fast bench kernels" and written["date"] == written["timestamp"][:10]
    assert written["device"]["spec"] == "cpu" and written["versions"]["torch"] == torch.__version__
    assert "triton" in written["versions"] and written["sizes"]["batch"] == 2
    assert written["telemetry"]["gpu"] is None and written["telemetry"]["reason"]
    assert {r["op"] for r in written["results"] if r["status"] == "ok"} == set(OPS)
    md = (out / "kernels.md").read_text()
    assert "| op | impl | median ms |" in md and written["date"] in md and f"torch {torch.__version__}" in md
    for op in OPS:
        assert f"| {op} | eager | " in md
    assert "no GPU telemetry (device is cpu: no GPU to monitor)" in md


def test_cli_prints_the_table_and_rejects_bad_arguments(tmp_path):
    result = runner.invoke(app, ["bench", "kernels", *TINY, "--impl", "eager", "--op", "pair_counts,pairwise_jsd",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| pair_counts | eager |" in result.stdout and "| cfg_step |" not in result.stdout
    assert f"wrote {tmp_path / 'kernels.json'}" in result.stdout
    bad = runner.invoke(app, ["bench", "kernels", "--device", "cpu", "--op", "gemm", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--op must be among" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "x").exists()
    assert runner.invoke(app, ["bench", "kernels", "--device", "tpu"]).exit_code == 2
    assert runner.invoke(app, ["bench", "kernels", "--batch", "0"]).exit_code == 2


def test_default_out_dir():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("Intel(R) Xeon(R) Processor") == "intel-r-xeon-r-processor"
    assert default_out_dir("NVIDIA H200", "2025-01-31") == Path("bench/results/2025-01-31-nvidia-h200")


@pytest.mark.slow
def test_cli_smoke_all_versions_compiles_each_reference(tmp_path):
    """The whole CPU smoke run, torch.compile included (tens of seconds on 2 cores with a cold cache)."""
    result = runner.invoke(app, ["bench", "kernels", *TINY, "--out", str(tmp_path), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kernels.json").read_text())
    ok = {(r["op"], r["impl"]) for r in report["results"] if r["status"] == "ok"}
    assert ok == {(op, impl) for op in OPS for impl in ("compiled", "eager")}
    for row in report["results"]:
        if row["status"] == "ok":
            assert row["first_call_s"] >= 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
