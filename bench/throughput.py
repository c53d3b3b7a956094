"""Sampler throughput: ours against the eager I2SB-style loop and the same loop with a compiled U-Net.

All three use the same weights and scans in one process, and are timed interleaved (round r times
every sampler once before round r + 1 starts), so a noisy host slows them alike. Warm-up (the first
call: compilation, autotuning, graph capture) is timed apart and never enters masks/s. On CUDA each
figure also reads as a fraction of the U-Net's FLOP floor: count_flops x rows evaluated / time / peak.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ssb_fast.bench.environment import device_name, load_average, versions
from ssb_fast.bench.peaks import lookup_peak
from ssb_fast.bench.sampler_baseline import eager_cfg_sampling

from ssb_fast.bridge import Bridge
from ssb_fast.devices import describe_device
from ssb_fast.model import PRESETS, UNet, UNetConfig, count_flops
from ssb_fast.sampler import Sampler
from ssb_fast.telemetry import GpuMonitor

SAMPLERS = ("ours", "ours-2B", "eager", "eager-compiled")


@dataclass
class ThroughputCase:
    """One configuration to time: N masks of `scans` scans, NFE, guidance and the chunk size."""

    n_samples: int
    nfe: int = 50
    guidance: float = 1.5
    scans: int = 1
    max_batch: int | None = None


def random_model(preset: str, image_size: int, seed: int = 0) -> UNet:
    """A U-Net of `preset` with random weights (throughput does not depend on the values)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    torch.manual_seed(seed)
    return UNet(UNetConfig.preset(preset, image_size=image_size))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _samplers(net: UNet, bridge: Bridge, case: ThroughputCase, device: torch.device, which: tuple[str, ...],
              compile_ours: bool) -> dict[str, tuple[Callable[[torch.Tensor], object], int]]:
    """{name: (run(scans), network rows per call)} for the samplers asked for."""
    n_masks = case.n_samples * case.scans
    chunk = case.max_batch or min(n_masks, 256 if device.type == "cuda" else 64)
    steps = case.nfe
    out = {}
    for name in which:
        if name in ("ours", "ours-2B"):
            fast = name == "ours"
            sampler = Sampler(net, bridge, nfe=case.nfe, guidance=case.guidance, max_batch=chunk, device=device,
                              compile=compile_ours, guidance_fast_path=fast)
            holder = {}

            def run(scans, sampler=sampler, holder=holder):
                holder["result"] = sampler.sample(scans, case.n_samples)
                return holder["result"]

            out[name] = (run, None)  # rows read from the result's stats
        elif name in ("eager", "eager-compiled"):
            model = net
            if name == "eager-compiled":
                model = torch.compile(net, dynamic=False)

            def run(scans, model=model):
                return eager_cfg_sampling(model, bridge, scans, case.n_samples, case.nfe, case.guidance,
                                          net.config.n_labels, chunk)

            out[name] = (run, 2 * n_masks * steps)
        else:
            raise ValueError(f"sampler must be among {', '.join(SAMPLERS)}; got {name!r}")
    return out


