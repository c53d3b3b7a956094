"""The scans `ssb-fast sample` samples: a dataset split with its readers' masks, or image files (PNG, JPEG,
.npy, NIfTI; a NIfTI volume cut into the slices the user names), checked against the model before any
work starts, with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssb_fast.data.dataset import load
from ssb_fast.data.dataset_format import DataFormatError, check_unique_ids
from ssb_fast.data.image_io import (
    IMAGE_SUFFIXES,
    case_name,
    check_image_finite,
    choose_scaling,
    file_suffix,
    image_to_chw,
    peek_array,
    read_array,
)
from ssb_fast.nifti_io import SPATIAL_AXES, NiftiScan, SliceSpec, is_nifti, read_nifti

DEFAULT_AXIS = SPATIAL_AXES - 1  # the last spatial axis: slices (X, Y) of an (X, Y, Z) volume


class SampleRunError(ValueError):
    """Settings or an output folder that cannot be used; the message says what to change."""


@dataclass
class VolumeInput:
    """A NIfTI input, whose maps go back out as NIfTI: the file as read, its case name, the slices its
    scans were cut at along `axis` (None and [0] for a 2-D file) and where those scans are in the ScanSet."""

    nifti: NiftiScan
    name: str
    axis: int | None
    slices: list[int]
    cases: list[int]

    def to_dict(self) -> dict:
        return {"file": str(self.nifti.path.resolve()), "shape": list(self.nifti.shape), "axis": self.axis,
                "slices": self.slices if self.axis is not None else None}


@dataclass
class ScanSet:
    """Scans to sample: `images` (S, C, H, W) float32 in [-1, 1] with their case ids and source files, the
    experts' masks (S, M, H, W) uint8 with `present` (S, M) (M = 0 for image files), `input`, how the
    scans were chosen (recorded in args.json), and the NIfTI inputs among them."""

    images: torch.Tensor
    case_ids: list[str]
    sources: list[str]
    experts: np.ndarray
    present: np.ndarray
    input: dict
    volumes: list[VolumeInput] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)


# ---- a dataset split --------------------------------------------------------------------------------
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


# ---- image files ---------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class ModelInput:
    """What scans a model takes: `channels`, the `size` (H, W) it was trained on, and `multiple`, the
    factor its down-sampling needs both sides to be divisible by."""

    channels: int
    size: tuple[int, int]
    multiple: int = 1


def model_input(model) -> ModelInput:
    cfg = model.config
    return ModelInput(int(cfg.scan_channels), (int(cfg.image_size), int(cfg.image_size)),
                      int(getattr(model, "size_multiple", 2 ** (len(cfg.channel_mult) - 1))))


def model_scan_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of the scans the model was trained on."""
    spec = model_input(model)
    return spec.channels, *spec.size


def check_scan(chw_shape: tuple, spec: ModelInput, path, case: str, hint: str = "") -> None:
    """DataFormatError naming `path` and `case` when a scan's channels or size do not suit the model; the
    size error says which sizes work, and `hint` how to get there."""
    c, h, w = chw_shape
    if c != spec.channels:
        raise DataFormatError(path, f"the scan has {c} channel(s); the model expects {spec.channels}", case)
    eh, ew = spec.size
    if (h, w) == (eh, ew):
        return
    if h % spec.multiple or w % spec.multiple:
        steps = spec.multiple.bit_length() - 1
        problem = (f"the scan is {h}x{w} pixels, which the model's {steps} down-sampling steps cannot take (both "
                   f"sides must be multiples of {spec.multiple}); it was trained on {eh}x{ew} scans")
    else:
        problem = f"the scan is {h}x{w} pixels; the model was trained on {eh}x{ew} scans"
    raise DataFormatError(path, f"{problem} and takes only that size{hint}", case)


def _resize_hint(size: tuple[int, int]) -> str:
    return (f". Resize the images to {size[0]}x{size[1]} first, by area averaging (`ssb-fast data import-folder "
            f"--size {size[0]}` does that), or, for a model trained at the scans' own pixel size on a smaller field "
            f"of view, cut out their central pixels (`--center-crop {size[0]}`)")


def check_scans_fit(model, scans: ScanSet) -> None:
    """Raise DataFormatError naming the first scan whose channels or size differ from the model's, that
    holds NaN/Inf, or whose case id another scan has too."""
    check_unique_ids(scans.case_ids, scans.sources[0] if scans.sources else "the scans")
    spec = model_input(model)
    finite = torch.isfinite(scans.images.flatten(1)).all(dim=1)
    for i, case in enumerate(scans.case_ids):
        check_scan(tuple(scans.images.shape[1:]), spec, scans.sources[i], case)
        if not bool(finite[i]):
            bad = int((~torch.isfinite(scans.images[i])).sum())
            raise DataFormatError(scans.sources[i], f"the scan holds {bad} NaN/Inf value(s)", case)


