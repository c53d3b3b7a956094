"""NIfTI in and out for sampling: scans read with their affine and header, 3-D volumes cut into the 2-D
slices the model takes, and per-pixel maps written back as NIfTI of the input's shape and affine.

nibabel is an optional extra (`pip install 'ssb-fast[nifti]'`); without it every function here raises
an ImportError that says so. A file counts as 2-D when at most two of its three spatial axes have more
than one voxel ((X, Y), (X, Y, 1), ...): it is one scan. Otherwise it is a volume, sampled slice by slice
along one axis, on the slices the user names. A 4-D file (X, Y, Z, C), or 5-D (X, Y, Z, 1, C) as NIfTI
stores vectors, holds C <= 4 channels per voxel. Outputs carry the input's affine, its sform/qform and
voxel spacing; slices that were not sampled are NaN in the float maps and 0 in the masks.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssb_fast.atomic import write_bytes_atomic
from ssb_fast.data.dataset_format import DataFormatError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPATIAL_AXES = 3
MAX_CHANNELS = 4
_SLICE_ITEM = re.compile(r"^\s*(\d*)\s*(?::\s*(\d*)\s*)?$")


def is_nifti(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def require_nibabel(path: str | os.PathLike | None = None):
    """The nibabel module, or an ImportError naming the extra that installs it."""
    try:
        import nibabel
    except ImportError as err:
        where = f"{path}: " if path is not None else ""
        raise ImportError(f"{where}NIfTI files need nibabel, an optional extra: pip install 'ssb-fast[nifti]' "
                          f"(or pip install nibabel)") from err
    return nibabel


@dataclass
class NiftiScan:
    """A NIfTI file as read: `data` (X, Y, Z, C) with the spatial axes padded to three and the channels
    last (None once released), the file's `shape` as stored, its `affine` (4, 4) and `header` (a nibabel
    header). What is needed to write maps back stays after `release()`."""

    path: Path
    data: np.ndarray | None
    shape: tuple[int, ...]
    affine: np.ndarray
    header: object
    grid: tuple[int, int, int] = (0, 0, 0)  # the spatial axes padded to three

    def __post_init__(self):
        if self.data is not None:
            self.grid = tuple(int(n) for n in self.data.shape[:SPATIAL_AXES])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The file's spatial shape as stored (2 or 3 axes): the shape of every map written back."""
        return tuple(self.shape[: min(len(self.shape), SPATIAL_AXES)])

    @property
    def is_volume(self) -> bool:
        """More than one voxel along all three spatial axes: sampled slice by slice."""
        return sum(1 for n in self.grid if n > 1) == SPATIAL_AXES

    def n_slices(self, axis: int) -> int:
        return self.grid[axis]

    def image(self) -> np.ndarray:
        """A 2-D file's pixels as (C, H, W): the spatial axes of one voxel dropped."""
        if self.is_volume:
            raise ValueError(f"{self.path} is a volume; take its slices")
        keep = [n for n in self.grid if n > 1]
        keep = [*keep, *[1] * (2 - len(keep))]
        return np.moveaxis(self.data.reshape(*keep, self.data.shape[-1]), -1, 0)

    def slice_image(self, axis: int, index: int) -> np.ndarray:
        """Slice `index` along spatial `axis` as (C, H, W): the other two spatial axes in file order."""
        return np.moveaxis(np.take(self.data, index, axis=axis), -1, 0)

    def release(self) -> None:
        """Drop the voxels once the scans are cut from them; writing maps back needs only the header."""
        self.data = None