def run_throughput(net: UNet, cases: list[ThroughputCase], device: torch.device | str = "cpu",
                   samplers: tuple[str, ...] = SAMPLERS, rounds: int = 3, compile_ours: bool | None = None,
                   bridge: Bridge | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Time every sampler on every case, interleaved over `rounds`; returns the report. ours-2B runs only
    at w = 1 or 0, where ours evaluates B rows."""
    device = torch.device(device)
    net = net.to(device).eval()
    bridge = bridge or Bridge()
    compile_ours = device.type == "cuda" if compile_ours is None else compile_ours
    name = device_name(device)
    peak = lookup_peak(name) if device.type == "cuda" else None
    flops_per_row = count_flops(net)
    rows_out = []
    for case in cases:
        g = torch.Generator().manual_seed(0)
        scans = (torch.rand(case.scans, net.config.scan_channels, net.config.image_size, net.config.image_size,
                            generator=g) * 2 - 1).to(device)
        wanted = tuple(s for s in samplers if not (s == "ours-2B" and case.guidance not in (0.0, 1.0)))
        runs = _samplers(net, bridge, case, device, wanted, compile_ours)
        warmup, times, rows, telemetry = {}, {k: [] for k in runs}, {}, {}
        for key, (run, fixed_rows) in runs.items():
            if log:
                log(f"warm-up {key}, N={case.n_samples}, NFE {case.nfe}, w={case.guidance:g}")
            _synchronize(device)
            start = time.perf_counter()
            result = run(scans)
            _synchronize(device)
            warmup[key] = time.perf_counter() - start
            rows[key] = fixed_rows if fixed_rows is not None else result.stats["network_rows"]
        for r in range(rounds):
            for key, (run, _) in runs.items():
                if log:
                    log(f"round {r + 1}/{rounds} {key}, N={case.n_samples}")
                with GpuMonitor(device if device.type == "cuda" else None) as monitor:
                    _synchronize(device)
                    start = time.perf_counter()
                    run(scans)
                    _synchronize(device)
                    times[key].append(time.perf_counter() - start)
                telemetry.setdefault(key, monitor.summary())
        n_masks = case.n_samples * case.scans
        base = {}
        for key in runs:
            median = statistics.median(times[key])
            row = {"sampler": key, "n_samples": case.n_samples, "scans": case.scans, "nfe": case.nfe,
                   "guidance": case.guidance, "rows_per_step": "B" if key == "ours" and case.guidance in (0.0, 1.0)
                   else "2B", "warmup_s": warmup[key], "median_s": median, "min_s": min(times[key]),
                   "max_s": max(times[key]), "masks_per_s": n_masks / median, "network_rows": rows[key],
                   "tflop_per_s": flops_per_row * rows[key] / median / 1e12, "telemetry": telemetry[key]}
            energy = telemetry[key].get("energy_j")
            row["joules_per_mask"] = energy / n_masks if energy is not None else None
            if peak is not None:
                row["pct_flop_peak"] = 100 * row["tflop_per_s"] / peak.bf16_dense_tflops
            base[key] = row
        for row in base.values():
            for ref in ("eager", "eager-compiled"):
                if ref in base:
                    row[f"vs_{ref.replace('-', '_')}"] = row["masks_per_s"] / base[ref]["masks_per_s"]
            rows_out.append(row)
    return {
        "kind": "throughput", "date": _dt.date.today().isoformat(), "device": describe_device(device),
        "device_name": name, "versions": versions(device), "load_average": load_average(),
        "model": {"preset": net.config.preset, "image_size": net.config.image_size,
                  "gflop_per_row": flops_per_row / 1e9},
        "rounds": rounds, "compile_ours": compile_ours,
        "peak_bf16_tflops": peak.bf16_dense_tflops if peak else None,
        "peak_note": None if peak or device.type != "cuda" else f"no known peak for {name!r}",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "notes": [
            "ours: the Sampler (fused cfg_step, shared first step, B rows at w = 1 or 0, bf16 weights, "
            "channels_last and torch.compile on CUDA); ours-2B: the same forced onto 2B rows at w = 1",
            "eager: I2SB-style loop, two forward passes per step, torch.cat, unfused posterior, torch.randn "
            "(bf16 autocast on CUDA); eager-compiled: the same with the U-Net under torch.compile",
            "warm-up (first call: compile, autotune, capture) is timed apart; masks/s is over the steady "
            "state, median of the rounds, samplers interleaved within each round",
        ],
        "rows": rows_out,
    }


def render_markdown(report: dict) -> str:
    """The throughput report as a markdown table with its context."""
    lines = [f"# Sampler throughput, {report['date']}, {report['device']}", "",
             f"Model: `{report['model']['preset']}` at {report['model']['image_size']}² "
             f"({report['model']['gflop_per_row']:.2f} GFLOP per network row); "
             f"versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; "
             f"{report['rounds']} interleaved rounds, median.", "",
             "| sampler | N | NFE | w | rows/step | masks/s | vs eager | vs eager-compiled | warm-up s | TFLOP/s "
             "| % FLOP peak |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        def f(key, spec=".2f", r=r):
            value = r.get(key)
            return "–" if value is None else format(value, spec)

        lines.append(f"| {r['sampler']} | {r['n_samples'] * r['scans']} | {r['nfe']} | {r['guidance']:g} | "
                     f"{r['rows_per_step']} | {f('masks_per_s')} | {f('vs_eager')}× | {f('vs_eager_compiled')}× | "
                     f"{f('warmup_s', '.1f')} | {f('tflop_per_s', '.3f')} | {f('pct_flop_peak', '.1f')} |")
    lines += [""] + [f"- {n}" for n in report["notes"]]
    if report.get("peak_note"):
        lines.append(f"- {report['peak_note']}")
    return "\n".join(lines) + "\n"