def scans_from_images(paths: Sequence[str | os.PathLike], expect: ModelInput | tuple[int, int, int] | None = None,
                      axis: int | None = None, slices: SliceSpec | None = None) -> ScanSet:
    """Scans from image files (png, jpg, npy, nii/nii.gz; a folder means every image in it), no experts.

    Intensities map to [-1, 1] by the rule `ssb-fast data import-folder` uses, chosen once over all files
    (8/16-bit: full range; floats in a known range keep it; else min..max). The case id is the file name
    without its suffix. A NIfTI volume gives one scan per slice named in `slices` along `axis` (default
    the last), with case ids `<name>_slice<k>`. `expect` (the model's ModelInput, or (C, H, W)) names the
    first file that does not fit the model.
    """
    if isinstance(expect, tuple):
        expect = ModelInput(expect[0], (expect[1], expect[2]))
    axis = DEFAULT_AXIS if axis is None else int(axis)
    if not 0 <= axis < SPATIAL_AXES:
        raise SampleRunError(f"axis must be 0, 1 or 2 (a spatial axis of the volume); got {axis}")
    files = image_files(paths)
    scans: list[tuple[str, Path, np.ndarray]] = []  # (case id, file, (C, H, W) raw pixels)
    ranges: list[tuple[np.dtype, float, float]] = []  # per file: its dtype and finite value range
    volumes: list[VolumeInput] = []
    for f in files:
        case = case_name(f)
        if is_nifti(f):
            nii = read_nifti(f, case)
            first = len(scans)
            if nii.is_volume:
                if slices is None:
                    raise SampleRunError(f"{f} is a 3-D volume {nii.shape} with {nii.n_slices(axis)} slices along "
                                         f"axis {axis}: name the slices to sample with --slices (e.g. --slices "
                                         f"0:{nii.n_slices(axis)} for all of them; --axis picks the axis)")
                picks = slices.indices(nii.n_slices(axis), f, axis)
                width = len(str(nii.n_slices(axis) - 1))
                scans.extend((f"{case}_slice{k:0{width}d}", f, nii.slice_image(axis, k)) for k in picks)
                volumes.append(VolumeInput(nii, case, axis, picks, list(range(first, len(scans)))))
            else:
                scans.append((case, f, nii.image()))
                volumes.append(VolumeInput(nii, case, None, [0], [first]))
            for cid, _, chw in scans[first:]:  # NaN outside the sampled slices does no harm
                check_image_finite(chw, f, cid)
            values = nii.data[np.isfinite(nii.data)] if nii.data.dtype.kind == "f" else nii.data
            ranges.append((nii.data.dtype, *_range(values)))
            nii.release()
        else:
            pictures = file_suffix(f) in (".png", ".jpg", ".jpeg")
            header = peek_array(f, case) if expect is not None else None
            if header is not None:  # a size the model cannot take is refused before the pixels are read
                check_scan(image_to_chw(header, f, case, pictures).shape, expect, f, case, _resize_hint(expect.size))
            chw = image_to_chw(read_array(f, case), f, case, pictures)
            check_image_finite(chw, f, case)
            scans.append((case, f, chw))
            ranges.append((chw.dtype, *_range(chw)))
    if slices is not None and not any(v.axis is not None for v in volumes):
        raise SampleRunError("--slices names slices of 3-D NIfTI volumes, and none of the images is one")
    seen: dict[str, Path] = {}
    cut = {str(v.nifti.path): v for v in volumes if v.axis is not None}
    for case, f, chw in scans:
        if case in seen:  # bad input data (exit 3), not a bad option: the files' names clash
            raise DataFormatError(f, f"two images give the case id {case!r}: {seen[case]} and {f}; rename one",
                                  case)
        seen[case] = f
        if expect is not None:
            volume = cut.get(str(f))
            hint = (f". Slices along axis {axis} of this {volume.nifti.shape} volume are {chw.shape[1]}x"
                    f"{chw.shape[2]}: pick another axis with --axis, or resize the volume"
                    if volume is not None else _resize_hint(expect.size))
            check_scan(tuple(chw.shape), expect, f, case, hint)
        elif chw.shape != scans[0][2].shape:
            raise DataFormatError(f, f"image shape {chw.shape} (C, H, W) differs from {scans[0][1]}'s "
                                     f"{scans[0][2].shape}", case)
    sized = [r for r in ranges if r[1] <= r[2]]
    scaling = choose_scaling({r[0] for r in sized}, min((r[1] for r in sized), default=0.0),
                             max((r[2] for r in sized), default=0.0))
    images = torch.from_numpy(np.stack([scaling.apply(chw) for _, _, chw in scans]))
    n, _, height, width = images.shape
    record = {"kind": "images", "images": [str(f.resolve()) for f in files], "image_scaling": scaling.to_meta()}
    if volumes:
        record["nifti"] = [v.to_dict() for v in volumes]
    return ScanSet(
        images=images, case_ids=[c for c, _, _ in scans], sources=[str(f) for _, f, _ in scans],
        experts=np.zeros((n, 0, height, width), dtype=np.uint8), present=np.zeros((n, 0), dtype=bool),
        input=record, volumes=volumes,
    )


def _range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the values, or (inf, -inf) when there are none."""
    if values.size == 0:
        return float("inf"), float("-inf")
    return float(values.min()), float(values.max())
