"""Read image and mask files (PNG, JPEG, .npy, NIfTI) into numpy arrays, and bring intensities and masks to
the project's conventions, with errors that name the file and the case."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssb_fast.data.dataset_format import DataFormatError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".nii.gz", ".nii")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
JPEG_THRESHOLD = 0.5  # of full scale: 127.5 for 8-bit JPEG masks


class DataWarning(UserWarning):
    """Input that was accepted after a change worth knowing (e.g. JPEG masks thresholded)."""


def file_suffix(path: str | os.PathLike) -> str:
    """The format suffix of `path` (`.nii.gz` counts as one), lower-cased."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def case_name(path: str | os.PathLike) -> str:
    """`path`'s file name without its format suffix."""
    name = Path(path).name
    return name[: len(name) - len(file_suffix(path))]


def read_array(path: str | os.PathLike, case: str | None = None) -> np.ndarray:
    """The pixel array of an image or mask file: (H, W) or (H, W, C) for PNG/JPEG, as stored for .npy and
    NIfTI (trailing length-1 axes dropped)."""
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise DataFormatError(path, f"unknown extension {suffix or '(none)'!r}; expected one of {IMAGE_SUFFIXES}", case)
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as img:
                    img.load()
                    if img.mode in ("LA", "RGBA", "PA"):
                        img = img.convert(img.mode[:-1] if img.mode != "PA" else "P")
                    if img.mode == "CMYK":
                        img = img.convert("RGB")
                    array = np.array(img)
            except UnidentifiedImageError as err:
                raise DataFormatError(path, f"unreadable {suffix} file ({err})", case) from err
            except Image.DecompressionBombError as err:  # a header claiming billions of pixels
                raise DataFormatError(path, f"refused to decode: {err}", case) from None
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            try:
                import nibabel
            except ImportError as err:
                raise ImportError(
                    f"{path}: NIfTI files need nibabel: pip install nibabel (the project's `nifti` extra)"
                ) from err
            try:
                array = np.asanyarray(nibabel.load(str(path)).dataobj)
            except (OSError, ValueError, EOFError):
                raise
            except Exception as err:  # nibabel's ImageFileError, HeaderDataError, ...
                raise DataFormatError(path, f"unreadable {suffix} file ({type(err).__name__}: "
                                            f"{str(err).strip()})", case) from None
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError) as err:
        raise DataFormatError(path, f"unreadable {suffix} file ({type(err).__name__}: {err})", case) from err
    array = np.asarray(array)
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def peek_array(path: str | os.PathLike, case: str | None = None) -> np.ndarray | None:
    """What `read_array` would return, as a read-only array of that shape and dtype that holds no memory
    (every element is one zero), read from the file's header alone; None where the header cannot say
    (NIfTI, a broken file: `read_array` then reports it). Lets a caller refuse a size before reading pixels."""
    path = Path(path)
    suffix = file_suffix(path)
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as img:
                width, height = img.size
                bands = len(img.getbands())
                if img.mode in ("LA", "RGBA", "PA") or img.mode == "CMYK":
                    bands -= 1
                if img.mode == "P":
                    bands = 1
                dtype = {"1": np.bool_, "I;16": np.uint16, "I": np.int32, "F": np.float32}.get(img.mode, np.uint8)
            shape = (height, width) if bands == 1 else (height, width, bands)
        elif suffix == ".npy":
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in readers:
                    return None
                shape, _, dtype = readers[version](fh)
        else:
            return None
    except Exception:  # noqa: BLE001 - any failure here is read_array's to report, with its own message
        return None
    view = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    while view.ndim > 2 and view.shape[-1] == 1:
        view = view[..., 0]
    return view


def image_to_chw(array: np.ndarray, path, case: str, channels_last: bool) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) or (C, H, W) with C <= 4 -> (C, H, W)."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if channels_last and array.shape[-1] <= 4:
            return np.moveaxis(array, -1, 0)
        if array.shape[0] <= 4:
            return array
        if array.shape[-1] <= 4:
            return np.moveaxis(array, -1, 0)
    raise DataFormatError(path, f"image must be 2-D or have at most 4 channels, found shape {array.shape}", case)


