"""The project's dataset format on disk: one `.npz` per split plus `meta.json`, written atomically, read back
with every array checked.

A split file holds `images` float32 (N, C, H, W) in [-1, 1], `masks` uint8 (N, M, H, W) in {0, 1},
`present` bool (N, M) (which reader slots hold a real annotation) and `case_ids` (N,) str; it may hold
`patient_ids` (N,) str as well. No array is an object array, so files load with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ssb_fast.atomic import stage_file

FORMAT = "ssb-fast-dataset"
SCHEMA = 1
SPLITS = ("train", "val", "test")
REQUIRED_ARRAYS = ("images", "masks", "present", "case_ids")
OPTIONAL_ARRAYS = ("patient_ids",)


# Credit and licence of LIDC-IDRI, recorded in the meta.json of every dataset built from it.
LIDC_LICENCE = "LIDC-IDRI: CC BY 3.0"
LIDC_CREDIT = (
    "Armato III, S. G., et al. (2015). Data From LIDC-IDRI. The Cancer Imaging Archive. "
    "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX"
)


class DataFormatError(ValueError):
    """Input data that cannot be used; the message names the file, the case (when known) and what is wrong."""

    def __init__(self, path: str | os.PathLike | None, problem: str, case: str | None = None):
        self.path = None if path is None else str(path)
        self.case = case
        self.problem = problem
        where = self.path or "<data>"
        if case is not None:
            where += f": case {case!r}"
        super().__init__(f"{where}: {problem}")


def check_case(image: np.ndarray, masks: np.ndarray, present: np.ndarray, *, path, case: str) -> None:
    """Check one in-memory case against the item contract (image (C,H,W) float in [-1,1], binary masks
    (M,H,W), at least one reader present); raise DataFormatError naming `path` and `case`."""
    if image.ndim != 3:
        raise DataFormatError(path, f"image must be (C, H, W), found shape {tuple(image.shape)}", case)
    if not np.all(np.isfinite(image)):
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataFormatError(path, f"image holds {bad} NaN/Inf value(s); expected finite intensities", case)
    if image.size and (image.min() < -1.0 or image.max() > 1.0):
        raise DataFormatError(
            path, f"image values must lie in [-1, 1], found [{image.min():.4g}, {image.max():.4g}]", case
        )
    if masks.ndim != 3:
        raise DataFormatError(path, f"masks must be (M, H, W), found shape {tuple(masks.shape)}", case)
    if masks.shape[1:] != image.shape[1:]:
        raise DataFormatError(
            path,
            f"image and mask shapes differ: image is {image.shape[1]}x{image.shape[2]}, "
            f"masks are {masks.shape[1]}x{masks.shape[2]}",
            case,
        )
    if masks.size and not np.all((masks == 0) | (masks == 1)):
        values = np.unique(masks)[:6].tolist()
        raise DataFormatError(path, f"masks must be binary (0/1), found values {values}", case)
    if present.shape != (masks.shape[0],):
        raise DataFormatError(
            path,
            f"present must have one flag per reader ({masks.shape[0]}), found shape {present.shape}",
            case,
        )
    if not present.any():
        raise DataFormatError(path, "case has zero reader masks; expected at least one annotator", case)


def check_unique_ids(case_ids: Sequence[str], where) -> None:
    """DataFormatError naming the first repeated case id: outputs are named and matched by case id, so two
    cases with one id would be renamed or mixed up."""
    seen: set[str] = set()
    for cid in case_ids:
        if cid in seen:
            count = sum(1 for c in case_ids if c == cid)
            raise DataFormatError(where, f"case id {cid!r} appears {count} times; case ids must be unique", cid)
        seen.add(cid)


def write_dataset(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Mapping[str, np.ndarray | Sequence[str]]],
    meta: Mapping,
) -> Path:
    """Write `splits` (name -> arrays `images`, `masks`, `present`, `case_ids`[, `patient_ids`]) and `meta`
    to `out_dir` as `<split>.npz` + `meta.json`.

    Every case is checked first, then each file goes to a temporary name and is moved into place with
    `os.replace`, so a failure leaves no partial file and an existing dataset stays whole until the new one
    is complete. `meta.json` gains the format fields, the shapes and the per-split counts.
    """
    out = Path(out_dir)
    arrays = {name: _as_split_arrays(name, split, out / f"{name}.npz") for name, split in splits.items()}
    if not arrays:
        raise ValueError("write_dataset needs at least one split")
    shapes = {name: a["images"].shape[1:] for name, a in arrays.items()}
    raters = {name: a["masks"].shape[1] for name, a in arrays.items()}
    if len(set(shapes.values())) > 1 or len(set(raters.values())) > 1:
        raise DataFormatError(out, f"splits disagree on (C, H, W) or reader count: {shapes}, readers {raters}")
    ids = [cid for a in arrays.values() for cid in a["case_ids"].tolist()]
    if len(ids) != len(set(ids)):
        dup = next(cid for cid in ids if ids.count(cid) > 1)
        raise DataFormatError(out, "case ids must be unique across splits", dup)

    channels, height, width = next(iter(shapes.values()))
    full_meta = {
        "format": FORMAT,
        "schema": SCHEMA,
        **dict(meta),
        "image_channels": int(channels),
        "image_size": [int(height), int(width)],
        "n_raters": int(next(iter(raters.values()))),
        "splits": {
            name: {
                "file": f"{name}.npz",
                "n_cases": int(a["images"].shape[0]),
                "n_reader_masks": int(a["present"].sum()),
                "n_non_empty_masks": int((_non_empty(a["masks"]) & a["present"]).sum()),
            }
            for name, a in arrays.items()
        },
    }
    full_meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    from ssb_fast import __version__

    full_meta.setdefault("ssb_fast_version", __version__)

    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, a in arrays.items():
            final = out / f"{name}.npz"
            staged.append((stage_file(final, lambda f, a=a: np.savez_compressed(f, **a)), final))
        meta_text = json.dumps(full_meta, indent=2, sort_keys=False) + "\n"
        staged.append((stage_file(out / "meta.json", lambda f: f.write(meta_text.encode())), out / "meta.json"))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return out


def _non_empty(masks: np.ndarray) -> np.ndarray:
    """(N, M) bool: which reader masks have at least one foreground pixel."""
    n, m = masks.shape[:2]
    return masks.reshape(n, m, -1).any(-1) if masks.size else np.zeros((n, m), dtype=bool)


def _as_split_arrays(name: str, split: Mapping, path: Path) -> dict[str, np.ndarray]:
    missing = [k for k in REQUIRED_ARRAYS if k not in split]
    if missing:
        raise ValueError(f"split {name!r} lacks {missing}; a split needs {list(REQUIRED_ARRAYS)}")
    images = np.ascontiguousarray(split["images"], dtype=np.float32)
    masks = np.asarray(split["masks"])
    present = np.asarray(split["present"], dtype=bool)
    case_ids = np.asarray([str(c) for c in split["case_ids"]], dtype=np.str_)
    n = images.shape[0]
    if images.ndim != 4 or masks.ndim != 4 or present.ndim != 2:
        raise DataFormatError(
            path,
            f"expected images (N,C,H,W), masks (N,M,H,W), present (N,M); found {images.shape}, "
            f"{masks.shape}, {present.shape}",
        )
    if masks.shape[0] != n or present.shape[0] != n or case_ids.shape != (n,):
        raise DataFormatError(
            path,
            f"arrays disagree on the number of cases: images {n}, masks {masks.shape[0]}, present "
            f"{present.shape[0]}, case_ids {case_ids.shape[0]}",
        )
    for i in range(n):
        check_case(images[i], masks[i], present[i], path=path, case=str(case_ids[i]))
    out = {
        "images": images,
        "masks": np.ascontiguousarray(masks, dtype=np.uint8),
        "present": present,
        "case_ids": case_ids.reshape(n) if n else np.zeros((0,), dtype="<U1"),
    }
    for key in OPTIONAL_ARRAYS:
        if key in split:
            extra = np.asarray([str(c) for c in split[key]], dtype=np.str_)
            if extra.shape != (n,):
                raise DataFormatError(path, f"{key} must have one entry per case ({n}), found {extra.shape}")
            out[key] = extra if n else np.zeros((0,), dtype="<U1")
    return out


def read_split(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load one split `.npz` into memory and check it; DataFormatError names the file and the bad case."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "no such split file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in REQUIRED_ARRAYS if k not in keys]
            if missing:
                raise DataFormatError(path, f"missing arrays {missing}; found {sorted(keys)}")
            arrays = {k: npz[k] for k in (*REQUIRED_ARRAYS, *OPTIONAL_ARRAYS) if k in keys}
    except DataFormatError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataFormatError(path, f"unreadable split file ({type(err).__name__}: {err})") from err

    images, masks, present, case_ids = (arrays[k] for k in REQUIRED_ARRAYS)
    if images.dtype != np.float32 or masks.dtype != np.uint8 or present.dtype != np.bool_:
        raise DataFormatError(
            path,
            f"expected images float32, masks uint8, present bool; found {images.dtype}, {masks.dtype}, {present.dtype}",
        )
    if images.ndim != 4 or masks.ndim != 4 or present.ndim != 2 or case_ids.ndim != 1:
        raise DataFormatError(
            path,
            f"expected images (N,C,H,W), masks (N,M,H,W), present (N,M), case_ids (N,); found "
            f"{images.shape}, {masks.shape}, {present.shape}, {case_ids.shape}",
        )
    n = images.shape[0]
    if masks.shape[0] != n or present.shape != masks.shape[:2] or case_ids.shape[0] != n:
        raise DataFormatError(path, "images, masks, present and case_ids disagree on the number of cases")
    if masks.shape[2:] != images.shape[2:]:
        raise DataFormatError(path, f"image size {images.shape[2:]} differs from mask size {masks.shape[2:]}")
    if n == 0:
        return arrays
    check_unique_ids([str(c) for c in case_ids.tolist()], path)
    # Whole-array checks first (fast); only on failure look for the first offending case to name it.
    finite = np.isfinite(images).reshape(n, -1).all(-1)
    in_range = (np.abs(images) <= 1.0).reshape(n, -1).all(-1)
    binary = (masks <= 1).reshape(n, -1).all(-1)
    any_reader = present.any(-1)
    for ok, what in (
        (finite, "image holds NaN/Inf values"),
        (in_range, "image values outside [-1, 1]"),
        (binary, "masks are not binary (0/1)"),
        (any_reader, "case has zero reader masks"),
    ):
        if not ok.all():
            raise DataFormatError(path, what, str(case_ids[int(np.argmin(ok))]))
    return arrays


def read_meta(dataset_dir: str | os.PathLike) -> dict:
    """Read `meta.json` of a dataset folder ({} if the folder has none)."""
    path = Path(dataset_dir) / "meta.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataFormatError(path, f"unreadable meta.json ({err})") from err
    if not isinstance(meta, dict):
        raise DataFormatError(path, f"meta.json must hold a JSON object, found {type(meta).__name__}")
    return meta


def split_by_group(groups: Sequence[str], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[int]]:
    """Assign whole groups (patients) to train/val/test in the given fractions; returns the case indices of
    each split.

    The groups are shuffled with `seed` after sorting, so the assignment depends only on the set of groups
    and the seed, and no group lands in two splits.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = np.round(np.cumsum(fractions) * len(unique)).astype(int)
    split_of_group = {}
    for rank, g in enumerate(order):
        split_of_group[unique[g]] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups):
        out[split_of_group[g]].append(i)
    return out
