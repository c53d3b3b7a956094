"""Sample N masks for many scans into a folder a person can open, without losing finished work.

`sample_dataset` (the scans of a dataset split, with their experts' masks) and `sample_images` (image
files, no experts) run the one `Sampler` over the scans in groups. After each group, every finished case
is written to OUT/cases/<case>.npz atomically, with a preview PNG beside it; at the end OUT/samples.npz,
the file `ssb-fast evaluate` reads, is assembled from those case files. OUT also holds args.json (the
resolved arguments) and summary.json (speed per case and in total). A rerun with `resume=True` reuses
the finished case files whose settings and scans match, and samples the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssb_fast.atomic import write_atomic, write_json_atomic
from ssb_fast.bridge import Bridge
from ssb_fast.checkpoint import CheckpointError, load_model
from ssb_fast.data.dataset import load
from ssb_fast.data.dataset_format import DataFormatError
from ssb_fast.data.image_io import (
    IMAGE_SUFFIXES,
    case_name,
    check_image_finite,
    choose_scaling,
    file_suffix,
    image_to_chw,
    read_array,
)
from ssb_fast.devices import describe_device, resolve_device
from ssb_fast.progress import progress_bar
from ssb_fast.render import (
    CAPTION,
    READER_COLOURS,
    SAMPLE_COLOUR,
    TEXT,
    grey_rgb,
    heat,
    new_canvas,
    overlay,
    paste_tiles,
)
from ssb_fast.sampler import LABEL_MODES, Sampler
from ssb_fast.samples_io import SAMPLES_FILE, write_samples_npz

ARGS_FILE = "args.json"
SUMMARY_FILE = "summary.json"
CASES_DIR = "cases"
MODEL_FILE = "model.safetensors"
# The settings that decide the masks: a continued run must repeat them to reuse finished cases. The
# device, --max-batch and compilation may change (keyed noise makes chunking irrelevant).
MASK_SETTINGS = ("model_sha256", "bridge", "n_samples", "nfe", "guidance", "labels", "ot_ode", "seed", "soft")
PREVIEW_SAMPLES = 6
PREVIEW_TILE = 128


class SampleRunError(ValueError):
    """Settings or an output folder that cannot be used; the message says what to change."""


@dataclass
class ScanSet:
    """Scans to sample: `images` (S, C, H, W) float32 in [-1, 1] with their case ids and source files, the
    experts' masks (S, M, H, W) uint8 with `present` (S, M) (M = 0 for image files), and `input`, how the
    scans were chosen (recorded in args.json)."""

    images: torch.Tensor
    case_ids: list[str]
    sources: list[str]
    experts: np.ndarray
    present: np.ndarray
    input: dict

    def __len__(self) -> int:
        return len(self.case_ids)


@dataclass
class SampleOptions:
    """How to sample and what to write; `check()` rejects bad values before any work starts."""

    n_samples: int = 16
    nfe: int = 20
    guidance: float = 1.0
    labels: str = "cycle"
    ot_ode: bool = False
    seed: int = 0
    max_batch: int | None = None
    device: str = "auto"
    compile: bool | None = None
    cuda_graphs: bool = False
    soft: bool = False
    png: bool = True
    resume: bool = False
    progress: bool = True

    def check(self) -> torch.device:
        """Validate every option; return the resolved device. Raises SampleRunError naming the option."""
        for name, low in (("n_samples", 1), ("nfe", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SampleRunError(f"{name} must be an int >= {low}; got {value!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise SampleRunError(f"max_batch must be an int >= 1; got {self.max_batch!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise SampleRunError(f"guidance must be a finite number >= 0; got {self.guidance!r}")
        if self.labels not in LABEL_MODES:
            raise SampleRunError(f"labels must be one of {', '.join(LABEL_MODES)}; got {self.labels!r}")
        try:
            device = resolve_device(str(self.device))
        except ValueError as err:
            raise SampleRunError(str(err)) from None
        if self.cuda_graphs and device.type != "cuda":
            raise SampleRunError(f"cuda_graphs needs a CUDA device; the device is {device}")
        return device


# ---- scans ----------------------------------------------------------------------------------------
def scans_from_dataset(data: str | os.PathLike, split: str = "test", cases: int | None = None,
                       case_ids: Sequence[str] | None = None) -> ScanSet:
    """The scans of `split` of a dataset folder with their experts: all of them, the first `cases`, or the
    ones named in `case_ids` (in that order)."""
    if cases is not None and case_ids is not None:
        raise SampleRunError("give either cases (the first N of the split) or case_ids, not both")
    if cases is not None and (isinstance(cases, bool) or not isinstance(cases, int) or cases < 1):
        raise SampleRunError(f"cases must be an int >= 1; got {cases!r}")
    try:
        ds = load(data, split)
    except DataFormatError:
        raise
    except ValueError as err:  # an unknown split name
        raise SampleRunError(str(err)) from None
    if case_ids is not None:
        case_ids = [str(c) for c in case_ids]
        if not case_ids:
            raise SampleRunError("case_ids is empty")
        repeated = sorted({c for c in case_ids if case_ids.count(c) > 1})
        if repeated:
            raise SampleRunError(f"case id(s) given twice: {', '.join(repeated)}")
        index = {c: i for i, c in enumerate(ds.case_ids)}
        unknown = [c for c in case_ids if c not in index]
        if unknown:
            raise SampleRunError(f"{ds.source}: no case {', '.join(map(repr, unknown[:5]))} in split {split!r}; "
                                 f"it holds {len(ds)} cases ({', '.join(ds.case_ids[:3])}, ...)")
        picks = [index[c] for c in case_ids]
    else:
        picks = list(range(len(ds) if cases is None else min(cases, len(ds))))
    if not picks:
        raise DataFormatError(ds.source, f"split {split!r} holds no cases")
    idx = torch.tensor(picks, dtype=torch.int64)
    return ScanSet(
        images=ds.images[idx].float(),
        case_ids=[ds.case_ids[i] for i in picks],
        sources=[str(ds.source)] * len(picks),
        experts=ds.masks[idx].numpy(),
        present=ds.present[idx].numpy(),
        input={"kind": "dataset", "data": str(Path(data).resolve()), "split": split, "cases": cases,
               "case_ids": case_ids},
    )


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by `paths`: files as given, folders as every image file in them (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and not f.name.startswith(".") and file_suffix(f) in IMAGE_SUFFIXES)
            if not found:
                raise DataFormatError(p, f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif not p.exists():
            raise DataFormatError(p, "no such image file")
        else:
            files.append(p)
    if not files:
        raise SampleRunError("no image files given")
    return files


def scans_from_images(paths: Sequence[str | os.PathLike], expect: tuple[int, int, int] | None = None) -> ScanSet:
    """Scans from image files (png, jpg, npy, nii.gz; a folder means every image in it), no experts.

    Intensities map to [-1, 1] by the rule `ssb-fast data import-folder` uses, chosen once over all files
    (8/16-bit: full range; floats in a known range keep it; else min..max). The case id is the file name
    without its suffix. `expect` (C, H, W) names the first file that does not fit the model.
    """
    files = image_files(paths)
    seen: dict[str, Path] = {}
    for f in files:
        case = case_name(f)
        if case in seen:
            raise SampleRunError(f"two images give the case id {case!r}: {seen[case]} and {f}; rename one")
        seen[case] = f
    raw = []
    for f in files:
        case = case_name(f)
        chw = image_to_chw(read_array(f, case), f, case, file_suffix(f) in (".png", ".jpg", ".jpeg"))
        check_image_finite(chw, f, case)
        if expect is not None:
            _check_scan_shape(tuple(chw.shape), expect, f, case)
        elif raw and chw.shape != raw[0].shape:
            raise DataFormatError(f, f"image shape {chw.shape} (C, H, W) differs from {files[0]}'s {raw[0].shape}",
                                  case)
        raw.append(chw)
    dtypes = {a.dtype for a in raw if a.size}
    low = min(float(a.min()) for a in raw if a.size)
    high = max(float(a.max()) for a in raw if a.size)
    scaling = choose_scaling(dtypes, low, high)
    images = torch.from_numpy(np.stack([scaling.apply(a) for a in raw]))
    n, _, height, width = images.shape
    return ScanSet(
        images=images, case_ids=[case_name(f) for f in files], sources=[str(f) for f in files],
        experts=np.zeros((n, 0, height, width), dtype=np.uint8), present=np.zeros((n, 0), dtype=bool),
        input={"kind": "images", "images": [str(f.resolve()) for f in files], "image_scaling": scaling.to_meta()},
    )


def model_scan_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of the scans the model was trained on."""
    cfg = model.config
    return int(cfg.scan_channels), int(cfg.image_size), int(cfg.image_size)