def binarise_mask(mask: np.ndarray, path, case: str, threshold: float | None = None, lossy: bool = False) -> np.ndarray:
    """A reader mask as uint8 {0, 1}.

    Without `threshold` the values must already be binary: {0, 1}, or {0, 255} for 8-bit files. With it,
    foreground is value > threshold * full scale (255 for 8-bit, 65535 for 16-bit, 1 otherwise). Lossy
    (JPEG) masks are never exactly binary, so they are always thresholded (at JPEG_THRESHOLD unless told);
    the importer warns about it once per import.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataFormatError(path, f"mask must be 2-D (H, W), found shape {mask.shape}", case)
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not is_real(mask.dtype):
        raise DataFormatError(path, f"mask must be numeric (bool, integers or floats), found dtype {mask.dtype}",
                              case)
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise DataFormatError(path, "mask holds NaN/Inf values", case)
    full = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(mask.dtype, 1.0)
    if lossy and threshold is None:
        threshold = JPEG_THRESHOLD
    if threshold is not None:
        return (mask > threshold * full).astype(np.uint8)
    values = np.unique(mask)
    if np.all(np.isin(values, (0, 1))):
        return mask.astype(np.uint8)
    if full == 255.0 and np.all(np.isin(values, (0, 255))):
        return (mask > 0).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise DataFormatError(
        path,
        f"mask is not binary: expected values 0/1 (or 0/255), found {shown}; pass --threshold to binarise",
        case,
    )


@dataclass(frozen=True)
class IntensityScaling:
    """Maps raw intensities [low, high] linearly onto [-1, 1] (clipping outside); `rule` says why."""

    low: float
    high: float
    rule: str

    def apply(self, image: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(image, dtype=np.float64) - self.low) / (self.high - self.low) * 2.0 - 1.0
        return np.clip(scaled, -1.0, 1.0).astype(np.float32)

    def to_meta(self) -> dict:
        return {"from": [self.low, self.high], "to": [-1.0, 1.0], "rule": self.rule}


def choose_scaling(
    dtypes: set, low: float, high: float, override: tuple[float, float] | None = None
) -> IntensityScaling:
    """One intensity scaling for a whole import, from the images' dtypes and their overall value range.

    8/16-bit integers use their full range. Floats already in a known range keep it: [-0.5, 0.5] (PHiSeg's
    LIDC hdf5), [0, 1], [-1, 1], [0, 255]; anything else is mapped from its own min..max.
    """
    if override is not None:
        lo, hi = override
        if not hi > lo:
            raise ValueError(f"--image-range needs LOW < HIGH, got {lo}, {hi}")
        return IntensityScaling(float(lo), float(hi), "given")
    kinds = {np.dtype(d) for d in dtypes}
    if kinds and kinds <= {np.dtype(np.uint8)}:
        return IntensityScaling(0.0, 255.0, "8-bit")
    if kinds and kinds <= {np.dtype(np.uint8), np.dtype(np.uint16)}:
        return IntensityScaling(0.0, 65535.0 if np.dtype(np.uint16) in kinds else 255.0, "16-bit")
    # Floats already in a conventional range keep it (a negative minimum tells the signed ranges apart).
    ranges = (
        ((-0.5, 0.5, "[-0.5, 0.5]"), (-1.0, 1.0, "[-1, 1]"))
        if low < 0
        else ((0.0, 1.0, "[0, 1]"), (0.0, 255.0, "[0, 255]"))
    )
    for lo, hi, rule in ranges:
        if low >= lo and high <= hi:
            return IntensityScaling(lo, hi, f"values within {rule}")
    if high > low:
        return IntensityScaling(float(low), float(high), "min..max of the data")
    return IntensityScaling(float(low) - 1.0, float(low) + 1.0, "constant data")


def is_real(dtype) -> bool:
    """Integers and floats (not bool, complex, strings, objects or times)."""
    return np.dtype(dtype).kind in "iuf"


def check_image_finite(image: np.ndarray, path, case: str) -> None:
    if not is_real(image.dtype):
        raise DataFormatError(path, f"image must hold real numbers (integers or floats), found dtype "
                                    f"{image.dtype}", case)
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise DataFormatError(path, f"image holds {bad} NaN/Inf value(s)", case)
