"""`ssb-fast sample`: N masks per scan from a trained model, into a folder a person can open."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, ThreadsOption, app, fail, print_json
from ssb_fast.demo import CPU_SAMPLES, CUDA_SAMPLES, DEFAULT_OUT

DEFAULT_SAMPLES, DEFAULT_NFE = 16, 20

class LabelMode(str, Enum):
    cycle = "cycle"
    random = "random"


class Precision(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


EPILOG = (
    "Examples:\n\n"
    "  ssb-fast sample   (the bundled demo into ./ssb-out)\n\n"
    "  ssb-fast sample --model runs/tiny --data data/synthetic --cases 4 --n-samples 64 --out samples/tiny\n\n"
    "  ssb-fast evaluate samples/tiny\n\n"
    "  ssb-fast sample --model runs/tiny/model.safetensors --images scans/*.png --out samples/mine\n\n"
    "  ssb-fast sample --model runs/tiny --images ct.nii.gz --slices 40:60 --out samples/ct   "
    "(slices 40..59 along the last axis; maps back as NIfTI in OUT/nifti)\n\n"
    "Sharding (every part writes its own case files into the one OUT; the run's samples.npz, summary.json "
    "and run.json are assembled once every case is there):\n\n"
    "  torchrun --nproc-per-node 8 -m ssb_fast.cli sample --model RUN --data DATA --out OUT   "
    "(one process per GPU, cuda:LOCAL_RANK; rank 0 assembles)\n\n"
    "  ssb-fast sample ... --num-parts 2 --part-id 0 --out OUT ; ssb-fast sample ... --num-parts 2 --part-id 1 "
    "--out OUT   (separate jobs, e.g. a job array: --part-id $SLURM_ARRAY_TASK_ID)\n\n"
    "  ssb-fast sample ... --continue --out OUT   (no parts: samples whatever is missing and assembles)\n\n"
    "The demo: `ssb-fast sample` with no model or scans (or `ssb-fast sample --demo --out DIR`) samples the "
    "bundled model on the bundled scans into ./ssb-out and prints each scan's metrics against its readers."
)


@app.command(epilog=EPILOG)
def sample(
    files: Annotated[list[Path] | None, typer.Argument(
        metavar="FILE", show_default=False,
        help="More image files, as for --images (so that `--images scans/*.png` takes every file).")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="PATH",
        help="A run folder of `ssb-fast train` (its model.safetensors) or a model .safetensors file.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="DIR",
        help="Dataset folder: sample scans of --split, and keep their experts' masks so that "
             "`ssb-fast evaluate OUT` works next.")] = None,
    split: Annotated[str, typer.Option("--split", metavar="SPLIT", show_default=True,
                                       help="Split of --data: train, val or test.")] = "test",
    cases: Annotated[int | None, typer.Option(
        "--cases", metavar="N", min=1, help="Only the first N cases of the split [default: all].")] = None,
    case_ids: Annotated[str | None, typer.Option(
        "--case-ids", metavar="A,B,C", help="Only these cases of the split (comma-separated ids).")] = None,
    images: Annotated[list[Path] | None, typer.Option(
        "--images", metavar="FILE",
        help="Image files (png, jpg, npy, nii, nii.gz) or folders of them, mapped to [-1, 1] as `ssb-fast data "
             "import-folder` does. They have no experts, so there is nothing to evaluate. A NIfTI file gets its "
             "mean, entropy and majority back as NIfTI with its affine (needs the nifti extra: "
             "pip install 'ssb-fast[nifti]').")] = None,
    axis: Annotated[int | None, typer.Option(
        "--axis", metavar="A", min=0, max=2,
        help="Spatial axis (0, 1 or 2) along which 3-D NIfTI volumes are cut into 2-D slices [default: 2, "
             "the last].")] = None,
    slices: Annotated[str | None, typer.Option(
        "--slices", metavar="A:B",
        help="Slices of 3-D NIfTI volumes to sample, counted from 0 along --axis: 40 (one), 40:60 (40..59), "
             "10:20,35 (a list), 0: (all). Required for volumes; the maps come back as volumes of the input's "
             "shape, NaN (mean, entropy) and 0 (majority) on the slices not sampled.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="OUT",
        help="Output folder: samples.npz, summary.json, run.json, args.json; per case cases/<case>.npz (masks), "
             "cases/<case>.png (preview) and cases/<case>/ (case.json with metrics, mean, entropy and majority "
             "as .npy and .png, grid.png); nifti/ for NIfTI inputs.")] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Sample the bundled model on the bundled scans (what `ssb-fast sample` with no model "
                       "and no scans does) and print each scan's metrics against its readers beside the "
                       "no-diversity reference [default --out: ./ssb-out].")] = False,
    n_samples: Annotated[int | None, typer.Option(
        "--n-samples", "-n", min=1, show_default=False,
        help=f"Masks per scan [default: {DEFAULT_SAMPLES}; the demo: {CPU_SAMPLES} on CPU, {CUDA_SAMPLES} on "
             f"CUDA].")] = None,
    nfe: Annotated[int | None, typer.Option(
        "--nfe", min=1, show_default=False,
        help=f"Network evaluations (steps) per mask [default: {DEFAULT_NFE}; the demo: the NFE its manifest "
             f"records, chosen from the model's NFE-quality table].")] = None,
    guidance: Annotated[float, typer.Option(
        "--guidance", min=0.0, show_default=True,
        help="Classifier-free guidance w in u + w(c - u): 1 = conditional only, 0 = unconditional.")] = 1.0,
    first_step_noise: Annotated[float, typer.Option(
        "--first-step-noise", show_default=True,
        help="Factor on the standard deviation of the noise the first step adds (1 = I2SB's posterior). Every "
             "mask starts at the scan, so that noise decides whether a region is marked at all; with few steps "
             "it is too small for a large region, whose masks then all take the likelier outcome. "
             "`ssb-fast bench bridge-odds --first-step-noise` shows the share a perfect model draws.")] = 1.0,
    labels: Annotated[LabelMode, typer.Option(
        "--labels", show_default=True,
        help="Expert label of mask i: cycle = i mod M (the experts covered evenly; for a model trained with "
             "--expert-labels area-rank, label k is the k-th widest reading, so cycling draws every rank equally "
             "often, as the readers' masks do), random = drawn per mask from --seed.")] = LabelMode.cycle,
    ot_ode: Annotated[bool, typer.Option(
        "--ot-ode", help="Deterministic steps (no noise between steps): masks drawn with one label coincide.")]
    = False,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, show_default=True,
        help="Seed of the keyed noise: mask i of a case is the same whatever chunk, part or GPU computed it.")] = 0,
    num_parts: Annotated[int | None, typer.Option(
        "--num-parts", metavar="K", min=1,
        help="Split the cases into K parts and sample only part --part-id: every K-th case, starting at case "
             "--part-id. Run the K parts anywhere (a job array, several machines) into the same --out; the last "
             "to finish assembles samples.npz, or `--continue` without parts does. Under torchrun each part is "
             "split again over the ranks.")] = None,
    part_id: Annotated[int | None, typer.Option(
        "--part-id", metavar="I", min=0, help="Which part this process samples, 0..K-1 (with --num-parts).")]
    = None,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", metavar="B", min=1,
        help="Masks per chunk; the network sees 2B rows, or B at --guidance 1 or 0 [default: 256 on CUDA, "
             "32 on CPU]. On CUDA out-of-memory the chunk is halved.")] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    precision: Annotated[Precision, typer.Option(
        "--precision", show_default=True,
        help="Network weights and activations: auto = bfloat16 on CUDA, float32 on CPU. The state x_t stays "
             "float32.")] = Precision.auto,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the U-Net with fixed shapes (at most two per run: the chunk and the shared first "
             "step) [default: on with CUDA, off on CPU].")] = None,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="Capture each step (U-Net + fused update) as one CUDA graph (CUDA only).")]
    = False,
    soft: Annotated[bool, typer.Option(
        "--soft", help="Also save the soft x0̂ in [-1, 1] (float16) beside the binary masks.")] = False,
    png: Annotated[bool, typer.Option("--png/--no-png", show_default=True,
                                      help="Draw the pictures of every case: preview, grid.png and the mean, "
                                           "entropy and majority PNGs (the .npy maps are always written).")]
    = True,
    resume: Annotated[bool, typer.Option(
        "--continue", help="Reuse the cases already finished in OUT (same settings as its args.json) and "
                           "sample the rest; without --num-parts this also assembles a run sampled in parts.")]
    = False,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bar on stderr (there is none when stderr is not a terminal, nor on "
                              "torchrun ranks other than 0).")] = False,
    json_out: JsonOption = False,
) -> None:
    """Sample N plausible masks per scan from a trained model into a folder a person can open.

    Scans come from a dataset split (--data; their experts' masks are kept, so `ssb-fast evaluate OUT`
    scores them) or from image files (--images; NIfTI volumes slice by slice with --slices). Per case
    OUT gets the masks (cases/<case>.npz), a preview, and a folder with the mean (pixel frequency), the
    entropy of the mean in bits, the majority mask, a grid.png to look at and case.json (its metrics
    against the readers, when there are readers). When every case is there, OUT gets samples.npz,
    summary.json (masks/s, metrics, every case) and run.json (arguments, versions, device, timing,
    shard layout). Finished cases are written after every group of scans, so Ctrl-C loses none: rerun
    with --continue. Cases can be split over processes with --num-parts/--part-id or torchrun.
    """
    from ssb_fast.checkpoint import CheckpointError
    from ssb_fast.data import DataFormatError
    from ssb_fast.nifti_io import parse_slices
    from ssb_fast.sample_folder import CASES_DIR
    from ssb_fast.sample_run import SampleRunError, sample_dataset, sample_images
    from ssb_fast.samples_io import SamplesFormatError
    from ssb_fast.sharding import make_shard

    image_paths = [*(images or []), *(files or [])]
    the_demo = None
    if demo or (model is None and data is None and not image_paths):
        if model is not None or data is not None or image_paths:
            fail("--demo samples the bundled model on the bundled scans; drop --demo to sample --model on "
                 "--data or --images", ExitCode.BAD_ARGUMENTS)
        from ssb_fast.demo import DemoMissingError, find_demo

        try:
            the_demo = find_demo()
        except DemoMissingError as err:
            fail(str(err), ExitCode.RUNTIME)
        model, data = the_demo.model, the_demo.data
        out = out if out is not None else Path(DEFAULT_OUT)
        nfe = nfe if nfe is not None else the_demo.nfe
    if model is None:
        fail("--model is required: a run folder of `ssb-fast train` or its model.safetensors (or run "
             "`ssb-fast sample` with no model and no scans for the bundled demo)", ExitCode.BAD_ARGUMENTS)
    if data is None and not image_paths:
        fail("no scans given: pass --data DIR (a dataset folder) or --images FILE...", ExitCode.BAD_ARGUMENTS)
    if data is not None and image_paths:
        fail("give either --data DIR or image files (--images), not both", ExitCode.BAD_ARGUMENTS)
    if data is None and (cases is not None or case_ids is not None or split != "test"):
        fail("--split, --cases and --case-ids choose scans of --data; image files are sampled as given",
             ExitCode.BAD_ARGUMENTS)
    if data is not None and (axis is not None or slices is not None):
        fail("--axis and --slices cut NIfTI volumes given with --images; a dataset's scans are 2-D",
             ExitCode.BAD_ARGUMENTS)
    if cases is not None and case_ids is not None:
        fail("give either --cases N or --case-ids, not both", ExitCode.BAD_ARGUMENTS)
    ids = None
    if case_ids is not None:
        ids = [c.strip() for c in case_ids.split(",") if c.strip()]
        if not ids:
            fail(f"--case-ids names no case: {case_ids!r}", ExitCode.BAD_ARGUMENTS)
    slice_spec = None
    if slices is not None:
        try:
            slice_spec = parse_slices(slices)
        except ValueError as err:
            fail(str(err), ExitCode.BAD_ARGUMENTS)
    if out is None:
        fail("--out OUT is required: the folder to write samples.npz and the case files into",
             ExitCode.BAD_ARGUMENTS)
    try:
        shard = make_shard(num_parts, part_id)
    except ValueError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)

    from ssb_fast.devices import default_threads, set_threads

    ctx = group = None
    if shard.world_size > 1:  # torchrun: one process per GPU (cuda:LOCAL_RANK), or gloo on CPUs
        from ssb_fast.sharding import RankGroup
        from ssb_fast.train.distributed import init_distributed

        try:
            ctx = init_distributed(device)
        except ValueError as err:
            fail(str(err), ExitCode.BAD_ARGUMENTS)
        except RuntimeError as err:  # e.g. LOCAL_RANK beyond this machine's GPUs, or no rendezvous
            fail(f"cannot join the torchrun process group: {err}", ExitCode.RUNTIME)
        device = str(ctx.device)
        group = RankGroup.from_process_group()
        if threads is None and ctx.device.type == "cpu":  # the ranks of one machine share its cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", shard.world_size))
            threads = max(1, default_threads() // max(1, local))
    set_threads(threads)
    if n_samples is None:
        from ssb_fast.demo import demo_samples
        from ssb_fast.devices import resolve_device

        try:
            n_samples = demo_samples(resolve_device(device)) if the_demo is not None else DEFAULT_SAMPLES
        except (ValueError, RuntimeError) as err:
            fail(str(err), ExitCode.BAD_ARGUMENTS)
    nfe = nfe if nfe is not None else DEFAULT_NFE
    options = dict(n_samples=n_samples, nfe=nfe, guidance=guidance, first_step_noise=first_step_noise,
                   labels=labels.value, ot_ode=ot_ode, seed=seed,
                   max_batch=max_batch, device=device, precision=precision.value, compile=compile,
                   cuda_graphs=cuda_graphs, soft=soft, png=png, resume=resume,
                   progress=not no_progress and shard.is_main)

    def finished_note() -> str:
        done = len(list((out / CASES_DIR).glob("*.npz"))) if (out / CASES_DIR).is_dir() else 0
        return f"{done} finished case file(s) kept in {out / CASES_DIR}; rerun with --continue to sample the rest"

    try:
        if data is not None:
            summary = sample_dataset(model, data, out, split=split, cases=cases, case_ids=ids, shard=shard,
                                     group=group, **options)
        else:
            summary = sample_images(model, image_paths, out, axis=axis, slices=slice_spec, shard=shard, group=group,
                                    **options)
    except SampleRunError as err:
        hint = (f"\n(the demo writes into ./{DEFAULT_OUT} by default: pass --out DIR for a fresh folder)"
                if the_demo is not None else "")
        fail(f"{err}{hint}", ExitCode.BAD_ARGUMENTS)
    except CheckpointError as err:
        fail(str(err), ExitCode.BAD_CHECKPOINT)
    except (DataFormatError, SamplesFormatError) as err:
        fail(str(err), ExitCode.BAD_DATA)
    except ImportError as err:  # an optional reader (nibabel for NIfTI) is not installed
        fail(str(err), ExitCode.RUNTIME)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {finished_note()}", err=True)
        raise typer.Exit(130) from None
    except (RuntimeError, OSError) as err:
        fail(f"sampling failed: {err}\n{finished_note()}", ExitCode.RUNTIME)
    finally:
        if ctx is not None:
            from ssb_fast.train.distributed import shutdown

            shutdown(ctx)

    if not shard.is_main:  # torchrun: rank 0 reports for the run
        return
    reports = None
    if the_demo is not None and summary.get("assembled"):
        from ssb_fast.demo import scan_reports

        reports = scan_reports(summary, the_demo)
    if json_out:
        if reports is not None:
            summary = {**summary, "demo_scans": [vars(r) for r in reports]}
        print_json(summary)
        return
    typer.echo(format_summary(summary))
    if reports is not None:
        from ssb_fast.demo import format_reports

        typer.echo(format_reports(reports))
        typer.echo(f"look at: {summary['out']}/cases/<scan>/grid.png (the scan, its readers, the samples, the "
                   f"mean and entropy maps)")


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_summary(summary: dict) -> str:
    """What was sampled, how fast, what was reused, where the files are, and what is missing."""
    lines = []
    shard = summary["shard"]
    if shard["num_parts"] > 1:
        i, k = shard["part_id"], shard["num_parts"]
        rank = f", rank {shard['rank']} of {shard['world_size']}" if shard["world_size"] > 1 else ""
        lines.append(f"part {i} of {k} ({shard['launcher']}{rank}): {summary['part_cases']} of {summary['n_cases']} "
                     f"case(s), numbers {i}, {i + k}, {i + 2 * k}, ... of the run's case list")
    if summary["sampled_cases"]:
        lines.append(
            f"sampled {summary['sampled_cases']} case(s) x {summary['n_samples']} masks, NFE {summary['nfe']}, "
            f"guidance {summary['guidance']:g}, on {summary['device']} ({summary['precision']}): "
            f"{summary['masks']} masks, {_rate(summary['masks_per_s'])} masks/s steady over "
            f"{summary['seconds']:.1f} s + {summary['warmup_seconds']:.1f} s warm-up "
            f"({summary['network_rows_per_mask']:.1f} network rows per mask, {summary['rows_per_step']} per step)")
    if summary["reused_cases"]:
        lines.append(f"reused {summary['reused_cases']} finished case(s) from {summary['out']}")
    if summary.get("other_parts_cases"):
        lines.append(f"assembled with the {summary['other_parts_cases']} case(s) of the other parts")
    if not summary["assembled"]:
        if summary.get("assembled_by"):
            return "\n".join(lines)
        shown = ", ".join(summary.get("missing_case_ids") or [])
        if shard["world_size"] > 1:
            lines.append(f"{summary['missing_cases']} of {summary['n_cases']} case(s) that other ranks sampled are "
                         f"not in {summary['out']} ({shown}, ...): with several machines, --out must be a folder "
                         f"they all share; copy their cases/ here and run with --continue (no torchrun) to assemble")
            return "\n".join(lines)
        lines.append(
            f"{summary['missing_cases']} of {summary['n_cases']} case(s) are not in {summary['out']} yet ({shown}"
            f"{', ...' if summary['missing_cases'] > len(summary.get('missing_case_ids') or []) else ''}): run the "
            f"other parts with the same arguments (the last to finish assembles samples.npz), or run the same "
            f"command without --num-parts/--part-id and with --continue to sample what is missing and assemble")
        return "\n".join(lines)
    for part in summary["parts"] if len(summary["parts"]) > 1 else []:
        lines.append(f"  {part['part']}: {part['cases']} case(s) on {part['host']} {part['device']} "
                     f"({part['device_name']}), {_rate(part['masks_per_s'])} masks/s steady")
    pngs = sum(1 for case in summary["cases"] if case["png"])
    nifti = summary["files"]["nifti"]
    lines.append(f"wrote {summary['out']}: samples.npz ({summary['n_cases']} scans x {summary['n_samples']} masks), "
                 f"summary.json, run.json, args.json, cases/ ({summary['n_cases']} .npz, {pngs} .png, "
                 f"{summary['n_cases']} folders with maps{', grid.png' if pngs else ''} and case.json)"
                 + (f", nifti/ ({len(nifti)} files)" if nifti else ""))
    if summary["metrics"] is not None:
        mean = summary["metrics"]["mean"]
        lines.append(f"mean over {summary['metrics']['n_cases']} case(s), N = {summary['n_samples']}: "
                     + "  ".join(f"{name} {mean[key]:.4f}" for key, name in (
                         ("ged", "GED"), ("d_max", "D_max"), ("d_a", "D_a"), ("s_c", "S_c"), ("ci", "CI"),
                         ("hm_iou", "HM-IoU"), ("ddi_e", "DDI_e"), ("ddi_g", "DDI_g"))))
    if summary["has_experts"]:
        lines.append(f"next: ssb-fast evaluate {summary['out']}")
    return "\n".join(lines)
