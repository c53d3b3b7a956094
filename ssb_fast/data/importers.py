"""Importers from the formats the field uses into the project format.

- LIDC crops pickle (Probabilistic U-Net): `{key: {"image", "masks", "series_uid"}}`, read with a
  restricted unpickler.
- LIDC hdf5 (PHiSeg / CCDM): groups train/val/test with `images` (N, H, W) and `labels` (N, H, W, M) or
  (N, M, H, W); optional h5py.
- A folder: `images/<case>.<ext>` and `masks/<case>_r<K>.<ext>` (ext png, jpg, npy, nii.gz), optionally
  under train/val/test subfolders; or the CIMD sample layout `<split>/<case>/image_*.jpg` +
  `label<K>_.jpg`.

Every case is checked (finite image, binary masks of the image's size, at least one reader) and an error
names the file and the case; nothing is written unless the whole import succeeds.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssb_fast.data.dataset_format import (
    LIDC_CREDIT,
    LIDC_LICENCE,
    SPLITS,
    DataFormatError,
    read_meta,
    split_by_group,
    write_dataset,
)
from ssb_fast.data.image_io import (
    IMAGE_SUFFIXES,
    JPEG_THRESHOLD,
    LOSSY_SUFFIXES,
    DataWarning,
    binarise_mask,
    case_name,
    check_image_finite,
    choose_scaling,
    file_suffix,
    image_to_chw,
    read_array,
)
from ssb_fast.data.safe_pickle import safe_load_pickle


@dataclass
class RawCase:
    """One case as read: the raw image (C, H, W) and raw masks per reader slot, with where each came from."""

    case_id: str
    image: np.ndarray
    image_path: str
    masks: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)
    patient_id: str | None = None
    lossy_masks: bool = False


def resize_area(array: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) or (H, W) float array -> size x size by area averaging (each output pixel is the mean of the
    input area it covers, fractions included), the resampling that keeps a mask's area and an image's mean."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    squeeze = x.dim() == 2
    x = x[None, None] if squeeze else x[None]
    y = F.adaptive_avg_pool2d(x, (size, size))[0]
    return (y[0] if squeeze else y).numpy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary mask resized by area averaging, then marked where at least half of a pixel was marked."""
    return (resize_area(mask.astype(np.float64), size) >= 0.5).astype(np.uint8)


MIN_SIDE = 8  # the smallest scan side an import accepts (and the smallest --size)


def center_crop(array: np.ndarray, side: int) -> np.ndarray:
    """The central side x side pixels of a (..., H, W) array (for odd margins the extra pixel is cut at the
    bottom and right), the crop that keeps a centred nodule centred."""
    height, width = array.shape[-2:]
    top, left = (height - side) // 2, (width - side) // 2
    return array[..., top:top + side, left:left + side]