def _check_scan_shape(shape: tuple, expect: tuple[int, int, int], path, case: str) -> None:
    (c, h, w), (ec, eh, ew) = shape, expect
    if c != ec:
        raise DataFormatError(path, f"the scan has {c} channel(s); the model expects {ec}", case)
    if (h, w) != (eh, ew):
        raise DataFormatError(path, f"the scan is {h}x{w} pixels; the model was trained on {eh}x{ew} scans", case)


def check_scans_fit(model, scans: ScanSet) -> None:
    """Raise DataFormatError naming the first scan whose channels or size differ from the model's."""
    expect = model_scan_shape(model)
    for i, case in enumerate(scans.case_ids):
        _check_scan_shape(tuple(scans.images.shape[1:]), expect, scans.sources[i], case)


# ---- model --------------------------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run folder means its model.safetensors; a file is taken as it is."""
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(model_path, device: torch.device):
    """(EMA model on `device`, its file, its bridge); CheckpointError when either cannot be built."""
    file = resolve_model_path(model_path)
    net = load_model(file, device=device)
    bridge_cfg = net.run_config.get("bridge")
    if not isinstance(bridge_cfg, dict):
        raise CheckpointError(file, "the checkpoint's config has no bridge settings")
    try:
        bridge = Bridge(**bridge_cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(file, f"the bridge config cannot build a Bridge: {err}") from None
    return net, file, bridge


# ---- case files -------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def case_file_stems(case_ids: Sequence[str]) -> list[str]:
    """File names for case ids: other characters than letters, digits, '.', '_' and '-' become '_', and
    names that clash (also by case, for case-insensitive file systems) get -2, -3, ..."""
    stems, used = [], set()
    for cid in case_ids:
        base = _UNSAFE.sub("_", str(cid)).lstrip(".")[:120] or "case"
        stem, k = base, 2
        while stem.lower() in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def scan_digest(image: torch.Tensor) -> str:
    """A fingerprint of a scan's pixels, so that a continued run reuses a case only for the same scan."""
    data = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


def write_case_file(path: str | os.PathLike, case: dict) -> Path:
    """One finished case, atomically: samples (N,H,W) uint8, labels (N,), experts (M,H,W), present (M,),
    optionally soft (N,H,W) float16, and its case id, scan digest, settings and stats as strings."""
    arrays = {
        "samples": np.asarray(case["samples"], dtype=np.uint8),
        "labels": np.asarray(case["labels"], dtype=np.int64),
        "experts": np.asarray(case["experts"], dtype=np.uint8),
        "present": np.asarray(case["present"], dtype=bool),
        "case_id": np.array(case["case_id"]),
        "scan_digest": np.array(case["scan_digest"]),
        "settings": np.array(json.dumps(case["settings"], sort_keys=True)),
        "stats": np.array(json.dumps(case["stats"], sort_keys=True)),
    }
    if case.get("soft") is not None:
        arrays["soft"] = np.asarray(case["soft"], dtype=np.float16)
    return write_atomic(path, lambda fh: np.savez_compressed(fh, **arrays))


def read_case_file(path: str | os.PathLike) -> dict:
    """A case file as written by `write_case_file`; ValueError when it is damaged or incomplete."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            case = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable case file ({err})") from None
    needed = ("samples", "labels", "experts", "present", "case_id", "scan_digest", "settings", "stats")
    missing = [k for k in needed if k not in case]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for key in ("case_id", "scan_digest"):
        case[key] = str(case[key])
    for key in ("settings", "stats"):
        case[key] = json.loads(str(case[key]))
    return case


# ---- preview PNG ------------------------------------------------------------------------------------
def write_case_preview(path: str | os.PathLike, scan: np.ndarray, samples: np.ndarray, labels: np.ndarray,
                       experts: np.ndarray, present: np.ndarray, caption: str) -> Path:
    """One row of tiles: the scan, each expert's mask over it, the first samples over it (titled with the
    expert label each was drawn with), the mean mask (pixelwise probability) and the per-pixel std
    (uncertainty, 0 to 0.5), with a caption below."""
    height, width = samples.shape[-2:]
    scale = max(1, PREVIEW_TILE // max(height, width))
    th, tw, gap, header, footer = height * scale, width * scale, 2, 16, 16
    grey = grey_rgb(np.asarray(scan, dtype=np.float32))
    tiles: list[tuple[str, np.ndarray | None]] = [("scan", grey)]
    for k in range(experts.shape[0]):
        colour = READER_COLOURS[k % len(READER_COLOURS)]
        tiles.append((f"expert {k + 1}", overlay(grey, experts[k], colour) if present[k] else None))
    for i in range(min(PREVIEW_SAMPLES, samples.shape[0])):
        tiles.append((f"sample {i + 1} / expert {int(labels[i]) + 1}", overlay(grey, samples[i], SAMPLE_COLOUR)))
    prob = samples.astype(np.float64).mean(axis=0)
    tiles.append(("mean", heat(prob)))
    tiles.append(("std (max 0.5)", heat(np.sqrt(prob * (1.0 - prob)) / 0.5)))  # std of 0/1 values
    canvas, draw, font = new_canvas(len(tiles) * (tw + gap), header + th + footer)
    for c, (title, _) in enumerate(tiles):
        draw.text((c * (tw + gap) + 3, 2), title, fill=TEXT, font=font)
    paste_tiles(canvas, draw, font, [tile for _, tile in tiles], header, tw, th, gap)
    draw.text((3, header + th + 2), caption, fill=CAPTION, font=font)

    def save(fh):
        canvas.save(fh, format="PNG")

    return write_atomic(path, save)


# ---- the run ----------------------------------------------------------------------------------------
def sample_dataset(model_path: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                   split: str = "test", cases: int | None = None, case_ids: Sequence[str] | None = None,
                   **options) -> dict:
    """Sample every chosen scan of a dataset split into `out` (with the experts, so `evaluate` works on it).

    `options` are the fields of SampleOptions. Returns the summary also written to out/summary.json.
    Raises SampleRunError (settings, output folder), CheckpointError (model) or DataFormatError (scans).
    """
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = _load(model_path, device)
    scans = scans_from_dataset(data, split, cases, case_ids)
    check_scans_fit(net, scans)
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start)


def sample_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike,
                  **options) -> dict:
    """Sample image files (or folders of them) into `out`; there are no experts (M = 0 in samples.npz).

    Same options, return value and errors as `sample_dataset`.
    """
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = _load(model_path, device)
    scans = scans_from_images(images, expect=model_scan_shape(net))
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start)


def sample_scans(model_path: str | os.PathLike, scans: ScanSet, out: str | os.PathLike, **options) -> dict:
    """Sample a ScanSet built elsewhere into `out`; same options, return value and errors as above."""
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = _load(model_path, device)
    check_scans_fit(net, scans)
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start)


def _prepare_out(out: Path, settings: dict, resume: bool) -> None:
    """Refuse to mix runs: a folder holding a run needs `resume`, and then the same mask settings."""
    args_file = out / ARGS_FILE
    has_cases = (out / CASES_DIR).is_dir() and any((out / CASES_DIR).glob("*.npz"))
    if out.exists() and not out.is_dir():
        raise SampleRunError(f"{out} exists and is not a folder; --out needs a folder")
    if not resume:
        if args_file.exists() or has_cases:
            raise SampleRunError(f"{out} already holds a sampling run; pass --continue to reuse its finished "
                                 f"cases, or choose another --out")
        return
    if not args_file.exists():
        return
    try:
        saved = json.loads(args_file.read_text())
    except (OSError, ValueError) as err:
        raise SampleRunError(f"{args_file}: cannot read the previous run's arguments ({err})") from None
    diffs = _differences(saved, settings)
    if diffs:
        raise SampleRunError(f"{out} was sampled with other settings ({'; '.join(diffs)}); --continue needs the "
                             f"same ones (or choose another --out)")


def _differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{key} {saved.get(key)!r} there, {wanted[key]!r} now" for key in MASK_SETTINGS
            if saved.get(key) != wanted[key]]


def _reusable(path: Path, case_id: str, digest: str, settings: dict) -> dict | None:
    """The finished case in `path` if it is whole and was made from this scan with these settings."""
    if not path.exists():
        return None
    try:
        case = read_case_file(path)
    except ValueError as err:
        warnings.warn(f"{err}; sampling case {case_id!r} again", stacklevel=3)
        return None
    if case["case_id"] != case_id:
        raise SampleRunError(f"{path} holds case {case['case_id']!r}, not {case_id!r}; choose another --out")
    diffs = _differences(case["settings"], settings)
    if diffs:
        raise SampleRunError(f"{path} was sampled with other settings ({'; '.join(diffs)}); --continue needs the "
                             f"same ones (or choose another --out)")
    if case["scan_digest"] != digest:
        raise SampleRunError(f"{path} was sampled from a different scan {case_id!r} than the one given now; "
                             f"choose another --out")
    return case


def _run(net, model_file: Path, bridge: Bridge, scans: ScanSet, out: Path, opts: SampleOptions,
         device: torch.device, wall_start: float) -> dict:
    """Check OUT, write args.json, sample the unfinished cases group by group, assemble samples.npz."""
    from ssb_fast import __version__

    compile_net = device.type == "cuda" if opts.compile is None else bool(opts.compile)
    args = {
        "command": "ssb-fast sample",
        "ssb_fast_version": __version__,
        "model": str(model_file.resolve()),
        "model_sha256": file_sha256(model_file),
        "bridge": dict(net.run_config["bridge"]),
        "input": scans.input,
        "case_ids": list(scans.case_ids),
        **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
           if f.name not in ("resume", "progress", "compile", "device", "max_batch")},
        "device": str(device),
        "compile": compile_net,
    }
    settings = json.loads(json.dumps({key: args[key] for key in MASK_SETTINGS}))
    _prepare_out(out, settings, opts.resume)
    try:
        sampler = Sampler(net, bridge, nfe=opts.nfe, guidance=opts.guidance, labels=opts.labels, ot_ode=opts.ot_ode,
                          seed=opts.seed, max_batch=opts.max_batch, device=device, compile=compile_net,
                          cuda_graphs=opts.cuda_graphs)
    except ValueError as err:  # e.g. an NFE beyond the model's bridge
        raise SampleRunError(str(err)) from None
    case_paths = [out / CASES_DIR / f"{stem}.npz" for stem in case_file_stems(scans.case_ids)]
    digests = [scan_digest(image) for image in scans.images]
    finished: dict[int, dict] = {}
    if opts.resume:
        for i, path in enumerate(case_paths):
            case = _reusable(path, scans.case_ids[i], digests[i], settings)
            if case is not None:
                finished[i] = case
    reused = set(finished)
    # Only now, with every check passed, does the folder change.
    args.update({"max_batch": sampler.max_batch, "continue": opts.resume})
    write_json_atomic(out / ARGS_FILE, args)
    todo = [i for i in range(len(scans)) if i not in reused]
    caption = f"N = {opts.n_samples}, NFE {opts.nfe}, guidance {opts.guidance:g}, labels {opts.labels}"

    def preview(i: int) -> None:
        case = finished[i]
        write_case_preview(case_paths[i].with_suffix(".png"), scans.images[i].numpy(), case["samples"],
                           case["labels"], case["experts"], case["present"], f"{scans.case_ids[i]}   {caption}")

    if opts.png:  # previews of reused cases, where missing
        for i in sorted(reused):
            if not case_paths[i].with_suffix(".png").exists():
                preview(i)

    totals = {"seconds": 0.0, "network_rows": 0, "groups": 0, "oom_retries": 0}
    # A group of scans fills at least one chunk, so the network never runs on a chunk smaller than it must.
    group_size = max(1, math.ceil(sampler.max_batch / opts.n_samples))
    device_name = describe_device(device)
    with progress_bar("sampling masks", len(todo) * opts.n_samples, enabled=opts.progress) as advance:
        for start in range(0, len(todo), group_size):
            group = todo[start:start + group_size]
            reported = 0

            def on_chunk(done: int, total: int) -> None:
                nonlocal reported
                advance(done - reported)
                reported = done

            result = sampler.sample(scans.images[group], opts.n_samples, case_ids=[scans.case_ids[i] for i in group],
                                    return_soft=opts.soft, on_chunk=on_chunk)
            stats = result.stats
            if stats["final_batch"] < sampler.max_batch:  # CUDA ran out of memory: keep the chunk size that fit
                sampler.max_batch = stats["final_batch"]
            for key in ("seconds", "network_rows", "oom_retries"):
                totals[key] += stats[key]
            totals["groups"] += 1
            for j, i in enumerate(group):
                finished[i] = {
                    "case_id": scans.case_ids[i], "samples": result.masks[j].numpy(),
                    "labels": result.labels[j].numpy(), "experts": scans.experts[i], "present": scans.present[i],
                    "soft": result.soft[j].numpy() if result.soft is not None else None,
                    "scan_digest": digests[i], "settings": settings,
                    # a case's time and network rows are its share of its group's
                    "stats": {"seconds": stats["seconds"] / len(group), "masks_per_s": stats["masks_per_s"],
                              "network_rows": stats["network_rows"] / len(group), "group_scans": len(group),
                              "chunks_in_group": stats["chunks"], "max_batch": stats["final_batch"],
                              "device": device_name},
                }
                write_case_file(case_paths[i], finished[i])
                if opts.png:
                    preview(i)

    cases = [finished[i] for i in range(len(scans))]
    extra = {"labels": np.stack([c["labels"] for c in cases])}
    if opts.soft:
        extra["soft"] = np.stack([np.asarray(c["soft"], dtype=np.float16) for c in cases])
    write_samples_npz(out, np.stack([c["samples"] for c in cases]), np.stack([c["experts"] for c in cases]),
                      np.stack([c["present"] for c in cases]), list(scans.case_ids), extra=extra)

    masks = len(todo) * opts.n_samples
    summary = {
        "out": str(out), "model": str(model_file), "device": device_name,
        "n_cases": len(scans), "n_samples": opts.n_samples, "nfe": opts.nfe, "guidance": opts.guidance,
        "labels": opts.labels, "ot_ode": opts.ot_ode, "seed": opts.seed,
        "has_experts": bool(scans.experts.shape[1] > 0),
        "sampled_cases": len(todo), "reused_cases": len(reused), "masks": masks,
        "seconds": totals["seconds"],
        "masks_per_s": masks / totals["seconds"] if totals["seconds"] > 0 else None,
        "network_rows": totals["network_rows"],
        "network_rows_per_mask": totals["network_rows"] / masks if masks else None,
        "groups": totals["groups"], "max_batch": sampler.max_batch, "oom_retries": totals["oom_retries"],
        "wall_seconds": time.perf_counter() - wall_start,
        "files": {"samples": SAMPLES_FILE, "args": ARGS_FILE, "summary": SUMMARY_FILE, "cases": CASES_DIR},
        "cases": [
            {"case_id": scans.case_ids[i], "file": f"{CASES_DIR}/{path.name}",
             "png": f"{CASES_DIR}/{path.with_suffix('.png').name}" if path.with_suffix(".png").exists() else None,
             "reused": i in reused, **finished[i]["stats"]}
            for i, path in enumerate(case_paths)
        ],
    }
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary
