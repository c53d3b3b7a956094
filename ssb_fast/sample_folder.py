"""The output folder of `ssb-fast sample`: its layout, the case files and per-case maps, the checks that let
a run continue or a part join, the lock that keeps concurrent parts apart, and the run's assembled files.

    OUT/args.json            the resolved arguments (a sharded run's first part writes it, later parts check it)
    OUT/samples.npz          every case's masks with the readers' masks: what `ssb-fast evaluate` reads
    OUT/summary.json         masks/s, metrics and the files of every case
    OUT/run.json             the run record: arguments, versions, devices, timing, shard layout
    OUT/cases/<case>.npz     one finished case (masks, labels, readers' masks); written last, so that its
                             presence means the case is finished (what --continue reuses)
    OUT/cases/<case>.png     the one-row preview
    OUT/cases/<case>/        case.json (uncertainty, metrics against the readers), mean.npy/.png (pixel
                             frequency), entropy.npy/.png (entropy of the mean, bits), majority.npy/.png,
                             grid.png
    OUT/nifti/<file>_{mean,entropy,majority}.nii.gz   the maps of NIfTI inputs, with their affine
    OUT/parts/part-<i>-of-<K>.json                    each part's record (sharded runs)
    OUT/.lock                held while a process checks the folder or assembles the run's files

samples.npz, summary.json, run.json and the NIfTI maps are assembled once every case file exists. All
files are written atomically, and every case file is a function of its case alone (no times, no
device, fixed zip and gzip time stamps): the same case gives the same bytes whichever process sampled it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssb_fast.atomic import remove_staged, write_atomic, write_json_atomic
from ssb_fast.case_figures import heat_png, mask_png, write_case_grid, write_case_preview
from ssb_fast.data.dataset_format import DataFormatError
from ssb_fast.nifti_io import place_slices, write_nifti_like
from ssb_fast.sample_inputs import SampleRunError, VolumeInput
from ssb_fast.samples_io import save_npz, write_samples_npz
from ssb_fast.sharding import Shard

try:
    import fcntl
except ImportError:  # not on Windows: the folder is then unlocked
    fcntl = None

ARGS_FILE = "args.json"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"
CASES_DIR = "cases"
PARTS_DIR = "parts"
NIFTI_DIR = "nifti"
LOCK_FILE = ".lock"
CASE_JSON = "case.json"
MAPS = ("mean", "entropy", "majority")
# The settings that decide the masks: a continued run, or another part, must repeat them to reuse or add
# cases. The device, --max-batch and compilation may change (keyed noise makes chunking irrelevant).
MASK_SETTINGS = ("model_sha256", "bridge", "n_samples", "nfe", "guidance", "labels", "ot_ode", "seed", "soft",
                 "first_step_noise")
# What a folder written before a setting existed was sampled with.
MASK_SETTING_DEFAULTS = {"first_step_noise": 1.0}


# ---- names --------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def case_file_stems(case_ids: Sequence[str]) -> list[str]:
    """File names for case ids: other characters than letters, digits, '.', '_' and '-' become '_', and
    names that clash (also by case, for case-insensitive file systems, and a case's folder with another
    case's .npz or .png) get -2, -3, ..."""
    stems, used = [], set()
    for cid in case_ids:
        base = _UNSAFE.sub("_", str(cid)).lstrip(".")[:120] or "case"
        stem, k = base, 2
        while any(name in used for name in _names(stem)):
            stem, k = f"{base}-{k}", k + 1
        used.update(_names(stem))
        stems.append(stem)
    return stems


def _names(stem: str) -> tuple[str, ...]:
    """The names a case takes in cases/, lower-cased: its folder, .npz and .png."""
    low = stem.lower()
    return low, f"{low}.npz", f"{low}.png"


def scan_digest(image: torch.Tensor) -> str:
    """A fingerprint of a scan's pixels, so that a continued run reuses a case only for the same scan."""
    data = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CasePaths:
    """Where one case's files go: `npz` (the masks), `png` (the preview) and `folder` (maps, grid, JSON)."""

    npz: Path
    png: Path
    folder: Path

    @property
    def json(self) -> Path:
        return self.folder / CASE_JSON

    @property
    def grid(self) -> Path:
        return self.folder / "grid.png"

    def map_file(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}{suffix}"

    def derived(self, png: bool) -> list[Path]:
        """The files drawn from the case file: maps, JSON and, with `png`, the pictures."""
        files = [self.json, *(self.map_file(m, ".npy") for m in MAPS)]
        if png:
            files += [self.png, self.grid, *(self.map_file(m, ".png") for m in MAPS)]
        return files


def remove_interrupted_writes(files: Sequence[Path]) -> int:
    """Delete what writes of `files` that a crash cut short staged beside them (hidden `.<name>-*.tmp`, see
    ssb_fast.atomic); call only for files no other process is writing now. Lists each folder once (a run's
    cases/ may hold tens of thousands of files). Returns how many were removed."""
    wanted: dict[Path, set[str]] = {}
    for f in files:
        wanted.setdefault(f.parent, set()).add(f.name)
    removed = 0
    for folder, names in wanted.items():
        try:
            entries = [e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry[1:-4].rpartition("-")[0] in names:
                (folder / entry).unlink(missing_ok=True)
                removed += 1
    return removed


def case_paths(out: Path, stems: Sequence[str]) -> list[CasePaths]:
    cases = out / CASES_DIR
    return [CasePaths(cases / f"{s}.npz", cases / f"{s}.png", cases / s) for s in stems]


def nifti_map_path(out: Path, stem: str, name: str) -> Path:
    return out / NIFTI_DIR / f"{stem}_{name}.nii.gz"


def part_record_path(out: Path, shard: Shard) -> Path:
    return out / PARTS_DIR / f"{shard.label}.json"


# ---- case files ---------------------------------------------------------------------------------------
def write_case_file(path: str | os.PathLike, case: dict) -> Path:
    """One finished case, atomically and byte for byte reproducibly: samples (N,H,W) uint8, labels (N,),
    experts (M,H,W), present (M,), optionally soft (N,H,W) float16, and its case id, scan digest and
    settings as strings."""
    arrays = {
        "samples": np.asarray(case["samples"], dtype=np.uint8),
        "labels": np.asarray(case["labels"], dtype=np.int64),
        "experts": np.asarray(case["experts"], dtype=np.uint8),
        "present": np.asarray(case["present"], dtype=bool),
        "case_id": np.array(case["case_id"]),
        "scan_digest": np.array(case["scan_digest"]),
        "settings": np.array(json.dumps(case["settings"], sort_keys=True)),
    }
    if case.get("soft") is not None:
        arrays["soft"] = np.asarray(case["soft"], dtype=np.float16)
    return write_atomic(path, lambda fh: save_npz(fh, arrays))


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
    needed = ("samples", "labels", "experts", "present", "case_id", "scan_digest", "settings")
    missing = [k for k in needed if k not in case]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for key in ("case_id", "scan_digest"):
        case[key] = str(case[key])
    case["settings"] = json.loads(str(case["settings"]))
    case.pop("stats", None)  # case files of earlier versions carried timings; those now live in the run record
    return case


# ---- per-case maps ------------------------------------------------------------------------------------
def case_maps(samples: np.ndarray) -> dict[str, np.ndarray]:
    """From N binary masks (N, H, W): `mean`, the pixel frequency in [0, 1] (float32); `entropy`, the
    binary entropy of the mean in bits, 0 where all masks agree and 1 where half of them mark the pixel
    (float32); `majority`, pixels that more than half of the masks mark (uint8; a tie is not a majority)."""
    samples = np.asarray(samples)
    p = samples.astype(np.float64).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    entropy = np.where((p > 0) & (p < 1), terms, 0.0)
    majority = (2 * samples.astype(np.int64).sum(axis=0) > samples.shape[0]).astype(np.uint8)
    return {"mean": p.astype(np.float32), "entropy": entropy.astype(np.float32), "majority": majority}


def case_record(case: dict, maps: dict[str, np.ndarray], source: str) -> dict:
    """The case's JSON: what it is, how uncertain its masks are and, with readers, its metrics."""
    from ssb_fast.metrics import evaluate

    samples, experts, present = case["samples"], case["experts"], np.asarray(case["present"], dtype=bool)
    areas = samples.reshape(samples.shape[0], -1).sum(axis=1).astype(np.float64)
    labels = np.asarray(case["labels"])
    record = {
        "case_id": case["case_id"], "source": source, "n_samples": int(samples.shape[0]),
        "n_experts": int(present.sum()), "size": list(samples.shape[1:]),
        "label_counts": {str(k): int((labels == k).sum()) for k in sorted(set(labels.tolist()))},
        "uncertainty": {
            "entropy_bits_mean": float(maps["entropy"].astype(np.float64).mean()),
            "entropy_bits_max": float(maps["entropy"].max()),
            "uncertain_pixels": int((maps["entropy"] > 0.5).sum()),
            "area_px_mean": float(areas.mean()), "area_px_std": float(areas.std()),
            "majority_area_px": int(maps["majority"].sum()), "empty_masks": int((areas == 0).sum()),
        },
        "metrics": None,
    }
    if present.any():
        scores = evaluate(samples, experts, present, device="cpu")
        record["metrics"] = {key: (float(v) if isinstance(v, float) else int(v)) for key, v in scores.items()}
    return record


def _caption(record: dict, settings_line: str) -> list[str]:
    u = record["uncertainty"]
    lines = [settings_line,
             f"mean entropy {u['entropy_bits_mean']:.3f} bits, {u['uncertain_pixels']} px above 0.5 bits; mask area "
             f"{u['area_px_mean']:.1f} +- {u['area_px_std']:.1f} px, majority {u['majority_area_px']} px"]
    m = record["metrics"]
    if m is not None:
        lines.append(f"vs {m['n_experts']} reader(s): GED {m['ged']:.3f}  D_max {m['d_max']:.3f}  D_a {m['d_a']:.3f}  "
                     f"S_c {m['s_c']:.3f}  CI {m['ci']:.3f}  HM-IoU {m['hm_iou']:.3f}  DDI_e {m['ddi_e']:.3f}  "
                     f"DDI_g {m['ddi_g']:.3f}")
    return lines


def write_case_outputs(paths: CasePaths, case: dict, scan: np.ndarray, source: str, settings_line: str,
                       png: bool, commit: bool = True, only_missing: bool = False) -> dict:
    """Write a finished case: its maps (.npy), case.json and, with `png`, its pictures; then (with `commit`)
    the case file, last, which marks the case finished. `only_missing` leaves files that exist alone (they
    may be another process's). Returns the case's record."""
    maps = case_maps(case["samples"])
    record = case_record(case, maps, source)

    def wanted(path: Path) -> bool:
        return not (only_missing and path.exists())

    for name in MAPS:
        if wanted(paths.map_file(name, ".npy")):
            write_atomic(paths.map_file(name, ".npy"), lambda fh, a=maps[name]: np.save(fh, a, allow_pickle=False))
    if png:
        for name, draw in (("mean", heat_png), ("entropy", heat_png), ("majority", mask_png)):
            if wanted(paths.map_file(name, ".png")):
                draw(paths.map_file(name, ".png"), maps[name])
        if wanted(paths.png):
            write_case_preview(paths.png, scan, case["samples"], case["labels"], case["experts"], case["present"],
                               f"{case['case_id']}   {settings_line}")
        if wanted(paths.grid):
            write_case_grid(paths.grid, scan, case["samples"], case["labels"], case["experts"], case["present"],
                            maps["mean"], maps["entropy"], maps["majority"], case["case_id"],
                            _caption(record, settings_line))
    if wanted(paths.json):
        write_json_atomic(paths.json, record, sort_keys=True)
    if commit:
        write_case_file(paths.npz, case)
    return record


def refresh_case_outputs(paths: CasePaths, case: dict, scan: np.ndarray, source: str, settings_line: str,
                         png: bool) -> dict:
    """A case already finished: draw whichever of its maps, JSON and pictures are missing (an interrupted
    write, or an earlier run with --no-png), leaving the others alone; returns its record."""
    if all(p.exists() for p in paths.derived(png)):
        try:
            return json.loads(paths.json.read_text())
        except (OSError, ValueError):
            paths.json.unlink(missing_ok=True)  # damaged: written again below
    return write_case_outputs(paths, case, scan, source, settings_line, png, commit=False, only_missing=True)


# ---- the folder -----------------------------------------------------------------------------------------
def check_out_folder(out: Path) -> None:
    """DataFormatError naming the path when OUT, or a folder above it, is a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise DataFormatError(p, f"exists and is not a folder; --out {out} needs a folder there")
            return


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold OUT/.lock (a POSIX lock, which NFS passes on) while checking or assembling the folder, so that
    parts starting or finishing at the same time take turns."""
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except OSError as err:  # a file system without locks
                warnings.warn(f"{out / LOCK_FILE}: cannot lock ({err}); parts that start or finish at the same "
                              f"moment may both write args.json or the summary", stacklevel=3)
        yield
    finally:
        os.close(fd)  # releases the lock


def _differences(saved: dict, wanted: dict) -> list[str]:
    def there(key):
        return saved.get(key, MASK_SETTING_DEFAULTS.get(key))

    return [f"{key} {there(key)!r} there, {wanted[key]!r} now" for key in MASK_SETTINGS if there(key) != wanted[key]]


def read_args(out: Path) -> dict | None:
    args_file = out / ARGS_FILE
    if not args_file.exists():
        return None
    try:
        return json.loads(args_file.read_text())
    except (OSError, ValueError) as err:
        raise SampleRunError(f"{args_file}: cannot read the previous run's arguments ({err})") from None


def check_folder(out: Path, args: dict, settings: dict, shard: Shard, resume: bool,
                 mine: list[CasePaths]) -> dict | None:
    """Refuse to mix runs (call under `folder_lock`). One process: a folder holding a run needs `resume`,
    and then the same mask settings. A part of a sharded run may join a folder that other parts of the same
    run (same settings, same cases, same number of parts) are writing; it needs `resume` only when its own
    cases or record are already there. Returns the saved args.json, if any."""
    saved = read_args(out)
    has_cases = (out / CASES_DIR).is_dir() and any((out / CASES_DIR).glob("*.npz"))
    if saved is not None:
        diffs = _differences(saved, settings)
        if diffs and (resume or shard.sharded):
            raise SampleRunError(f"{out} was sampled with other settings ({'; '.join(diffs)}); --continue needs "
                                 f"the same ones (or choose another --out)")
    if shard.sharded and saved is not None and saved.get("case_ids") != args["case_ids"]:
        raise SampleRunError(f"{out} holds a run of other cases ({len(saved.get('case_ids') or [])} there, "
                             f"{len(args['case_ids'])} now): every part must be given the same scans")
    if resume:
        return saved
    joining = (shard.sharded and (saved is None or (saved.get("shard") or {}).get("num_parts") == shard.num_parts))
    if not joining:
        if saved is not None or has_cases:
            raise SampleRunError(f"{out} already holds a sampling run; pass --continue to reuse its finished "
                                 f"cases, or choose another --out")
        return saved
    if part_record_path(out, shard).exists() or any(p.npz.exists() for p in mine):
        raise SampleRunError(f"part {shard.part_id} of {shard.num_parts} already ran in {out}; pass --continue to "
                             f"reuse its finished cases, or choose another --out")
    return saved


def reusable(path: Path, case_id: str, digest: str, settings: dict) -> dict | None:
    """The finished case in `path` if it is whole and was made from this scan with these settings."""
    if not path.exists():
        return None
    try:
        case = read_case_file(path)
    except ValueError as err:
        warnings.warn(f"{err}; sampling case {case_id!r} again", stacklevel=3)
        return None
    check_case(case, path, case_id, digest, settings)
    return case


def check_case(case: dict, path: Path, case_id: str, digest: str, settings: dict) -> None:
    """SampleRunError unless the case file holds `case_id`, sampled from this scan with these settings."""
    if case["case_id"] != case_id:
        raise SampleRunError(f"{path} holds case {case['case_id']!r}, not {case_id!r}; choose another --out")
    diffs = _differences(case["settings"], settings)
    if diffs:
        raise SampleRunError(f"{path} was sampled with other settings ({'; '.join(diffs)}); --continue needs the "
                             f"same ones (or choose another --out)")
    if case["scan_digest"] != digest:
        raise SampleRunError(f"{path} was sampled from a different scan {case_id!r} than the one given now; "
                             f"choose another --out")


def write_part_record(out: Path, shard: Shard, record: dict) -> Path:
    return write_json_atomic(part_record_path(out, shard), record)


def read_part_records(out: Path) -> list[dict]:
    """The records of the parts that ran in OUT (sorted by part), skipping unreadable ones with a warning."""
    records = []
    folder = out / PARTS_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("part-*-of-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            warnings.warn(f"{path}: unreadable part record ({err}); left out of run.json", stacklevel=2)
    return sorted(records, key=lambda r: (r["part"]["num_parts"], r["part"]["part_id"]))


def missing_cases(paths: Sequence[CasePaths]) -> list[int]:
    return [i for i, p in enumerate(paths) if not p.npz.exists()]


# ---- assembly ------------------------------------------------------------------------------------------
def read_finished_cases(paths: Sequence[CasePaths], case_ids: Sequence[str], digests: Sequence[str],
                        settings: dict) -> list[dict]:
    """Every case file of the run, each checked against its case id, scan and settings."""
    cases = []
    for path, case_id, digest in zip(paths, case_ids, digests):
        try:
            case = read_case_file(path.npz)
        except ValueError as err:
            raise SampleRunError(f"{err}; delete it and rerun with --continue to sample the case again") from None
        check_case(case, path.npz, case_id, digest, settings)
        cases.append(case)
    return cases


def write_run_samples(out: Path, cases: Sequence[dict], case_ids: Sequence[str], soft: bool) -> Path:
    """OUT/samples.npz from the case files, in the run's case order."""
    extra = {"labels": np.stack([c["labels"] for c in cases])}
    if soft:
        extra["soft"] = np.stack([np.asarray(c["soft"], dtype=np.float16) for c in cases])
    return write_samples_npz(out, np.stack([c["samples"] for c in cases]), np.stack([c["experts"] for c in cases]),
                             np.stack([c["present"] for c in cases]), list(case_ids), extra=extra)


def write_nifti_maps(out: Path, volumes: Sequence[VolumeInput], cases: Sequence[dict]) -> list[str]:
    """For every NIfTI input: its mean, entropy and majority as NIfTI of its shape and affine (slices not
    sampled: NaN in mean and entropy, 0 in majority). Returns the files, relative to OUT."""
    written = []
    stems = case_file_stems([v.name for v in volumes])
    for volume, stem in zip(volumes, stems):
        per_slice = {k: case_maps(cases[i]["samples"]) for k, i in zip(volume.slices, volume.cases)}
        where = (f"slices {volume.slices[0]}..{volume.slices[-1]} along axis {volume.axis}"
                 if volume.axis is not None else "2-D")
        for name, fill, dtype, what in (
            ("mean", np.nan, np.float32, "pixel frequency of the masks"),
            ("entropy", np.nan, np.float32, "entropy of the mean, bits"),
            ("majority", 0, np.uint8, "majority mask"),
        ):
            data = place_slices(volume.nifti, volume.axis, {k: m[name] for k, m in per_slice.items()}, fill, dtype)
            path = nifti_map_path(out, stem, name)
            remove_staged(path)  # left by an assembly that was killed; the lock keeps other writers out
            write_nifti_like(path, data, volume.nifti, f"ssb-fast {what}; {where}")
            written.append(str(path.relative_to(out)))
    return written
