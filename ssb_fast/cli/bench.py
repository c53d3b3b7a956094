"""`ssb-fast bench`: measurements of the ops, the sampler and the GPU, written as JSON + markdown reports.

`bench_app` is the sub-app every bench command registers on (`kernels` here; `nfe`, `throughput` and
`gpu-check` join it the same way). Reports go to `bench/results/<YYYY-MM-DD>-<device-slug>/` unless
`--out` says otherwise.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Annotated

import typer

from ssb_fast.atomic import write_bytes_atomic, write_json_atomic
from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, app, fail, print_json
from ssb_fast.devices import resolve_device

bench_app = typer.Typer(
    name="bench",
    help="Measure the fused ops against torch.compile and eager PyTorch (and, as they land, NFE against "
    "quality, sampler throughput and a whole GPU check); each writes a JSON and a markdown report.",
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