def assemble(
    cases: list[RawCase],
    threshold: float | None = None,
    image_range: tuple[float, float] | None = None,
    progress: Callable[[int], None] | None = None,
    size: int | None = None,
    crop: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Check and convert raw cases into project arrays; returns the arrays and the scaling used.

    `crop` first keeps the central crop x crop pixels of every case (a field of view to match a model's:
    the central 64 pixels of a 128-pixel crop at 0.5 mm cover 32 mm). `size` then resizes every case to
    size x size (images by area averaging, masks by area averaging and >= 0.5), so scans of different
    sizes can be imported together; without either, all must share one shape.
    """
    if not cases:
        raise DataFormatError(None, "no cases found")
    if size is not None and size < MIN_SIDE:
        raise ValueError(f"size must be >= {MIN_SIDE} pixels; got {size}")
    if crop is not None and crop < MIN_SIDE:
        raise ValueError(f"crop must be >= {MIN_SIDE} pixels; got {crop}")
    dtypes, low, high = set(), np.inf, -np.inf
    shape = None
    for case in cases:
        check_image_finite(case.image, case.image_path, case.case_id)
        if min(case.image.shape[1:]) < MIN_SIDE:  # 1x1 or empty: nothing a model could learn from, or upscale
            height, width = case.image.shape[1:]
            raise DataFormatError(case.image_path, f"the image is {height}x{width} pixels; scans must be at least "
                                                   f"{MIN_SIDE}x{MIN_SIDE}", case.case_id)
        if case.image.size:
            dtypes.add(case.image.dtype)
            low, high = min(low, float(case.image.min())), max(high, float(case.image.max()))
        if crop is not None and min(case.image.shape[1:]) < crop:
            height, width = case.image.shape[1:]
            raise DataFormatError(case.image_path, f"the image is {height}x{width} pixels, smaller than the "
                                                   f"{crop}x{crop} centre crop asked for", case.case_id)
        if shape is None:
            shape = case.image.shape
        elif (size is not None or crop is not None) and case.image.shape[0] != shape[0]:
            raise DataFormatError(
                case.image_path,
                f"the image has {case.image.shape[0]} channel(s); the first case's has {shape[0]}",
                case.case_id,
            )
        elif size is None and crop is None and case.image.shape != shape:
            raise DataFormatError(
                case.image_path,
                f"image shape {case.image.shape} (C, H, W) differs from the first case's {shape}",
                case.case_id,
            )
        if not case.masks:
            raise DataFormatError(case.image_path, "case has zero reader masks; expected at least one", case.case_id)
    scaling = choose_scaling(dtypes, low, high, image_range)
    slots = sorted({k for c in cases for k in c.masks})
    slot_of = {k: i for i, k in enumerate(slots)}
    n, channels = len(cases), shape[0]
    out_h, out_w = (size, size) if size is not None else (crop, crop) if crop is not None else shape[1:]
    images = np.empty((n, channels, out_h, out_w), dtype=np.float32)
    masks = np.zeros((n, len(slots), out_h, out_w), dtype=np.uint8)
    present = np.zeros((n, len(slots)), dtype=bool)
    for i, case in enumerate(cases):
        image = scaling.apply(case.image)
        height, width = case.image.shape[1:]
        if crop is not None:
            image = center_crop(image, crop)
        images[i] = resize_area(image, size) if size is not None else image
        for k, (mask, path) in case.masks.items():
            if mask.shape != (height, width):
                raise DataFormatError(
                    path,
                    f"image and mask shapes differ: image is {height}x{width}, mask is "
                    f"{'x'.join(map(str, mask.shape))}",
                    case.case_id,
                )
            binary = binarise_mask(mask, path, case.case_id, threshold, lossy=case.lossy_masks)
            if crop is not None:
                binary = center_crop(binary, crop)
            masks[i, slot_of[k]] = resize_mask(binary, size) if size is not None else binary
            present[i, slot_of[k]] = True
        if progress is not None:
            progress(1)
    lossy = [c for c in cases if c.lossy_masks]
    if lossy:
        n_masks = sum(len(c.masks) for c in lossy)
        warnings.warn(
            DataWarning(
                f"{n_masks} JPEG mask(s) in {len(lossy)} case(s) are not exactly binary (lossy compression) "
                f"and were thresholded at {JPEG_THRESHOLD if threshold is None else threshold:g} of full scale "
                f"(first: {next(iter(lossy[0].masks.values()))[1]})"
            ),
            stacklevel=2,
        )
    arrays = {"images": images, "masks": masks, "present": present, "case_ids": [c.case_id for c in cases]}
    if any(c.patient_id is not None for c in cases):
        arrays["patient_ids"] = [c.patient_id or "" for c in cases]
    return arrays, {"image_scaling": scaling.to_meta(), "reader_slots": [str(k) for k in slots]}


def _take(arrays: dict, idx: list[int]) -> dict:
    out = {}
    for key, value in arrays.items():
        out[key] = value[idx] if isinstance(value, np.ndarray) else [value[i] for i in idx]
    return out


def _write(out_dir, arrays: dict, parts: dict[str, list[int]], meta: dict) -> dict:
    write_dataset(out_dir, {name: _take(arrays, parts.get(name, [])) for name in SPLITS}, meta)
    return read_meta(out_dir)


def import_lidc_pickle(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    threshold: float | None = None,
    image_range: tuple[float, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Import the Probabilistic U-Net LIDC crops pickle; split by `series_uid` 70/15/15 with `seed`."""
    data = safe_load_pickle(file)
    if not isinstance(data, dict) or not data:
        raise DataFormatError(file, f"expected a non-empty dict of cases, found {type(data).__name__}")
    cases = []
    for key, record in data.items():
        case_id = str(key)
        if not isinstance(record, dict):
            raise DataFormatError(file, f"case record must be a dict, found {type(record).__name__}", case_id)
        missing = [k for k in ("image", "masks", "series_uid") if k not in record]
        if missing:
            raise DataFormatError(file, f"case record lacks {missing}; found keys {sorted(map(str, record))}", case_id)
        image = np.asarray(record["image"])
        raw_masks = record["masks"]
        if isinstance(raw_masks, np.ndarray) and raw_masks.ndim == 3:
            raw_masks = list(raw_masks)
        if not isinstance(raw_masks, (list, tuple)):
            raise DataFormatError(file, f"masks must be a list of arrays, found {type(raw_masks).__name__}", case_id)
        if image.ndim != 2:
            raise DataFormatError(file, f"image must be 2-D (H, W), found shape {image.shape}", case_id)
        case = RawCase(case_id, image[None], str(file), patient_id=str(record["series_uid"]))
        for k, m in enumerate(raw_masks):
            case.masks[k] = (np.asarray(m), str(file))
        cases.append(case)
    arrays, info = assemble(cases, threshold, image_range, progress)
    parts = split_by_group(arrays["patient_ids"], seed=seed)
    meta = {
        "name": Path(file).stem,
        "semi_synthetic": False,
        "description": "LIDC-IDRI crops in the Probabilistic U-Net pickle format.",
        "source": f"import-lidc-pickle {Path(file).name}",
        "licence": LIDC_LICENCE,
        "credit": LIDC_CREDIT,
        "split_rule": f"by series_uid, train/val/test 70/15/15, seed {seed}",
        **info,
        "counts": {"cases": len(cases), "patients": len(set(arrays["patient_ids"]))},
    }
    return _write(out_dir, arrays, parts, meta)


def import_lidc_hdf5(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    threshold: float | None = None,
    image_range: tuple[float, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Import the PHiSeg / CCDM LIDC hdf5 file, keeping its own train/val/test split."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError("import-lidc-hdf5 needs h5py: pip install h5py (the project's `hdf5` extra)") from err
    cases, split_of = [], {}
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise DataFormatError(file, f"unreadable hdf5 file ({err})") from err
    with handle:
        groups = [name for name in SPLITS if name in handle]
        if not groups:
            raise DataFormatError(file, f"expected groups {list(SPLITS)}, found {sorted(handle.keys())}")
        for name in groups:
            group = handle[name]
            for key in ("images", "labels"):
                if key not in group:
                    raise DataFormatError(file, f"group {name!r} lacks dataset {key!r}; found {sorted(group.keys())}")
            images = np.asarray(group["images"])
            labels = np.asarray(group["labels"])
            uids = np.asarray(group["uids"]) if "uids" in group else None
            if images.ndim != 3:
                raise DataFormatError(file, f"{name}/images must be (N, H, W), found {images.shape}")
            n, height, width = images.shape
            if labels.ndim == 4 and labels.shape[0] == n and labels.shape[1:3] == (height, width):
                labels = np.moveaxis(labels, -1, 1)
            elif not (labels.ndim == 4 and labels.shape[0] == n and labels.shape[2:] == (height, width)):
                raise DataFormatError(
                    file,
                    f"{name}/labels must be (N, H, W, M) or (N, M, H, W) with N={n}, H={height}, W={width}; "
                    f"found {labels.shape}",
                )
            for i in range(n):
                case_id = f"{name}_{i:05d}"
                patient = str(uids[i]) if uids is not None and len(uids) == n else None
                case = RawCase(case_id, images[i][None], f"{file}:{name}/images[{i}]", patient_id=patient)
                for k in range(labels.shape[1]):
                    case.masks[k] = (labels[i, k], f"{file}:{name}/labels[{i}]")
                split_of[len(cases)] = name
                cases.append(case)
    arrays, info = assemble(cases, threshold, image_range, progress)
    parts = {name: [i for i, s in split_of.items() if s == name] for name in SPLITS}
    meta = {
        "name": Path(file).stem,
        "semi_synthetic": False,
        "description": "LIDC-IDRI crops in the PHiSeg / CCDM hdf5 layout.",
        "source": f"import-lidc-hdf5 {Path(file).name}",
        "licence": LIDC_LICENCE,
        "credit": LIDC_CREDIT,
        "split_rule": "the file's own train/val/test groups",
        **info,
        "counts": {"cases": len(cases)},
    }
    return _write(out_dir, arrays, parts, meta)


_MASK_NAME = re.compile(r"^(?P<case>.+)_r(?P<k>\d+)$")
_CIMD_LABEL = re.compile(r"^label(?P<k>\d+)_?$")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _check_suffix(path: Path, case: str | None = None) -> None:
    if file_suffix(path) not in IMAGE_SUFFIXES:
        raise DataFormatError(
            path,
            f"unknown extension {file_suffix(path) or '(none)'!r}; expected one of {IMAGE_SUFFIXES}",
            case,
        )


def _read_standard(root: Path, prefix: str) -> list[RawCase]:
    """`root/images/<case>.<ext>` with `root/masks/<case>_r<K>.<ext>`."""
    cases: dict[str, RawCase] = {}
    for path in _visible_files(root / "images"):
        _check_suffix(path)
        case_id = prefix + case_name(path)
        if case_id in cases:
            raise DataFormatError(path, "two image files for one case", case_id)
        array = read_array(path, case_id)
        cases[case_id] = RawCase(
            case_id,
            image_to_chw(array, path, case_id, file_suffix(path) in (".png", ".jpg", ".jpeg")),
            str(path),
        )
    mask_dir = root / "masks"
    if not mask_dir.is_dir():
        raise DataFormatError(root, "no masks/ folder beside images/")
    for path in _visible_files(mask_dir):
        _check_suffix(path)
        match = _MASK_NAME.match(case_name(path))
        if not match:
            raise DataFormatError(path, "mask file names must be <case>_r<K>.<ext> (K = reader number)")
        case_id = prefix + match["case"]
        if case_id not in cases:
            raise DataFormatError(path, "mask has no image (expected images/<case>.<ext>)", case_id)
        case = cases[case_id]
        k = int(match["k"])
        if k in case.masks:
            raise DataFormatError(path, f"two mask files for reader {k}", case_id)
        case.masks[k] = (read_array(path, case_id), str(path))
        case.lossy_masks |= file_suffix(path) in LOSSY_SUFFIXES
    return list(cases.values())


def _read_cimd(split_dir: Path, prefix: str) -> list[RawCase]:
    """`split_dir/<case>/image_*.<ext>` with `label<K>_.<ext>` per reader (the CIMD sample layout)."""
    cases = []
    for case_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case_id = prefix + case_dir.name
        images, labels = [], {}
        for path in _visible_files(case_dir):
            stem = case_name(path)
            if stem.startswith("image"):
                images.append(path)
            elif _CIMD_LABEL.match(stem):
                labels[int(_CIMD_LABEL.match(stem)["k"])] = path
            else:
                continue
            _check_suffix(path, case_id)
        if len(images) != 1:
            raise DataFormatError(case_dir, f"expected one image_* file, found {len(images)}", case_id)
        image_path = images[0]
        array = read_array(image_path, case_id)
        case = RawCase(case_id, image_to_chw(array, image_path, case_id, True), str(image_path))
        for k, path in sorted(labels.items()):
            case.masks[k] = (read_array(path, case_id), str(path))
            case.lossy_masks |= file_suffix(path) in LOSSY_SUFFIXES
        if not case.masks:
            raise DataFormatError(case_dir, "case has zero reader masks (no label<K>_ files)", case_id)
        cases.append(case)
    return cases


def _is_cimd_split(folder: Path) -> bool:
    return any(sub.is_dir() and any(p.name.startswith("image") for p in sub.iterdir()) for sub in folder.iterdir())


def read_folder(src: str | os.PathLike, layout: str = "auto") -> tuple[dict[str, list[RawCase]], str]:
    """Find and read the cases of a folder; returns them per split (None = not split) and the layout used."""
    src = Path(src)
    if not src.is_dir():
        raise DataFormatError(src, "no such folder")
    split_dirs = {
        _SPLIT_ALIASES[p.name.lower()]: p for p in src.iterdir() if p.is_dir() and p.name.lower() in _SPLIT_ALIASES
    }
    if layout == "auto":
        if (src / "images").is_dir() or any((d / "images").is_dir() for d in split_dirs.values()):
            layout = "standard"
        elif _is_cimd_split(src) or any(_is_cimd_split(d) for d in split_dirs.values()):
            layout = "cimd"
        else:
            raise DataFormatError(
                src,
                "no images/ + masks/ folders and no <case>/image_* folders found (see `import-folder --help`)",
            )
    reader = _read_standard if layout == "standard" else _read_cimd
    if layout == "standard" and (src / "images").is_dir():
        return {"": reader(src, "")}, layout
    if layout == "cimd" and not split_dirs:
        return {"": reader(src, "")}, layout
    out: dict[str, list[RawCase]] = {}
    for name, folder in split_dirs.items():
        if layout == "cimd" or (folder / "images").is_dir():
            out.setdefault(name, []).extend(reader(folder, f"{folder.name}-" if layout == "cimd" else ""))
    return out, layout


def import_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "auto",
    seed: int = 0,
    threshold: float | None = None,
    image_range: tuple[float, float] | None = None,
    layout: str = "auto",
    progress: Callable[[int], None] | None = None,
    size: int | None = None,
    crop: int | None = None,
) -> dict:
    """Import a folder of images and per-reader masks (cut to their central crop x crop pixels when `crop`
    is given, then resized to size x size when `size` is given).

    `split="auto"` keeps train/val/test (or training/testing) subfolders when there are any and otherwise
    splits the cases 70/15/15 with `seed`; `split="train"|"val"|"test"` puts every case in that split.
    """
    if split not in ("auto", *SPLITS):
        raise ValueError(f"split must be auto, train, val or test, got {split!r}")
    if layout not in ("auto", "standard", "cimd"):
        raise ValueError(f"layout must be auto, standard or cimd, got {layout!r}")
    found, used_layout = read_folder(src, layout)
    cases = [c for group in found.values() for c in group]
    arrays, info = assemble(cases, threshold, image_range, progress, size, crop)
    source_shapes = sorted({"x".join(map(str, c.image.shape[1:])) for c in cases})
    if crop is not None:
        info["center_crop"] = {"side": crop, "source_shapes": source_shapes}
    if size is not None:
        info["resized"] = {"size": size, "images": "area averaging", "masks": "area averaging, then >= 0.5",
                           "source_shapes": source_shapes}
    if split in SPLITS:
        parts = {split: list(range(len(cases)))}
        rule = f"every case in {split}"
    elif "" in found:
        parts = split_by_group(arrays["case_ids"], seed=seed)
        rule = f"by case, train/val/test 70/15/15, seed {seed}"
    else:
        parts, start = {}, 0
        for name, group in found.items():
            parts[name] = list(range(start, start + len(group)))
            start += len(group)
        rule = "the source's own split folders"
    meta = {
        "name": Path(src).resolve().name,
        "semi_synthetic": False,
        "description": f"Imported from the folder {src} ({used_layout} layout).",
        "source": f"import-folder {Path(src).resolve()}",
        "licence": None,
        "credit": None,
        "split_rule": rule,
        "layout": used_layout,
        "jpeg_masks_thresholded": any(c.lossy_masks for c in cases),
        **info,
        "counts": {"cases": len(cases)},
    }
    readme = Path(src) / "README.md"
    if readme.is_file():
        meta["source_readme"] = str(readme.resolve())
    return _write(out_dir, arrays, parts, meta)
