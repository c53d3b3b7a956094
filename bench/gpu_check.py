"""`ssb-fast bench gpu-check`: the whole GPU story in one command that fits a short lease.

In order, each step guarded by the time left in the budget (a step that would not fit is skipped and
said so): the `gpu`-marked tests, the kernel bench, sampler throughput for the `tiny` and `ssb++`
presets at 128² with N = 256 (random weights unless a model is given), the sync-debug check of the
sampling loop, and the fraction of mask pixels that flip in bf16 between chunk sizes 5 and 256. Every
report lands in one folder, ready to commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch
from ssb_fast.bench import kernels as kernel_bench
from ssb_fast.bench import throughput as throughput_bench
from ssb_fast.bench.environment import device_name, versions

from ssb_fast.atomic import write_bytes_atomic, write_json_atomic
from ssb_fast.bridge import Bridge
from ssb_fast.sampler import Sampler

# (preset, NFE, guidance values, samplers, seconds the step is expected to need on an H100/H200)
THROUGHPUT_PLAN = (
    ("tiny", 50, (1.5, 1.0), throughput_bench.SAMPLERS, 90),
    ("ssb++", 50, (1.5, 1.0), ("ours", "ours-2B", "eager-compiled"), 240),
)


def run_gpu_tests(out_dir: Path, timeout_s: float) -> dict:
    """`python -m pytest -m gpu` in a subprocess; counts from its JUnit XML."""
    xml = out_dir / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "TRITON_INTERPRET": "0"})
        tail, code = (proc.stdout + proc.stderr)[-4000:], proc.returncode
    except subprocess.TimeoutExpired:
        tail, code = f"timed out after {timeout_s:.0f} s", -1
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    write_bytes_atomic(out_dir / "gpu-tests.txt", tail.encode())
    passed = code == 0
    return {"command": " ".join(cmd[1:]), "exit_code": code, "passed": passed, **counts,
            "seconds": time.perf_counter() - start}


def sync_check(device: torch.device, image_size: int = 64) -> dict:
    """A warm Sampler's whole sample() call under sync debug mode "error": only the chunk boundaries it
    marks may synchronise. Returns {"ok": bool, "error": str | None}."""
    net = throughput_bench.random_model("tiny", image_size).to(device)
    scans = torch.rand(2, 1, image_size, image_size, device=device) * 2 - 1
    results = {}
    for graphs in (False, True):
        sampler = Sampler(net, Bridge(), nfe=6, guidance=1.5, max_batch=8, device=device, cuda_graphs=graphs)
        sampler.sample(scans, 8)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler.sample(scans, 8)
            results["cuda_graphs" if graphs else "eager"] = None
        except RuntimeError as err:
            results["cuda_graphs" if graphs else "eager"] = str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return {"ok": all(v is None for v in results.values()), "errors": results}


def chunking_flip_fraction(device: torch.device, preset: str = "tiny", image_size: int = 128, n_samples: int = 256,
                           nfe: int = 20, small: int = 5, large: int = 256) -> dict:
    """The fraction of mask pixels that differ between --max-batch `small` and `large` in bf16 (cuDNN may
    pick other algorithms per batch size), and the same in float32 for comparison."""
    net = throughput_bench.random_model(preset, image_size).to(device)
    g = torch.Generator().manual_seed(3)
    scans = torch.rand(1, 1, image_size, image_size, generator=g) * 2 - 1
    out = {"preset": preset, "image_size": image_size, "n_samples": n_samples, "nfe": nfe, "small": small,
           "large": large}
    for precision in ("bfloat16", "float32"):
        masks = [Sampler(net, Bridge(), nfe=nfe, max_batch=b, device=device, precision=precision)
                 .sample(scans, n_samples).masks for b in (small, large)]
        flipped = (masks[0] != masks[1])
        out[precision] = {"pixel_fraction": float(flipped.float().mean()),
                          "masks_with_a_flip": int(flipped.flatten(2).any(-1).sum()),
                          "foreground_fraction": float(masks[1].float().mean())}
    return out


def run_gpu_check(out_dir: Path, budget_s: float = 480.0, model: torch.nn.Module | None = None,
                  log: Callable[[str], None] | None = None, only: tuple[str, ...] | None = None) -> tuple[dict, int]:
    """Run every step that fits in `budget_s`; returns the report and the exit code (1 if a GPU test
    failed, else 0). A trained `model` adds a throughput step of its own after the presets'. `only` names
    the steps to run (gpu_tests, kernels, throughput_<preset>, sync_check, chunking_flip_fraction)."""
    say = log or (lambda message: None)
    device = torch.device("cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"kind": "gpu-check", "device_name": device_name(device), "versions": versions(device),
              "budget_s": budget_s, "steps": {}, "skipped": []}

    def left() -> float:
        return budget_s - (time.perf_counter() - start)

    def step(name: str, need_s: float, fn: Callable[[], dict]) -> None:
        if only is not None and name not in only:
            return
        if left() < need_s:
            report["skipped"].append(f"{name}: needs about {need_s:.0f} s, {left():.0f} s left")
            say(f"skip {name} ({left():.0f} s left)")
            return
        say(f"{name} ...")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - one failed step must not lose the others' results
            result = {"error": f"{type(err).__name__}: {err}"}
        result["step_seconds"] = time.perf_counter() - t0
        report["steps"][name] = result
        write_json_atomic(out_dir / "gpu-check.json", report)

    step("gpu_tests", 60, lambda: run_gpu_tests(out_dir, max(60.0, min(150.0, left() - 300))))

    def kernels_step() -> dict:
        rep = kernel_bench.run_kernel_bench(kernel_bench.KernelSizes(), device, repeat=20)
        write_json_atomic(out_dir / "kernels.json", rep)
        write_bytes_atomic(out_dir / "kernels.md", kernel_bench.render_markdown(rep).encode())
        return {"findings": rep.get("findings"), "file": "kernels.json"}

    step("kernels", 45, kernels_step)
    plan = THROUGHPUT_PLAN + ((("model", 50, (1.5, 1.0), ("ours", "eager-compiled"), 120),) if model is not None
                              else ())
    for preset, nfe, guidances, samplers, need in plan:
        def throughput_step(preset=preset, nfe=nfe, guidances=guidances, samplers=samplers) -> dict:
            net = model if preset == "model" else throughput_bench.random_model(preset, 128)
            cases = [throughput_bench.ThroughputCase(n_samples=256, nfe=nfe, guidance=w) for w in guidances]
            rep = throughput_bench.run_throughput(net, cases, device, samplers, rounds=2, log=say)
            stem = f"throughput-{preset.replace('+', 'p')}"
            write_json_atomic(out_dir / f"{stem}.json", rep)
            write_bytes_atomic(out_dir / f"{stem}.md", throughput_bench.render_markdown(rep).encode())
            return {"file": f"{stem}.json", "rows": [{k: r.get(k) for k in (
                "sampler", "guidance", "masks_per_s", "vs_eager", "vs_eager_compiled", "pct_flop_peak", "warmup_s")}
                for r in rep["rows"]]}

        step(f"throughput_{preset}", need, throughput_step)
    step("sync_check", 30, lambda: sync_check(device))
    step("chunking_flip_fraction", 30, lambda: chunking_flip_fraction(device))
    report["seconds"] = time.perf_counter() - start
    write_json_atomic(out_dir / "gpu-check.json", report)
    write_bytes_atomic(out_dir / "gpu-check.md", render_markdown(report).encode())
    tests = report["steps"].get("gpu_tests", {})
    return report, (1 if tests and not tests.get("passed", False) else 0)


def render_markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device_name']}", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; "
             f"{report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    for name, result in report["steps"].items():
        lines.append(f"## {name} ({result.get('step_seconds', 0):.0f} s)")
        lines.append("```json")
        lines.append(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=1)[:3000])
        lines.append("```")
    if report["skipped"]:
        lines += ["## skipped"] + [f"- {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"
