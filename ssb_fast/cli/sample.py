"""`ssb-fast sample`: N masks per scan from a trained model, into a folder a person can open."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, app, fail, print_json

NOTHING_TO_SAMPLE = (
    "nothing to sample: pass --model RUN (a run folder or model.safetensors from `ssb-fast train`), the scans "
    "(--data DIR [--split test] [--cases N | --case-ids A,B] or --images FILE...) and --out OUT. ssb-fast has no "
    "bundled demo model yet; train a small one on a CPU in about 3 minutes:\n"
    "  ssb-fast data synthetic --out data/synthetic\n"
    "  ssb-fast train --data data/synthetic --preset tiny --steps 300 --out runs/tiny\n"
    "  ssb-fast sample --model runs/tiny --data data/synthetic --cases 4 --out samples/tiny"
)


class LabelMode(str, Enum):
    cycle = "cycle"
    random = "random"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ssb-fast sample --model runs/tiny --data data/synthetic --cases 4 --n-samples 64 --out samples/tiny\n\n"
        "  ssb-fast evaluate samples/tiny\n\n"
        "  ssb-fast sample --model runs/tiny/model.safetensors --images scans/*.png --out samples/mine\n\n"
        "There is no bundled demo model yet: train one with `ssb-fast train` first."
    )
)
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
        help="Image files (png, jpg, npy, nii.gz) or folders of them, mapped to [-1, 1] as `ssb-fast data "
             "import-folder` does. They have no experts, so there is nothing to evaluate.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="OUT",
        help="Output folder: samples.npz, args.json, summary.json, cases/<case>.npz and .png.")] = None,
    n_samples: Annotated[int, typer.Option("--n-samples", "-n", min=1, show_default=True,
                                           help="Masks per scan.")] = 16,
    nfe: Annotated[int, typer.Option("--nfe", min=1, show_default=True,
                                     help="Network evaluations (steps) per mask.")] = 20,
    guidance: Annotated[float, typer.Option(
        "--guidance", min=0.0, show_default=True,
        help="Classifier-free guidance w in u + w(c - u): 1 = conditional only, 0 = unconditional.")] = 1.0,
    labels: Annotated[LabelMode, typer.Option(
        "--labels", show_default=True,
        help="Expert label of mask i: cycle = i mod M (the experts covered evenly), random = drawn per mask "
             "from --seed.")] = LabelMode.cycle,
    ot_ode: Annotated[bool, typer.Option(
        "--ot-ode", help="Deterministic steps (no noise between steps): masks drawn with one label coincide.")]
    = False,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, show_default=True,
        help="Seed of the keyed noise: mask i of a case is the same whatever chunk computed it.")] = 0,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", metavar="B", min=1,
        help="Masks per chunk; the network sees 2B rows [default: 256 on CUDA, 32 on CPU].")] = None,
    device: DeviceOption = "auto",
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the U-Net [default: on with CUDA, off on CPU].")] = None,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="Capture the U-Net in CUDA graphs (compile mode reduce-overhead; CUDA only).")]
    = False,
    soft: Annotated[bool, typer.Option(
        "--soft", help="Also save the soft x0̂ in [-1, 1] (float16) beside the binary masks.")] = False,
    png: Annotated[bool, typer.Option("--png/--no-png", show_default=True,
                                      help="Write a preview PNG per case under OUT/cases.")] = True,
    resume: Annotated[bool, typer.Option(
        "--continue", help="Reuse the cases already finished in OUT (same settings as its args.json) and "
                           "sample the rest.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar on stderr.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Sample N plausible masks per scan from a trained model into a folder a person can open.

    Scans come from a dataset split (--data; their experts' masks are kept, so `ssb-fast evaluate OUT`
    scores them) or from image files (--images). OUT gets samples.npz, args.json (the resolved
    arguments), summary.json (masks/s, network rows and seconds per case and in total) and, per case,
    cases/<case>.npz and cases/<case>.png (scan, experts, first samples, mean mask, per-pixel std).
    Finished cases are written after every group of scans, so Ctrl-C loses none: rerun with --continue.
    There is no bundled demo model yet: pass --model with a run of `ssb-fast train`.
    """
    from ssb_fast.checkpoint import CheckpointError
    from ssb_fast.data import DataFormatError
    from ssb_fast.sample_run import CASES_DIR, SampleRunError, sample_dataset, sample_images
    from ssb_fast.samples_io import SamplesFormatError

    image_paths = [*(images or []), *(files or [])]
    if model is None and data is None and not image_paths:
        fail(NOTHING_TO_SAMPLE, ExitCode.BAD_ARGUMENTS)
    if model is None:
        fail("--model is required: a run folder of `ssb-fast train` or its model.safetensors (there is no "
             "bundled demo model yet)", ExitCode.BAD_ARGUMENTS)
    if data is None and not image_paths:
        fail("no scans given: pass --data DIR (a dataset folder) or --images FILE...", ExitCode.BAD_ARGUMENTS)
    if data is not None and image_paths:
        fail("give either --data DIR or image files (--images), not both", ExitCode.BAD_ARGUMENTS)
    if data is None and (cases is not None or case_ids is not None or split != "test"):
        fail("--split, --cases and --case-ids choose scans of --data; image files are sampled as given",
             ExitCode.BAD_ARGUMENTS)
    if cases is not None and case_ids is not None:
        fail("give either --cases N or --case-ids, not both", ExitCode.BAD_ARGUMENTS)
    ids = None
    if case_ids is not None:
        ids = [c.strip() for c in case_ids.split(",") if c.strip()]
        if not ids:
            fail(f"--case-ids names no case: {case_ids!r}", ExitCode.BAD_ARGUMENTS)
    if out is None:
        fail("--out OUT is required: the folder to write samples.npz and the case files into",
             ExitCode.BAD_ARGUMENTS)

    options = dict(n_samples=n_samples, nfe=nfe, guidance=guidance, labels=labels.value, ot_ode=ot_ode, seed=seed,
                   max_batch=max_batch, device=device, compile=compile, cuda_graphs=cuda_graphs, soft=soft,
                   png=png, resume=resume, progress=not no_progress)

    def finished_note() -> str:
        done = len(list((out / CASES_DIR).glob("*.npz"))) if (out / CASES_DIR).is_dir() else 0
        return f"{done} finished case file(s) kept in {out / CASES_DIR}; rerun with --continue to sample the rest"

    try:
        if data is not None:
            summary = sample_dataset(model, data, out, split=split, cases=cases, case_ids=ids, **options)
        else:
            summary = sample_images(model, image_paths, out, **options)
    except SampleRunError as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
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

    if json_out:
        print_json(summary)
        return
    typer.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    """What was sampled, how fast, what was reused, and where the files are."""
    lines = []
    if summary["sampled_cases"]:
        lines.append(
            f"sampled {summary['sampled_cases']} case(s) x {summary['n_samples']} masks, NFE {summary['nfe']}, "
            f"guidance {summary['guidance']:g}, on {summary['device']}: {summary['masks']} masks in "
            f"{summary['seconds']:.1f} s, {summary['masks_per_s']:.1f} masks/s "
            f"({summary['network_rows_per_mask']:.1f} network rows per mask)")
    if summary["reused_cases"]:
        lines.append(f"reused {summary['reused_cases']} finished case(s) from {summary['out']}")
    pngs = sum(1 for case in summary["cases"] if case["png"])
    lines.append(f"wrote {summary['out']}: samples.npz ({summary['n_cases']} scans x {summary['n_samples']} masks), "
                 f"args.json, summary.json, cases/ ({summary['n_cases']} .npz, {pngs} .png)")
    if summary["has_experts"]:
        lines.append(f"next: ssb-fast evaluate {summary['out']}")
    return "\n".join(lines)
