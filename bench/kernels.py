"""Each fused op at the product's sizes, three ways: Triton kernel, reference under torch.compile, eager PyTorch.

For every op (`bridge_sample`, `cfg_step`, `pair_counts`, `pairwise_jsd`) the report gives the bytes the
op must move (and the FLOPs of `pair_counts`' tl.dot), the achieved GB/s and TFLOP/s, and the % of the
device's peak (`ssb_fast.bench.peaks`), and says when a Triton kernel loses to the compiled reference.

- CUDA: `triton.testing.do_bench` medians with quantiles [0.5, 0.2, 0.8] (it flushes L2 between calls);
  the first call (compile or autotune + first run) is timed apart.
- CPU: perf_counter over `repeat` calls after warm-up; the first call of the compiled reference
  (compile + first call) is reported apart. Triton kernels run on CPU only in TRITON_INTERPRET's
  interpreter, whose speed says nothing about the kernel, so on CPU only the compiled reference and
  eager PyTorch are timed.

"eager" is the unfused I2SB-style computation where the product replaced one (`cfg_step_eager`,
`bridge_sample_eager`, stock RNG and torch.cat), else the reference called eagerly.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from ssb_fast.bench.environment import device_name, load_average, versions
from ssb_fast.bench.peaks import measure_copy_bandwidth, peak_report
from ssb_fast.kernels import HAS_TRITON, noise_seeds
from ssb_fast.kernels.bridge_sample import bridge_sample_ref, bridge_sample_triton
from ssb_fast.kernels.bridge_sample import bytes_moved as bridge_sample_bytes
from ssb_fast.kernels.cfg_step import bytes_moved as cfg_step_bytes
from ssb_fast.kernels.cfg_step import cfg_step_ref, cfg_step_triton
from ssb_fast.kernels.pair_counts import bytes_moved as pair_counts_bytes
from ssb_fast.kernels.pair_counts import flops as pair_counts_flops
from ssb_fast.kernels.pair_counts import pair_counts_ref, pair_counts_triton
from ssb_fast.kernels.pairwise_jsd import bytes_moved as pairwise_jsd_bytes
from ssb_fast.kernels.pairwise_jsd import flops as pairwise_jsd_flops
from ssb_fast.kernels.pairwise_jsd import pairwise_jsd_ref, pairwise_jsd_triton

from ssb_fast.bridge import Bridge
from ssb_fast.devices import describe_device
from ssb_fast.telemetry import GpuMonitor

OPS = ("bridge_sample", "cfg_step", "pair_counts", "pairwise_jsd")
IMPLS = ("triton", "compiled", "eager")
QUANTILES = (0.5, 0.2, 0.8)
CPU_TRITON_NOTE = ("Triton kernels are not timed on CPU: they run there only in TRITON_INTERPRET's "
                   "interpreter, whose speed says nothing about the kernel")
CPU_TRITON_SKIP = "CPU: interpreter only, not timed"


@dataclass
class KernelSizes:
    """The problem sizes; the defaults are the product's (a 256-mask chunk at 128 x 128)."""

    batch: int = 256        # masks per sampling chunk (B); cfg_step reads a 2B network output
    size: int = 128         # image side
    scans: int = 8          # scans per metrics batch (pair_counts, pairwise_jsd)
    experts: int = 4        # expert masks per scan
    scan_channels: int = 1  # channels of the scan in the [x_t | scan] network input

    def __post_init__(self):
        for name in ("batch", "size", "scans", "experts", "scan_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")