def read_nifti(path: str | os.PathLike, case: str | None = None) -> NiftiScan:
    """Read a NIfTI file; DataFormatError naming it when its header or data are broken or its shape is not
    (X, Y), (X, Y, Z), (X, Y, Z, C) or (X, Y, Z, 1, C)."""
    path = Path(path)
    nib = require_nibabel(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        data = np.asanyarray(img.dataobj)
    except DataFormatError:
        raise
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, ValueError
        raise DataFormatError(path, f"unreadable NIfTI file, its header or data are broken "
                                    f"({type(err).__name__}: {str(err).strip()})", case) from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataFormatError(path, "broken NIfTI header: the affine is not a finite 4x4 matrix", case)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DataFormatError(path, f"NIfTI voxels must be real numbers, found dtype {data.dtype}", case)
    if len(shape) == 2:
        vox = data.reshape(*shape, 1, 1)
    elif len(shape) == 3:
        vox = data.reshape(*shape, 1)
    elif len(shape) == 4:
        vox = data
    elif len(shape) == 5 and shape[3] == 1:
        vox = data.reshape(*shape[:3], shape[4])
    else:
        raise DataFormatError(path, f"NIfTI shape {shape} is not (X, Y), (X, Y, Z), (X, Y, Z, C) or "
                                    f"(X, Y, Z, 1, C)", case)
    if vox.shape[-1] > MAX_CHANNELS:
        raise DataFormatError(path, f"NIfTI shape {shape} has {vox.shape[-1]} values per voxel; at most "
                                    f"{MAX_CHANNELS} channels are supported", case)
    if min(vox.shape) < 1:
        raise DataFormatError(path, f"NIfTI shape {shape} holds no voxels", case)
    return NiftiScan(path=path, data=vox, shape=shape, affine=affine, header=img.header)


# ---- --slices -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceSpec:
    """What --slices names: comma-separated items `a` (one slice) or `a:b` (slices a..b-1, as in Python;
    either end may be left out: `:b` from 0, `a:` to the last)."""

    text: str
    items: tuple[tuple[int, int | None], ...]

    def indices(self, n_slices: int, path, axis: int) -> list[int]:
        """The named slices of a volume with `n_slices` along `axis`, sorted and without repeats;
        DataFormatError naming the file when one lies outside it."""
        chosen: set[int] = set()
        for start, stop in self.items:
            stop = start + 1 if stop == -1 else (n_slices if stop is None else stop)
            if start >= n_slices or stop > n_slices:
                last = max(start, stop - 1)
                raise DataFormatError(path, f"--slices {self.text} reaches slice {last}, outside the volume: "
                                            f"it has {n_slices} slices along axis {axis} (0..{n_slices - 1})")
            chosen.update(range(start, stop))
        return sorted(chosen)


def parse_slices(text: str) -> SliceSpec:
    """Parse --slices; ValueError explaining the syntax when it is not `a`, `a:b` or a comma list of them."""
    items: list[tuple[int, int | None]] = []
    for part in str(text).split(","):
        match = _SLICE_ITEM.match(part)
        if not part.strip() or match is None or (match.group(2) is None and not match.group(1)):
            raise ValueError(f"--slices {text!r}: expected slice numbers like 40, 40:60 (40..59) or "
                             f"10:20,35 (comma-separated), counted from 0")
        start = int(match.group(1)) if match.group(1) else 0
        if match.group(2) is None and ":" not in part:
            items.append((start, -1))  # one slice
            continue
        stop = int(match.group(2)) if match.group(2) else None
        if stop is not None and stop <= start:
            raise ValueError(f"--slices {text!r}: {start}:{stop} is empty (a:b takes slices a..b-1)")
        items.append((start, stop))
    return SliceSpec(text=str(text), items=tuple(items))


# ---- writing maps back ----------------------------------------------------------------------------
def place_slices(scan: NiftiScan, axis: int | None, maps: dict[int, np.ndarray], fill, dtype) -> np.ndarray:
    """A volume of the file's spatial shape holding each 2-D map at its slice along `axis` (all of it for
    a 2-D file, whose one map has key 0) and `fill` elsewhere."""
    spatial = scan.grid
    volume = np.full(spatial, fill, dtype=dtype)
    if not scan.is_volume:
        (only,) = maps.values()
        volume[...] = np.asarray(only, dtype=dtype).reshape(spatial)
    else:
        for index, values in maps.items():
            where = [slice(None)] * SPATIAL_AXES
            where[axis] = index
            volume[tuple(where)] = values
    return volume.reshape(scan.spatial_shape)


def write_nifti_like(path: str | os.PathLike, data: np.ndarray, like: NiftiScan, description: str,
                     value_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """Write `data` (the spatial shape of `like`) as a gzipped NIfTI with `like`'s affine, sform/qform and
    voxel spacing, atomically and byte for byte the same for the same input (gzip time stamp 0)."""
    nib = require_nibabel(path)
    data = np.asarray(data)
    if data.shape != like.spatial_shape:
        raise ValueError(f"{path}: data of shape {data.shape} for a file of spatial shape {like.spatial_shape}")
    header = like.header.copy()
    header.set_data_shape(data.shape)
    zooms = like.header.get_zooms()[: data.ndim]
    header.set_zooms(zooms)
    header.set_intent("none")
    header["cal_min"], header["cal_max"] = value_range
    header["descrip"] = description[:79].encode()
    image = _image_class(nib, like.header)(data, like.affine, header=header)
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    return write_bytes_atomic(path, gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def _image_class(nib, header):
    """Nifti2Image for a NIfTI-2 input, Nifti1Image otherwise."""
    return nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
