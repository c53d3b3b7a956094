"""`ssb-fast bench`: measurements of the ops, the sampler and the GPU, written as JSON + markdown reports.

`bench_app` is the sub-app every bench command registers on (`kernels` here; `nfe`, `throughput` and
`gpu-check` join it the same way). Reports go to `bench/results/<YYYY-MM-DD>-<device-slug>/` unless
`--out` says otherwise.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from pathlib import Path
from typing import Annotated

import typer

from ssb_fast.atomic import write_bytes_atomic, write_json_atomic
from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, ThreadsOption, app, fail, print_json
from ssb_fast.devices import resolve_device, set_threads

bench_app = typer.Typer(
    name="bench",
    help="Measure quality against NFE, the sampler against eager and compiled baselines, the fused ops "
    "against torch.compile and eager PyTorch, and the whole GPU story in one command; each writes a JSON and "
    "a markdown report under bench/results/<date>-<device>/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(bench_app, name="bench")

RESULTS_ROOT = Path("bench/results")
KERNELS_STEM = "kernels"  # kernels.json + kernels.md

OutDirOption = Annotated[
    Path | None,
    typer.Option("--out", metavar="DIR", file_okay=False,
                 help="Folder for the reports. Default: bench/results/<YYYY-MM-DD>-<device-slug>/."),
]
NoProgressOption = Annotated[bool, typer.Option("--no-progress", help="Do not name each timing on stderr.")]


def device_slug(name: str) -> str:
    """A folder-safe name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def default_out_dir(device_name: str, date: str | None = None, root: Path = RESULTS_ROOT) -> Path:
    """bench/results/<YYYY-MM-DD>-<device-slug>/, the folder bench reports go to by default."""
    date = date or _dt.date.today().isoformat()
    return root / f"{date}-{device_slug(device_name)}"


