"""`ssb-fast evaluate`: the metrics of a samples folder, per scan and on average, as a table or JSON."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from ssb_fast.atomic import write_json_atomic
from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, ThreadsOption, app, fail, print_json
from ssb_fast.devices import resolve_device, set_threads
from ssb_fast.metrics import CONVENTIONS, METRIC_NAMES
from ssb_fast.metrics import evaluate as evaluate_masks
from ssb_fast.samples_io import SampleSet, SamplesFormatError, read_samples_npz, resolve_samples_path

METRICS_FILE = "metrics.json"
COLUMNS = (("ged", "GED"), ("d_max", "D_max"), ("d_a", "D_a"), ("s_c", "S_c"), ("ci", "CI"),
           ("hm_iou", "HM-IoU"), ("ddi_e", "DDI_e"), ("ddi_g", "DDI_g"))
EMPTY_NOTE = ("empty masks: IoU(∅,∅) = Dice(∅,∅) = 1; S_c = 1 when the expert union is empty; "
              "GED squared, over all ordered pairs including i = j; missing experts left out")


def evaluate_sample_set(sample_set: SampleSet, device: torch.device, batch_size: int = 16,
                        progress: bool = True) -> dict:
    """Metrics of every scan of `sample_set` (one `pair_counts` call per `batch_size` scans) and their mean.

    Returns the report `evaluate` prints and writes: n_samples, per-scan rows, the mean, the conventions.
    """
    if not sample_set.has_experts:
        where = sample_set.path or "the samples"
        raise SamplesFormatError(f"{where}: no experts' masks to score against (M = 0): these masks were "
                                 f"sampled from image files; sample a dataset split (ssb-fast sample --data DIR) "
                                 f"to evaluate")
    n_scans = sample_set.n_scans
    columns: dict[str, list] = {name: [] for name in (*METRIC_NAMES, "n_experts")}
    chunks = range(0, n_scans, batch_size)
    with _progress(len(chunks) > 1 and progress, n_scans) as advance:
        for start in chunks:
            stop = min(start + batch_size, n_scans)
            result = evaluate_masks(sample_set.samples[start:stop], sample_set.experts[start:stop],
                                    sample_set.present[start:stop], device=device)
            for name in columns:
                columns[name].extend(result[name].tolist())
            advance(stop - start)
    scans = [{"case_id": case, **{name: columns[name][i] for name in columns}}
             for i, case in enumerate(sample_set.case_ids)]
    mean = {name: (sum(columns[name]) / n_scans if n_scans else None) for name in METRIC_NAMES}
    return {
        "input": str(sample_set.path) if sample_set.path else None,
        "n_scans": n_scans,
        "n_samples": int(sample_set.samples.shape[1]),
        "n_experts_max": int(sample_set.experts.shape[1]),
        "mean": mean,
        "scans": scans,
        "conventions": CONVENTIONS,
    }


class _progress:
    """A rich bar on stderr over scans, only when asked for and stderr is a terminal."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("scans"),
                             TimeRemainingColumn(), console=Console(stderr=True))
        self._bar.__enter__()
        task = self._bar.add_task("evaluate", total=self.total)
        return lambda n: self._bar.update(task, advance=n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


def format_table(report: dict) -> str:
    """The per-scan table, the mean row, N and how empty masks were treated."""
    width = max([4, *(len(s["case_id"]) for s in report["scans"])])
    head = f"{'case':<{width}}  {'M':>2}  " + "  ".join(f"{title:>7}" for _, title in COLUMNS)
    lines = [f"N = {report['n_samples']} samples per scan, M ≤ {report['n_experts_max']} experts "
             f"(present ones), {report['n_scans']} scan(s)", head, "-" * len(head)]
    for scan in report["scans"]:
        values = "  ".join(f"{scan[name]:>7.4f}" for name, _ in COLUMNS)
        lines.append(f"{scan['case_id']:<{width}}  {scan['n_experts']:>2}  {values}")
    if report["n_scans"]:
        lines.append("-" * len(head))
        values = "  ".join(f"{report['mean'][name]:>7.4f}" for name, _ in COLUMNS)
        lines.append(f"{'mean':<{width}}  {'':>2}  {values}")
    lines.append(EMPTY_NOTE)
    return "\n".join(lines)


@app.command()
def evaluate(
    path: Annotated[Path, typer.Argument(
        metavar="SAMPLES",
        help="A samples folder written by `ssb-fast sample` (holding samples.npz), or an .npz with "
             "`samples` (B,N,H,W) and `experts` (B,M,H,W), optionally `present` and `case_ids`.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o",
        help="Where to write the metrics JSON [default: metrics.json next to the input].")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, show_default=True,
        help="Scans per Gram-kernel call (memory grows with it).")] = 16,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar on stderr.")] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    json_out: JsonOption = False,
) -> None:
    """Score sampled masks against the experts: GED, D_max, D_a, S_c, CI, HM-IoU, DDI per scan and mean.

    Every pair metric comes from one exact intersection-count kernel call per batch of scans. The
    numbers depend on N, the samples per scan, which is printed with them. Writes metrics.json
    (or --out); --json prints that JSON instead of the table.
    """
    try:
        dev = resolve_device(device)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    set_threads(threads)
    try:
        sample_set = read_samples_npz(path)
        report = evaluate_sample_set(sample_set, dev, batch_size, progress=not no_progress)
    except (SamplesFormatError, ValueError, TypeError) as err:
        fail(str(err), ExitCode.BAD_DATA)
    target = out if out is not None else resolve_samples_path(path).parent / METRICS_FILE
    try:
        write_json_atomic(target, report)
    except OSError as err:
        fail(f"cannot write {target}: {err}", ExitCode.RUNTIME)
    if json_out:
        print_json(report)
        return
    typer.echo(format_table(report))
    typer.echo(f"wrote {target}")