@dataclass
class OpBench:
    """One op at one size: what it must move and compute, and a zero-argument callable per implementation."""

    op: str
    shape: str
    dtype: str
    bytes_moved: int
    flops: int | None
    flop_peak: str | None  # which peak the FLOPs count against, None when no listed peak applies
    masks: int             # masks one call produces or scores (for joules per mask)
    calls: dict[str, Callable[[], object]]
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ eager baselines
def bridge_sample_eager(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                        schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pair as I2SB computes it (q_sample + compute_label): gathers, randn_like, mul-adds, ~7 kernels.

    The baseline `bridge_sample` replaces; stock RNG, not keyed noise. It lives here, not in the library.
    """
    mu_x0, mu_x1, std_sb, std_fwd = schedule[:, t].reshape(4, x0.shape[0], *([1] * (x0.dim() - 1)))
    x_t = mu_x0 * x0 + mu_x1 * x1 + std_sb * torch.randn_like(x0)
    return x_t, (x_t - x0) / std_fwd


def cfg_step_eager(x_n: torch.Tensor, net_out: torch.Tensor, coefs: torch.Tensor, scan: torch.Tensor,
                   guidance: float, add_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling step as plain eager PyTorch, I2SB-style: ~12 kernels, stock RNG, torch.cat for the next input.

    The baseline the fused `cfg_step` replaces; it lives here, not in the library.
    """
    batch = x_n.shape[0]
    cond, uncond = net_out.float().chunk(2)
    guided = uncond + guidance * (cond - uncond)
    std_fwd, mu_x0, mu_xn, std = coefs.T.reshape(4, batch, 1, 1, 1)
    x0 = (x_n - std_fwd * guided).clamp(-1.0, 1.0)
    x_prev = mu_x0 * x0 + mu_xn * x_n
    if add_noise:
        x_prev = x_prev + std * torch.randn_like(x_prev)
    half = torch.cat([x_prev, scan], dim=1)
    return torch.cat([half, half], dim=0), x0


# ------------------------------------------------------------------------------ the cases
@dataclass
class CfgStepCase:
    x_n: torch.Tensor
    net_out: torch.Tensor
    coefs: torch.Tensor
    seeds: torch.Tensor
    scan: torch.Tensor
    next_input: torch.Tensor
    step: int
    guidance: float = 1.5


def make_cfg_step_case(batch: int, size: int, device: torch.device | str = "cpu",
                       out_dtype: torch.dtype = torch.bfloat16, scan_channels: int = 1,
                       channels_last: bool = True) -> CfgStepCase:
    """A mid-trajectory step as the Sampler runs it: float32 state, the network's output in `out_dtype`,
    and the (2B, 1 + C, H, W) `[x_t | scan]` next-input buffer (channels_last by default, like the U-Net's)."""
    bridge = Bridge(1000, 0.3)
    steps = bridge.step_indices(20)
    g = torch.Generator().manual_seed(0)
    x_n = (torch.rand(batch, 1, size, size, generator=g) * 2 - 1).to(device)
    net_out = torch.randn(2 * batch, 1, size, size, generator=g).to(device=device, dtype=out_dtype)
    scan = (torch.rand(batch, scan_channels, size, size, generator=g) * 2 - 1).to(device)
    coefs = bridge.sampling_coefs(steps, device=device)[10].expand(batch, 4)
    seeds = noise_seeds(0, ["bench"] * batch, list(range(batch)), device=device)
    next_input = torch.zeros(2 * batch, 1 + scan_channels, size, size, device=device)
    if channels_last:
        next_input = next_input.to(memory_format=torch.channels_last)
    next_input[:batch, 1:].copy_(scan)
    next_input[batch:, 1:].copy_(scan)
    return CfgStepCase(x_n, net_out, coefs, seeds, scan, next_input, steps[11])


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _triton_slot(device: torch.device, call: Callable[[], object]) -> tuple[dict, dict]:
    """({"triton": call}, {}) where the kernel can be timed, else ({}, {"triton": why not})."""
    if not HAS_TRITON:
        return {}, {"triton": "triton is not installed"}
    if not _on_cuda(device):
        return {}, {"triton": CPU_TRITON_SKIP}
    return {"triton": call}, {}


class _Compiled:
    """`torch.compile(fn)` made on first call, so that building a case costs no dynamo import."""

    def __init__(self, fn: Callable, **options):
        self.fn, self.options, self.compiled = fn, options, None

    def __call__(self, *args):
        if self.compiled is None:
            # dynamic=False: the product runs fixed shapes (DESIGN §5), so compile for exactly this one.
            self.compiled = torch.compile(self.fn, dynamic=False, **self.options)
        return self.compiled(*args)


def bridge_sample_bench(sizes: KernelSizes, device: torch.device) -> OpBench:
    """Training's noisy pair for a batch of `batch` masks at size x size, float32."""
    b, s = sizes.batch, sizes.size
    bridge = Bridge(1000, 0.3)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(b, 1, s, s, generator=g) > 0.5).float().mul(2).sub(1).to(device)
    x1 = (torch.rand(b, 1, s, s, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, bridge.n_timesteps, (b,), generator=g).to(device)
    schedule = bridge.schedule(device)
    seeds = noise_seeds(0, ["bench"] * b, list(range(b)), device=device)
    compiled = _Compiled(bridge_sample_ref)
    calls, skipped = _triton_slot(device, lambda: bridge_sample_triton(x0, x1, t, schedule, seeds))
    calls["compiled"] = lambda: compiled(x0, x1, t, schedule, seeds)
    calls["eager"] = lambda: bridge_sample_eager(x0, x1, t, schedule)
    return OpBench(
        "bridge_sample", f"x0, x1 ({b}, 1, {s}, {s})", "float32",
        bridge_sample_bytes(b, s * s, torch.float32), None, None, b, calls, skipped,
        ["eager: I2SB's q_sample + compute_label with torch.randn (not keyed noise)",
         "check_t_range reads t on the host where it checks it (CPU tensors): a graph break under torch.compile"],
    )


def cfg_step_bench(sizes: KernelSizes, device: torch.device) -> OpBench:
    """One guided sampling step of a B-mask chunk: bf16 2B network output, channels_last [x_t | scan] buffer."""
    b, s = sizes.batch, sizes.size
    c = make_cfg_step_case(b, s, device, torch.bfloat16, sizes.scan_channels, channels_last=True)
    args = (c.x_n, c.net_out, c.coefs, c.seeds, c.guidance, c.step, True, True, c.next_input, None)
    compiled = _Compiled(cfg_step_ref, fullgraph=True)
    calls, skipped = _triton_slot(device, lambda: cfg_step_triton(*args))
    calls["compiled"] = lambda: compiled(*args)
    calls["eager"] = lambda: cfg_step_eager(c.x_n, c.net_out, c.coefs, c.scan, c.guidance)
    return OpBench(
        "cfg_step", f"x_n ({b}, 1, {s}, {s}); net_out ({2 * b}, 1, {s}, {s}) bf16; "
        f"next_input ({2 * b}, {1 + sizes.scan_channels}, {s}, {s}) channels_last", "float32 + bf16",
        cfg_step_bytes(b, s * s, torch.float32, torch.bfloat16), None, None, b, calls, skipped,
        ["eager: I2SB-style step with torch.randn and torch.cat into a new 2B input (cfg_step_eager)",
         "x_prev lands in channel 0 of the channels_last [x_t | scan] buffer: strided stores, so DRAM "
         "traffic on the write side can exceed the bytes counted"],
    )


def pair_counts_bench(sizes: KernelSizes, device: torch.device) -> OpBench:
    """The intersection Gram of `scans` scans, K = N samples + M experts + 2 unions (as metrics lays them out)."""
    n, k, p = sizes.scans, sizes.batch + sizes.experts + 2, sizes.size * sizes.size
    g = torch.Generator().manual_seed(2)
    masks = (torch.rand(n, k, p, generator=g) < 0.1).to(torch.uint8).to(device)
    compiled = _Compiled(pair_counts_ref)
    calls, skipped = _triton_slot(device, lambda: pair_counts_triton(masks))
    calls["compiled"] = lambda: compiled(masks)
    calls["eager"] = lambda: pair_counts_ref(masks)
    return OpBench(
        "pair_counts", f"masks ({n}, {k}, {p}): K = {sizes.batch} samples + {sizes.experts} experts + 2 unions",
        "uint8", pair_counts_bytes(n, k, p, torch.uint8), pair_counts_flops(n, k, p),
        "bf16_dense_tflops", n * k, calls, skipped,
        ["FLOPs count the dense (K x P)(P x K) tl.dot per scan on 0/1 fp16 tiles (fp16 dense peak = bf16's); "
         "the kernel computes only the upper tiles, about half of them",
         "eager: the reference (float32 bmm over runs of at most 2**24 pixels) called eagerly"],
    )


def pairwise_jsd_bench(sizes: KernelSizes, device: torch.device) -> OpBench:
    """DDI_g's divergences: for each scan, N = batch sample columns as distributions over M experts."""
    n, r, l_ = sizes.scans, sizes.batch, sizes.experts
    g = torch.Generator().manual_seed(3)
    dists = torch.rand(n, r, l_, generator=g) + 1e-3
    dists = (dists / dists.sum(-1, keepdim=True)).to(device)
    compiled = _Compiled(pairwise_jsd_ref)
    calls, skipped = _triton_slot(device, lambda: pairwise_jsd_triton(dists))
    calls["compiled"] = lambda: compiled(dists)
    calls["eager"] = lambda: pairwise_jsd_ref(dists)
    return OpBench(
        "pairwise_jsd", f"dists ({n}, {r}, {l_}): DDI_g, {r} samples over {l_} experts", "float32",
        pairwise_jsd_bytes(n, r, l_, torch.float32), pairwise_jsd_flops(n, r, l_), None,
        n * r, calls, skipped,
        ["FLOPs are ~12 per (i, k, l) term with two log2, fp32 on CUDA cores: no listed peak applies",
         "eager: the reference (float64, rounded once to float32) called eagerly"],
    )


BUILDERS: dict[str, Callable[[KernelSizes, torch.device], OpBench]] = {
    "bridge_sample": bridge_sample_bench,
    "cfg_step": cfg_step_bench,
    "pair_counts": pair_counts_bench,
    "pairwise_jsd": pairwise_jsd_bench,
}


# ------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    first_call_s: float  # compile (or autotune) + first call for compiled code; the cold call otherwise
    calls: int | None    # timed calls; None when do_bench chose


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    rank = q * (len(xs) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def time_cpu(fn: Callable[[], object], repeat: int, warmup: int = 2) -> Timing:
    """perf_counter per call over `repeat` calls, after the first call (timed apart) and `warmup` more."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), first, repeat)


def time_cuda(fn: Callable[[], object], rep_ms: int) -> Timing:
    """do_bench's median and 20/80 % quantiles over ~`rep_ms` of calls, after a timed first call."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    median, p20, p80 = do_bench(fn, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, first, None)


def timing_method(device: torch.device, repeat: int) -> str:
    if _on_cuda(device):
        return (f"triton.testing.do_bench over ~{cuda_rep_ms(repeat)} ms per version, L2 flushed between calls; "
                f"median with the 20-80 % range; first call (compile / autotune + run) timed apart")
    return (f"time.perf_counter over {repeat} calls after a first call (timed apart: compile + first call "
            f"for the compiled reference) and 2 warm-up calls; median with the 20-80 % range")


def cuda_rep_ms(repeat: int) -> int:
    """do_bench's time budget: 5 ms per `repeat` (the default 20 gives do_bench's own 100 ms)."""
    return max(25, 5 * repeat)


# ------------------------------------------------------------------------------ the report
def _rate(numerator: float | None, seconds: float, scale: float) -> float | None:
    return None if numerator is None or seconds <= 0 else numerator / seconds / scale


def _pct(value: float | None, peak: float | None) -> float | None:
    return None if value is None or not peak else 100.0 * value / peak


def _result_row(bench: OpBench, impl: str, timing: Timing | None, peak: dict, copy_gb_s: float | None,
                status: str, reason: str | None, telemetry: dict | None) -> dict:
    row = {"op": bench.op, "impl": impl, "status": status, "reason": reason, "shape": bench.shape,
           "dtype": bench.dtype, "bytes": bench.bytes_moved, "flops": bench.flops, "masks": bench.masks}
    if timing is None:
        return row
    gb_s = _rate(bench.bytes_moved, timing.median_s, 1e9)
    tflop_s = _rate(bench.flops, timing.median_s, 1e12)
    hbm_gb_s = peak["hbm_tb_per_s"] * 1e3 if peak.get("known") else None
    flop_peak = peak.get(bench.flop_peak) if (peak.get("known") and bench.flop_peak) else None
    row.update(
        median_ms=timing.median_s * 1e3, p20_ms=timing.p20_s * 1e3, p80_ms=timing.p80_s * 1e3,
        first_call_s=timing.first_call_s, timed_calls=timing.calls,
        gb_per_s=gb_s, tflop_per_s=tflop_s,
        pct_peak_bandwidth=_pct(gb_s, hbm_gb_s), pct_copy_bandwidth=_pct(gb_s, copy_gb_s),
        pct_peak_flops=_pct(tflop_s, flop_peak), flop_peak=bench.flop_peak if flop_peak else None,
    )
    if telemetry is not None:
        row["telemetry"] = telemetry
        power = (telemetry.get("power_w") or {}).get("mean") if telemetry.get("gpu") else None
        # Mean board power over the timed region times one call's median: a per-call estimate that
        # includes the idle share and do_bench's L2 flushes.
        row["joules_per_mask_est"] = None if power is None else power * timing.median_s / bench.masks
    return row


LOSSES = (  # (version, simpler version it should beat, what it means when it does not)
    ("triton", "compiled", "the Triton kernel loses to torch.compile of its reference"),
    ("triton", "eager", "the Triton kernel loses to eager PyTorch"),
    ("compiled", "eager", "torch.compile of the reference loses to eager PyTorch"),
)


def findings(rows: list[dict]) -> list[dict]:
    """Where a version loses to a simpler one: Triton to the compiled reference (the headline), or to eager;
    the compiled reference to eager."""
    by_op: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            by_op.setdefault(row["op"], {})[row["impl"]] = row
    out = []
    for op, impls in by_op.items():
        for fast, slow, what in LOSSES:
            if fast in impls and slow in impls and impls[fast]["median_ms"] > impls[slow]["median_ms"]:
                a, b = impls[fast]["median_ms"], impls[slow]["median_ms"]
                out.append({"op": op, "kind": f"{fast}_loses_to_{slow}",
                            "text": f"{op}: {what}: {a:.4g} ms vs {b:.4g} ms ({a / b:.2f}x slower)"})
    return out


def run_kernel_bench(sizes: KernelSizes | None = None, device: torch.device | str = "cpu", repeat: int = 20,
                     ops: Sequence[str] = OPS, impls: Sequence[str] = IMPLS, copy_bytes: int | None = None,
                     monitor_interval_s: float = 0.025, log: Callable[[str], None] | None = None) -> dict:
    """Time every asked-for op and implementation on `device`; the whole report as a dict.

    `impls` chooses among "triton", "compiled", "eager" (the others appear as skipped); `copy_bytes`
    sizes the copy-bandwidth probe (default 256 MiB on CUDA, 64 MiB on the CPU).
    """
    sizes = sizes or KernelSizes()
    device = torch.device(device)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int; got {repeat!r}")
    unknown = [o for o in ops if o not in BUILDERS] + [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown ops or implementations {unknown}; ops are {list(OPS)}, implementations "
                         f"{list(IMPLS)}")
    log = log or (lambda message: None)
    name = device_name(device)
    peak = peak_report(name)
    if copy_bytes is None:
        copy_bytes = 2**28 if _on_cuda(device) else 2**26
    load = load_average()
    copy_gb_s = measure_copy_bandwidth(device, copy_bytes) / 1e9
    rows, notes = [], []
    with GpuMonitor(device, monitor_interval_s) as whole:
        for op in ops:
            bench = BUILDERS[op](sizes, device)
            notes += [f"{op}: {note}" for note in bench.notes]
            for impl in IMPLS:
                if impl not in bench.calls or impl not in impls:
                    why = bench.skipped.get(impl, "not asked for")
                    rows.append(_result_row(bench, impl, None, peak, copy_gb_s, "skipped", why, None))
                    continue
                log(f"{op} {impl}")
                try:
                    with GpuMonitor(device, monitor_interval_s) as monitor:
                        if _on_cuda(device):
                            timing = time_cuda(bench.calls[impl], cuda_rep_ms(repeat))
                        else:
                            timing = time_cpu(bench.calls[impl], repeat)
                except Exception as err:  # one failing version must not lose the others' figures
                    rows.append(_result_row(bench, impl, None, peak, copy_gb_s, "failed",
                                            f"{type(err).__name__}: {err}", None))
                    continue
                telemetry = monitor.summary() if _on_cuda(device) else None
                rows.append(_result_row(bench, impl, timing, peak, copy_gb_s, "ok", None, telemetry))
    if not _on_cuda(device):
        busy = f"host load average {load:.2f} on {os.cpu_count()} cores at the start" if load is not None else ""
        notes.insert(0, f"CPU run: only the compiled reference and eager PyTorch are timed. {CPU_TRITON_NOTE}. "
                        f"Other processes on the cores add noise{f' ({busy})' if busy else ''}")
        if load is not None and load >= torch.get_num_threads() > 1:
            notes.insert(1, f"the host was busier than torch's {torch.get_num_threads()} threads: Inductor's OpenMP "
                            f"loops can stall at barriers for whole scheduler ticks (multiples of ~4 ms), which "
                            f"makes 'compiled' look slow; OMP_NUM_THREADS=1 gives steadier figures")
    now = _dt.datetime.now().astimezone()
    return {
        "report": "ssb-fast bench kernels",
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": {"spec": str(device), "name": name, "detail": describe_device(device), "load_average_1m": load},
        "versions": versions(device),
        "sizes": asdict(sizes),
        "repeat": repeat,
        "timing": timing_method(device, repeat),
        "peak": {**peak, "copy_gb_per_s": copy_gb_s, "copy_bytes": copy_bytes},
        "results": rows,
        "findings": findings(rows),
        "notes": notes,
        "telemetry": whole.summary(),
    }


# ------------------------------------------------------------------------------ markdown
def _fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def telemetry_line(summary: dict) -> str:
    """One line of a telemetry summary: GPU, utilisation, power, clock, energy; or why there was none."""
    if not summary.get("gpu"):
        return f"no GPU telemetry ({summary.get('reason')})"
    parts = [f"{summary['gpu'].get('name')} (matched by {summary['gpu'].get('matched_by')})",
             f"{summary['duration_s']:.1f} s, {summary['samples']} samples"]
    for key, label, unit in (("utilization_pct", "util", "%"), ("power_w", "power", " W"),
                             ("sm_clock_mhz", "SM clock", " MHz"), ("memory_used_gib", "memory", " GiB")):
        stats = summary.get(key)
        if stats:
            parts.append(f"{label} mean {stats['mean']:.0f}{unit} / p95 {stats['p95']:.0f}{unit} / "
                         f"max {stats['max']:.0f}{unit}")
    if summary.get("energy_j") is not None:
        parts.append(f"energy {summary['energy_j']:.1f} J ({summary['energy_source']})")
    return "; ".join(parts + list(summary.get("notes") or []))


def render_markdown(report: dict) -> str:
    """The report as markdown: context lines, one table row per op and version, findings, notes."""
    v, peak, dev = report["versions"], report["peak"], report["device"]
    if peak.get("known"):
        peak_line = (f"{peak['model']}: {peak['bf16_dense_tflops']:g} TFLOP/s bf16 dense, "
                     f"{peak['hbm_tb_per_s']:g} TB/s HBM ({peak['source']})")
    else:
        peak_line = peak["note"]
    lines = [
        f"# ssb-fast bench kernels — {report['date']}, {dev['name']}",
        "",
        f"- device: {dev['detail']}",
        f"- versions: ssb-fast {v['ssb_fast']}, torch {v['torch']}, triton {v['triton'] or 'not installed'}, "
        f"CUDA {v['cuda'] or 'none'}, python {v['python']}",
        f"- sizes: batch {report['sizes']['batch']} masks at {report['sizes']['size']}², "
        f"{report['sizes']['scans']} scans x {report['sizes']['experts']} experts for the metrics ops",
        f"- timing: {report['timing']}",
        f"- peak: {peak_line}; measured copy {peak['copy_gb_per_s']:.1f} GB/s",
        f"- telemetry: {telemetry_line(report['telemetry'])}",
        "",
        "| op | impl | median ms | p20–p80 ms | first call s | MB moved | GB/s | % HBM peak | % copy BW "
        "| TFLOP/s | % FLOP peak | vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = {r["op"]: r["median_ms"] for r in report["results"] if r["impl"] == "eager" and r["status"] == "ok"}
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['impl']} | {r['status']}: {r['reason']} |" + " |" * 9)
            continue
        speedup = eager[r["op"]] / r["median_ms"] if r["op"] in eager else None
        lines.append(
            f"| {r['op']} | {r['impl']} | {_fmt(r['median_ms'], '.4g')} | {_fmt(r['p20_ms'], '.3g')}–"
            f"{_fmt(r['p80_ms'], '.3g')} | {_fmt(r['first_call_s'], '.3g')} | {r['bytes'] / 1e6:.3g} | "
            f"{_fmt(r['gb_per_s'])} | {_fmt(r['pct_peak_bandwidth'], '.1f')} | "
            f"{_fmt(r['pct_copy_bandwidth'], '.1f')} | "
            f"{_fmt(r['tflop_per_s'])} | {_fmt(r['pct_peak_flops'], '.1f')} | "
            f"{'–' if speedup is None else f'{speedup:.2f}x'} |"
        )
    lines += ["", "## Findings", ""]
    lines += [f"- {f['text']}" for f in report["findings"]] or ["- none: every version beats the simpler ones"]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