def write_report(out_dir: Path, stem: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md` in `out_dir` (created), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return (write_json_atomic(out_dir / f"{stem}.json", report),
            write_bytes_atomic(out_dir / f"{stem}.md", markdown.encode()))


def publish_report(out: Path | None, device: str, stem: str, report: dict, markdown: str, json_out: bool) -> None:
    """Write `<stem>.json` and `<stem>.md` (to --out or the default folder for `device`), then print the
    markdown and where it went, or the report as JSON with --json."""
    out_dir = out if out is not None else default_out_dir(device, report["date"])
    paths = write_report(out_dir, stem, report, markdown)
    if json_out:
        print_json(report)
        return
    typer.echo(markdown)
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def _split(values: list[str] | None, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """Repeated or comma-separated option values, checked against `allowed` (exit 2 on a stranger)."""
    if not values:
        return allowed
    picked = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    unknown = [v for v in picked if v not in allowed]
    if unknown:
        fail(f"{option} must be among {', '.join(allowed)}; got {', '.join(unknown)}", ExitCode.BAD_ARGUMENTS)
    return picked


@bench_app.command("kernels")
def kernels(
    batch: Annotated[int, typer.Option(
        "--batch", min=1, show_default=True,
        help="Masks per sampling chunk (B): bridge_sample's batch, cfg_step's B (it reads a 2B network "
        "output), the samples per scan of pair_counts and pairwise_jsd.")] = 256,
    size: Annotated[int, typer.Option("--size", min=1, show_default=True, help="Image side in pixels.")] = 128,
    scans: Annotated[int, typer.Option(
        "--scans", min=1, show_default=True, help="Scans per metrics batch (pair_counts, pairwise_jsd).")] = 8,
    experts: Annotated[int, typer.Option(
        "--experts", min=1, show_default=True, help="Expert masks per scan (pair_counts, pairwise_jsd).")] = 4,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    out: OutDirOption = None,
    repeat: Annotated[int, typer.Option(
        "--repeat", min=1, show_default=True,
        help="Timed calls per version on CPU; on CUDA do_bench runs for 5 ms per repeat.")] = 20,
    ops: Annotated[list[str] | None, typer.Option(
        "--op", metavar="OP",
        help="Op(s) to time (repeat or comma-separate): bridge_sample, cfg_step, pair_counts, pairwise_jsd. "
        "Default: all.")] = None,
    impls: Annotated[list[str] | None, typer.Option(
        "--impl", metavar="IMPL",
        help="Version(s) to time: triton (CUDA only), compiled (the reference under torch.compile), eager. "
        "Default: all.")] = None,
    json_out: JsonOption = False,
    no_progress: NoProgressOption = False,
) -> None:
    """Time each fused op three ways (Triton kernel, compiled reference, eager) with GB/s and % of peak.

    Writes kernels.json and kernels.md into --out and prints the table. On CUDA: do_bench medians and
    NVML telemetry around each timed region. On CPU only the compiled reference and eager PyTorch are
    timed (Triton runs there only in its interpreter); compile time is reported apart. A small run:
    `ssb-fast bench kernels --device cpu --batch 8 --size 32 --repeat 5`.
    """
    from ssb_fast.bench.kernels import IMPLS, OPS, KernelSizes, device_name, render_markdown, run_kernel_bench

    try:
        dev = resolve_device(device)
        set_threads(threads)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    op_list = _split(ops, OPS, "--op")
    impl_list = _split(impls, IMPLS, "--impl")
    sizes = KernelSizes(batch=batch, size=size, scans=scans, experts=experts)
    log = None if no_progress else (lambda message: typer.echo(f"timing {message}", err=True))
    try:
        report = run_kernel_bench(sizes, dev, repeat=repeat, ops=op_list, impls=impl_list, log=log)
    except RuntimeError as err:  # torch.OutOfMemoryError included
        fail(f"bench kernels on {dev}: {err}")
    out_dir = out if out is not None else default_out_dir(device_name(dev), report["date"])
    markdown = render_markdown(report)
    try:
        json_path, md_path = write_report(out_dir, KERNELS_STEM, report, markdown)
    except OSError as err:
        fail(f"cannot write the report into {out_dir}: {err}")
    failed = [f"{r['op']} {r['impl']} ({r['reason']})" for r in report["results"] if r["status"] == "failed"]
    if failed:
        typer.echo(f"warning: {len(failed)} version(s) failed and have no timing: {'; '.join(failed)}", err=True)
    if json_out:
        print_json(report)
        return
    typer.echo(markdown, nl=False)
    typer.echo(f"\nwrote {json_path} and {md_path}")



def _numbers(text: str, kind, option: str, low: float) -> list:
    """A comma-separated list of numbers (exit 2 naming the option on a bad one)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers; got {text!r}", ExitCode.BAD_ARGUMENTS)
    if not values or any(not math.isfinite(v) or v < low for v in values):
        fail(f"{option} needs finite numbers >= {low:g}; got {text!r}", ExitCode.BAD_ARGUMENTS)
    return values


def _model_and_scored_split(model: Path, data: Path, split: str, device):
    """(net, bridge, dataset) for the quality benches; exits 3 naming the data when the split has no reader
    masks to score against."""
    from ssb_fast.data import DataFormatError, load

    net, bridge = load_bench_model(model, "", None, device)
    try:
        dataset = load(data, split)
    except DataFormatError as err:
        fail(str(err), ExitCode.BAD_DATA)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    if dataset.n_raters == 0 or len(dataset) == 0:
        fail(f"{data}: split {split!r} has no cases with reader masks to score against", ExitCode.BAD_DATA)
    return net, bridge, dataset


def load_bench_model(model: Path | None, preset: str, size: int | None, device):
    """(net, bridge) from a run folder or checkpoint, else a `preset` U-Net with random weights."""
    from ssb_fast.bench.throughput import random_model
    from ssb_fast.bridge import Bridge
    from ssb_fast.checkpoint import CheckpointError, load_model

    if model is not None:
        path = model / "model.safetensors" if model.is_dir() else model
        try:
            net = load_model(path, device=device)
            bridge = Bridge(**net.run_config["bridge"])
        except CheckpointError as err:
            fail(str(err), ExitCode.BAD_CHECKPOINT)
        except (KeyError, TypeError, ValueError) as err:
            fail(f"{path}: the checkpoint's bridge settings cannot build a Bridge ({err})", ExitCode.BAD_CHECKPOINT)
        return net, bridge
    try:
        return random_model(preset, size or 128), Bridge()
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)


@bench_app.command("throughput", epilog=(
    "Examples:\n\n"
    "  ssb-fast bench throughput --preset tiny --size 64 -n 16,64 --nfe 20\n\n"
    "  ssb-fast bench throughput --model runs/lidc -n 256 --nfe 50 --guidance 1.5,1"))
def throughput(
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="RUN", help="A run folder or model.safetensors; without it, --preset with random "
                                       "weights (speed does not depend on them).")] = None,
    preset: Annotated[str, typer.Option("--preset", show_default=True, help="U-Net preset without --model.")]
    = "tiny",
    size: Annotated[int | None, typer.Option("--size", min=8, help="Image size without --model [default: 128].")]
    = None,
    n_samples: Annotated[str, typer.Option("-n", "--n-samples", show_default=True,
                                           help="Masks per scan, comma-separated: one case each.")] = "16,64,256",
    nfe: Annotated[int, typer.Option("--nfe", min=1, show_default=True, help="Steps per mask.")] = 50,
    guidance: Annotated[str, typer.Option(
        "--guidance", show_default=True,
        help="Guidance weights, comma-separated: 1.5 evaluates 2B rows per step; 1 (or 0) B rows, and adds "
             "ours-2B, the same run forced onto 2B rows.")] = "1.5,1",
    scans: Annotated[int, typer.Option("--scans", min=1, show_default=True, help="Scans per case.")] = 1,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", min=1, help="Masks per chunk [default: every mask of a case, at most 256 on CUDA, 64 on "
                                   "CPU].")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, show_default=True,
                                        help="Interleaved timed rounds (median reported).")] = 3,
    samplers: Annotated[list[str] | None, typer.Option(
        "--sampler", help="Samplers to time (repeat or comma-separate): ours, ours-2B, eager, eager-compiled "
                          "[default: all].")] = None,
    compile_ours: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile our sampler's U-Net [default: on with CUDA].")] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    out: OutDirOption = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Masks/s of our sampler against an eager I2SB-style loop and the same loop with a compiled U-Net.

    Same weights, same scans, one process, timed interleaved; warm-up (compile, autotune, capture) is
    reported apart and never enters masks/s. On CUDA each figure is also a fraction of the U-Net's FLOP
    floor at the device's bf16 peak. Writes throughput.json and throughput.md.
    """
    from ssb_fast.bench.throughput import SAMPLERS, ThroughputCase, render_markdown, run_throughput

    try:
        dev = resolve_device(device)
        set_threads(threads)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    ns = _numbers(n_samples, int, "-n", 1)
    ws = _numbers(guidance, float, "--guidance", 0)
    which = _split(samplers, SAMPLERS, "--sampler")
    net, bridge = load_bench_model(model, preset, size, dev)
    cases = [ThroughputCase(n_samples=n, nfe=nfe, guidance=w, scans=scans, max_batch=max_batch) for w in ws
             for n in ns]
    log = None if no_progress else (lambda message: typer.echo(message, err=True))
    try:
        report = run_throughput(net, cases, dev, which, rounds, compile_ours, bridge=bridge, log=log)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    publish_report(out, report["device_name"], "throughput", report, render_markdown(report), json_out)


@bench_app.command("nfe", epilog=(
    "Example:\n\n"
    "  ssb-fast bench nfe --model runs/lidc --data data/lidc64 --split test --nfe 1,2,5,10,20,50 -n 16 --cases 96\n\n"
    "  ssb-fast bench nfe ... --num-parts 2 --part-id 0 --out OUT ; ssb-fast bench nfe ... --num-parts 2 "
    "--part-id 1 --out OUT   (two processes; the last to finish writes the report)"))
def nfe(
    model: Annotated[Path, typer.Option("--model", metavar="RUN", help="A run folder or model.safetensors.")],
    data: Annotated[Path, typer.Option("--data", metavar="DATASET", help="A dataset folder with reader masks.")],
    split: Annotated[str, typer.Option("--split", show_default=True, help="The split to score.")] = "test",
    nfes: Annotated[str, typer.Option("--nfe", show_default=True, help="NFE values, comma-separated.")]
    = "1,2,5,10,20,50,100,200",
    n_samples: Annotated[int, typer.Option("-n", "--n-samples", min=1, show_default=True,
                                           help="Masks per case (the N of GED_N).")] = 16,
    cases: Annotated[int | None, typer.Option(
        "--cases", min=1, help="K cases spread evenly over the split (never its first K) [default: all].")] = None,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, show_default=True,
                                            help="Classifier-free guidance w.")] = 1.0,
    first_step_noise: Annotated[float, typer.Option(
        "--first-step-noise", show_default=True,
        help="Factor on the first step's noise std (1 = I2SB's posterior; see `bench bridge-odds`).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, show_default=True, help="Seed of the keyed noise.")] = 0,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Masks per chunk.")] = None,
    num_parts: Annotated[int | None, typer.Option(
        "--num-parts", metavar="K", min=1,
        help="Split the cases into K parts and sample only part --part-id (every K-th case from --part-id) into "
             "OUT/parts/; run the K parts anywhere with the same options and --out, and the last to finish "
             "writes the report, the same as one process would (masks/s: one process's rate).")] = None,
    part_id: Annotated[int | None, typer.Option(
        "--part-id", metavar="I", min=0, help="Which part this process samples, 0..K-1 (with --num-parts).")]
    = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    out: OutDirOption = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Quality against NFE: every metric (mean ± s.e. over cases) at each NFE, with masks/s.

    Beside the model, on the same cases: no diversity (N copies of the readers' majority), the model's
    own consensus (N copies of its majority at the largest NFE) and the readers (N draws from them). The
    model's GED is given as a ratio to no diversity with a bootstrap interval. Writes nfe.json, nfe.md
    and nfe.png (with the `plot` extra: pip install 'ssb-fast[plot]').
    """
    from ssb_fast.bench.nfe import plot, render_markdown, run_nfe_sweep
    from ssb_fast.bench.nfe_parts import PartError
    from ssb_fast.sharding import make_shard

    try:
        dev = resolve_device(device)
        set_threads(threads)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    try:  # the same rule and checks as `sample --num-parts`; torchrun's ranks are not parts here
        make_shard(num_parts, part_id, env={})
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    if num_parts is not None and out is None:
        fail("--num-parts needs --out DIR: the parts meet in that folder", ExitCode.BAD_ARGUMENTS)
    if not 0 < first_step_noise < math.inf:
        fail(f"--first-step-noise must be a finite number > 0; got {first_step_noise!r}", ExitCode.BAD_ARGUMENTS)
    steps = _numbers(nfes, int, "--nfe", 1)
    net, bridge, dataset = _model_and_scored_split(model, data, split, dev)
    log = None if no_progress else (lambda message: typer.echo(message, err=True))
    try:
        if num_parts is None:
            report = run_nfe_sweep(net, bridge, dataset, steps, n_samples, cases, guidance, seed, dev, max_batch,
                                   log, first_step_noise)
        else:
            report = _nfe_part(net, bridge, dataset, steps, n_samples, cases, guidance, seed, dev, max_batch, log,
                               num_parts, part_id, out, first_step_noise)
    except PartError as err:
        fail(str(err), ExitCode.BAD_DATA)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    if report is None:
        return
    report["model"]["path"] = str(model)
    out_dir = out if out is not None else default_out_dir(report["device_name"], report["date"])
    paths = write_report(out_dir, "nfe", report, render_markdown(report))
    png = out_dir / "nfe.png"
    plotted = plot(report, png)
    if json_out:
        print_json(report)
        return
    typer.echo(render_markdown(report))
    typer.echo(f"wrote {paths[0]}, {paths[1]}" + (f" and {png}" if plotted else
                                                   " (no nfe.png: pip install 'ssb-fast[plot]' for matplotlib)"))


def _nfe_part(net, bridge, dataset, nfes, n_samples, cases, guidance, seed, device, max_batch, log, num_parts,
              part_id, out, first_step_noise=1.0):
    """Sample part `part_id` of `num_parts` into OUT/parts/; the report when every part is there, else None
    (after saying which parts are missing)."""
    from ssb_fast.bench.nfe import sample_sweep, score_sweep
    from ssb_fast.bench.nfe_parts import assemble_parts, missing_parts, part_cases, part_path, save_part, sweep_settings
    from ssb_fast.references import spread_cases

    picks = spread_cases(len(dataset), cases)
    if num_parts > len(picks):
        raise ValueError(f"--num-parts {num_parts} is more than the {len(picks)} case(s) to score")
    mine = part_cases(picks, part_id, num_parts)
    settings = sweep_settings(net, dataset, picks, nfes, n_samples, guidance, seed, num_parts, first_step_noise)
    if log:
        log(f"part {part_id} of {num_parts}: {len(mine)} of {len(picks)} cases")
    sampled = sample_sweep(net, bridge, dataset, mine, nfes, n_samples, guidance, seed, device, max_batch, log,
                           first_step_noise)
    path = save_part(part_path(out, part_id, num_parts), settings, part_id, mine, sampled)
    missing = missing_parts(out, num_parts)
    if missing:
        typer.echo(f"wrote {path} (part {part_id} of {num_parts}); waiting for part(s) "
                   f"{', '.join(map(str, missing))}: the last part to finish writes the report in {out}")
        return None
    report = score_sweep(net, dataset, picks, cases, assemble_parts(out, settings, picks), n_samples, guidance,
                         seed, device, first_step_noise)
    report["data"]["parts"] = num_parts
    return report


@bench_app.command("settings", epilog=(
    "Example:\n\n"
    "  ssb-fast bench settings --model runs/lidc --data data/lidc64 --split val --cases 64 --nfe 10 "
    "--guidance 0,1,1.5 --labels cycle,random --first-step-noise 1,1.5,2 --threshold -0.2,0,0.2"))
def settings(
    model: Annotated[Path, typer.Option("--model", metavar="RUN", help="A run folder or model.safetensors.")],
    data: Annotated[Path, typer.Option("--data", metavar="DATASET", help="A dataset folder with reader masks.")],
    split: Annotated[str, typer.Option("--split", show_default=True,
                                       help="The split to score (choose settings on val, report on test).")] = "val",
    nfe_: Annotated[int, typer.Option("--nfe", min=1, show_default=True, help="Steps per mask.")] = 10,
    n_samples: Annotated[int, typer.Option("-n", "--n-samples", min=1, show_default=True,
                                           help="Masks per case (the N of GED_N).")] = 16,
    cases: Annotated[int | None, typer.Option(
        "--cases", min=1, help="K cases spread evenly over the split (never its first K) [default: all].")] = None,
    guidances: Annotated[str, typer.Option("--guidance", show_default=True,
                                           help="Guidance values w, comma-separated.")] = "1",
    label_modes: Annotated[str, typer.Option(
        "--labels", show_default=True, help="Label modes, comma-separated: cycle (mask i gets expert i mod M), "
                                            "random (drawn per mask).")] = "cycle",
    first_step_noises: Annotated[str, typer.Option(
        "--first-step-noise", show_default=True,
        help="Factors on the first step's noise std, comma-separated (1 = I2SB's posterior; more lets a "
             "large region be marked in some masks and not in others, see `bench bridge-odds`).")] = "1",
    thresholds: Annotated[str, typer.Option(
        "--threshold", show_default=True, help="Thresholds on x0̂ in (-1, 1), comma-separated; mask = x0̂ > t.")]
    = "0",
    seed: Annotated[int, typer.Option("--seed", min=0, show_default=True, help="Seed of the keyed noise.")] = 0,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Masks per chunk.")] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    out: OutDirOption = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Sampling settings against quality: guidance w, label mode, first-step noise and the x0̂ threshold.

    Every (labels, w, first-step noise) is sampled once with the same keyed noise; each threshold is applied to the same
    soft x0̂. Scores as `bench nfe` (mean ± s.e., ratio to no diversity with a bootstrap interval, empty
    rate, reader subsets). Writes settings.json and settings.md.
    """
    from ssb_fast.bench.settings import render_markdown, run_settings_sweep

    try:
        dev = resolve_device(device)
        set_threads(threads)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    ws = _numbers(guidances, float, "--guidance", 0)
    modes = [m.strip() for m in label_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("cycle", "random")]
    if not modes or bad:
        fail(f"--labels takes cycle and/or random; got {label_modes!r}", ExitCode.BAD_ARGUMENTS)
    cuts = _numbers(thresholds, float, "--threshold", -1)
    noises = _numbers(first_step_noises, float, "--first-step-noise", 1e-6)
    net, bridge, dataset = _model_and_scored_split(model, data, split, dev)
    log = None if no_progress else (lambda message: typer.echo(message, err=True))
    try:
        report = run_settings_sweep(net, bridge, dataset, nfe_, n_samples, cases, ws, modes, cuts, seed, dev,
                                    max_batch, log, first_step_noises=noises)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    report["model"]["path"] = str(model)
    publish_report(out, report["device_name"], "settings", report, render_markdown(report), json_out)


@bench_app.command("bridge-odds", epilog=(
    "Example:\n\n"
    "  ssb-fast bench bridge-odds --beta-max 0.3,1,3,10,30 --nfe 10,20 --area 10,30,100,300 --prior 0.3,0.6\n\n"
    "  ssb-fast bench bridge-odds --beta-max 10 --nfe 10,20 --first-step-noise 1,1.5,2 --area 30,100,300,600"))
def bridge_odds(
    beta_maxes: Annotated[str, typer.Option("--beta-max", show_default=True,
                                            help="Bridge beta_max values, comma-separated.")] = "0.3,1,3,10,30",
    nfes: Annotated[str, typer.Option("--nfe", show_default=True, help="NFE values, comma-separated.")] = "10,20",
    areas: Annotated[str, typer.Option("--area", show_default=True,
                                       help="Region areas in pixels, comma-separated (LIDC nodules at 64² and "
                                            "1 mm: median ~30 px).")] = "10,30,100,300",
    priors: Annotated[str, typer.Option("--prior", show_default=True,
                                        help="P(marked) of the region, comma-separated, each in (0, 1).")] = "0.3,0.6",
    first_step_noises: Annotated[str, typer.Option(
        "--first-step-noise", show_default=True,
        help="Factors on the first step's noise std, comma-separated (1 = I2SB's posterior).")] = "1",
    n_timesteps: Annotated[int, typer.Option("--n-timesteps", min=2, show_default=True,
                                             help="Bridge timesteps.")] = 1000,
    n_draws: Annotated[int, typer.Option("--draws", min=10, show_default=True,
                                         help="Masks per cell (binomial s.e. ≤ 0.5 / sqrt(draws)).")] = 2000,
    seed: Annotated[int, typer.Option("--seed", min=0, show_default=True, help="Seed of the keyed noise.")] = 0,
    threads: ThreadsOption = None,
    out: OutDirOption = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Whether a bridge setting can draw the readers' odds at all: the sampler with a Bayes-optimal network.

    For a region of A pixels that the readers mark with probability P, a perfect model sampled with this
    project's sampler should mark it in a share P of the masks. Every mask of a scan starts at the scan
    itself, so that choice comes only from the bridge's noise; with little noise (I2SB's beta_max 0.3) the
    first step decides by the posterior mean and the sampler draws the likelier outcome nearly always.
    Runs on the CPU in seconds; writes bridge-odds.json and bridge-odds.md.
    """
    from ssb_fast.bench.bridge_odds import render_markdown, run_bridge_odds

    try:
        set_threads(threads)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    bmax = _numbers(beta_maxes, float, "--beta-max", 1e-6)
    steps = _numbers(nfes, int, "--nfe", 1)
    sizes = _numbers(areas, int, "--area", 1)
    odds = _numbers(priors, float, "--prior", 1e-6)
    noises = _numbers(first_step_noises, float, "--first-step-noise", 1e-6)
    if any(p >= 1 for p in odds):
        fail(f"--prior takes probabilities in (0, 1); got {priors!r}", ExitCode.BAD_ARGUMENTS)
    if n_timesteps % 2:
        fail(f"--n-timesteps must be even (the schedule is mirrored); got {n_timesteps}", ExitCode.BAD_ARGUMENTS)
    log = None if no_progress else (lambda message: typer.echo(message, err=True))
    try:
        report = run_bridge_odds(bmax, steps, sizes, odds, n_timesteps, n_draws, seed, log, noises)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    publish_report(out, "cpu", "bridge-odds", report, render_markdown(report), json_out)


@bench_app.command("gpu-check")
def gpu_check(
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="RUN", help="Also time this trained model (the presets run with random weights).")]
    = None,
    budget: Annotated[float, typer.Option("--budget", min=60, show_default=True,
                                          help="Seconds the whole check may take; steps that would not fit are "
                                               "skipped and listed.")] = 480,
    out: OutDirOption = None,
    no_progress: NoProgressOption = False,
) -> None:
    """Everything a short GPU lease should measure, in one command, into one folder to commit.

    In order: the `gpu`-marked tests (pytest -m gpu), `bench kernels`, `bench throughput` at N = 256 for
    the tiny and ssb++ presets at 128², the sync-debug check of the sampling loop, and the fraction of
    mask pixels that flip in bf16 between --max-batch 5 and 256. Writes gpu-check.json/.md beside each
    bench's report under bench/results/<date>-<device>/. Exits 1 when a GPU test fails; on a machine
    without CUDA it says so and exits 0.
    """
    import torch

    if not torch.cuda.is_available():
        typer.echo(f"no GPU: this torch build ({torch.__version__}) sees no CUDA device, so there is nothing to "
                   "check here; run it on a GPU machine (the CPU path is covered by the default tests)")
        raise typer.Exit(0)
    from ssb_fast.bench.environment import device_name
    from ssb_fast.bench.gpu_check import run_gpu_check

    dev = torch.device("cuda")
    net = load_bench_model(model, "", None, dev)[0] if model is not None else None
    out_dir = out if out is not None else default_out_dir(device_name(dev))
    log = None if no_progress else (lambda message: typer.echo(message, err=True))
    report, code = run_gpu_check(out_dir, budget, net, log)
    typer.echo(f"gpu-check on {report['device_name']}: {report['seconds']:.0f} s; wrote {out_dir}")
    tests = report["steps"].get("gpu_tests")
    if tests:
        typer.echo(f"gpu tests: {tests.get('tests')} run, {tests.get('failures')} failed, {tests.get('errors')} "
                   f"errors, {tests.get('skipped')} skipped")
    for skipped in report["skipped"]:
        typer.echo(f"skipped {skipped}")
    raise typer.Exit(code)
