"""The samples file: sampled masks of many scans next to their experts' masks, in one .npz.

`ssb-fast sample` writes it and `ssb-fast evaluate` reads it. A samples folder holds `samples.npz`:

    samples   uint8 (B, N, H, W) in {0, 1}   N sampled masks per scan
    experts   uint8 (B, M, H, W) in {0, 1}   the M annotators' masks (zeros where missing)
    present   bool  (B, M)                   which annotators exist for each scan
    case_ids  str   (B,)                     scan identifiers

Scans sampled from image files have no experts: M = 0, `experts` (B, 0, H, W) and `present` (B, 0).
Such a file reads fine, but has nothing to score against. `ssb-fast sample` also stores `labels`
(B, N), the expert label each mask was drawn with, and with --soft `soft` (B, N, H, W) float16.

Any .npz with `samples` and `experts` is read too (`present` defaults to all True, `case_ids` to
scan0, scan1, ...; 3-D arrays are one scan). Nothing is unpickled. Writes are atomic, and the same
arrays give the same bytes.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssb_fast.atomic import write_atomic

SAMPLES_FILE = "samples.npz"


class SamplesFormatError(ValueError):
    """A samples file that is missing, unreadable or not in the format above; the message names the file."""


@dataclass
class SampleSet:
    """Masks of B scans: `samples` (B, N, H, W) and `experts` (B, M, H, W) uint8, `present` (B, M) bool."""

    samples: np.ndarray
    experts: np.ndarray
    present: np.ndarray
    case_ids: list[str]
    path: Path | None = None

    @property
    def n_scans(self) -> int:
        return self.samples.shape[0]

    @property
    def has_experts(self) -> bool:
        """False for masks sampled from image files (M = 0): there is nothing to score them against."""
        return self.experts.shape[1] > 0


def resolve_samples_path(path: str | os.PathLike) -> Path:
    """A samples folder means its `samples.npz`; a file is taken as it is."""
    p = Path(path)
    return p / SAMPLES_FILE if p.is_dir() else p


def _binary_uint8(arr: np.ndarray, key: str, where: Path | str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise SamplesFormatError(f"{where}: '{key}' must hold 0/1 mask values (uint8 or bool); "
                                 f"got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise SamplesFormatError(f"{where}: '{key}' must be binary (0/1); found {arr[idx]} at index {idx}")
    if arr.dtype != np.bool_ and arr.size:
        if arr.dtype.kind == "f":
            ok = bool(((arr == 0) | (arr == 1)).all())
        else:  # integers: two reductions instead of a full boolean pass
            ok = arr.min() >= 0 and arr.max() <= 1
        if not ok:
            idx = tuple(int(i) for i in np.argwhere((arr != 0) & (arr != 1))[0])
            raise SamplesFormatError(f"{where}: '{key}' must be binary (0/1); "
                                     f"found value {arr[idx]} at index {idx}")
    return arr.astype(np.uint8, copy=False)


def _validate(samples, experts, present, case_ids, where: Path | str) -> SampleSet:
    samples, experts = np.asarray(samples), np.asarray(experts)
    if samples.ndim not in (3, 4):
        raise SamplesFormatError(f"{where}: 'samples' must be (B, N, H, W) (or (N, H, W) for one scan); "
                                 f"got shape {samples.shape}")
    if experts.ndim != samples.ndim:
        raise SamplesFormatError(f"{where}: 'experts' must have as many dimensions as 'samples' "
                                 f"{samples.shape}; got shape {experts.shape}")
    if samples.ndim == 3:
        samples, experts = samples[None], experts[None]
        if present is not None and np.ndim(present) == 1:
            present = np.asarray(present)[None]
    batch, n = samples.shape[:2]
    m = experts.shape[1]
    if experts.shape[0] != batch or experts.shape[2:] != samples.shape[2:]:
        want = f"(B={batch}, M, H={samples.shape[2]}, W={samples.shape[3]})"
        raise SamplesFormatError(f"{where}: 'experts' {experts.shape} does not match 'samples' "
                                 f"{samples.shape}: expected {want}")
    if n == 0:
        raise SamplesFormatError(f"{where}: every scan needs at least one sample; got N = 0")
    samples = _binary_uint8(samples, "samples", where)
    experts = _binary_uint8(experts, "experts", where)
    if present is None:
        present = np.ones((batch, m), dtype=bool)
    else:
        present = np.asarray(present)
        if present.shape != (batch, m):
            raise SamplesFormatError(f"{where}: 'present' must be (B, M) = ({batch}, {m}); "
                                     f"got shape {present.shape}")
        if present.dtype != np.bool_:
            present = _binary_uint8(present, "present", where).astype(bool)
        missing = ~present.any(axis=1)
        if m > 0 and missing.any():  # M = 0 (no experts at all) is allowed; a scan without any of M is not
            raise SamplesFormatError(f"{where}: scan {int(np.argmax(missing))} has no present expert "
                                     f"('present' is all False there)")
    if case_ids is None:
        case_ids = [f"scan{i}" for i in range(batch)]
    else:
        case_ids = np.asarray(case_ids)
        if case_ids.dtype.kind not in "US" or case_ids.shape != (batch,):
            raise SamplesFormatError(f"{where}: 'case_ids' must be {batch} strings; "
                                     f"got dtype {case_ids.dtype}, shape {case_ids.shape}")
        case_ids = [str(c) for c in case_ids.tolist()]
    return SampleSet(samples=samples, experts=experts, present=present, case_ids=case_ids,
                     path=where if isinstance(where, Path) else None)


def read_samples_npz(path: str | os.PathLike) -> SampleSet:
    """Read a samples folder (its samples.npz) or an .npz file; errors name the file and what is wrong."""
    file = resolve_samples_path(path)
    if not file.exists():
        hint = f" (a samples folder must hold {SAMPLES_FILE})" if Path(path).is_dir() else ""
        raise SamplesFormatError(f"{file}: no such file{hint}")
    if not zipfile.is_zipfile(file):
        raise SamplesFormatError(f"{file}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(file, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("samples", "experts") if k not in keys]
            if missing:
                raise SamplesFormatError(f"{file}: missing array(s) {', '.join(missing)}; found "
                                         f"{', '.join(sorted(keys)) or 'none'} (expected samples, experts, "
                                         f"and optionally present, case_ids)")
            arrays = {k: data[k] for k in ("samples", "experts", "present", "case_ids") if k in keys}
    except SamplesFormatError:
        raise
    except ValueError as err:  # object arrays would need pickle
        raise SamplesFormatError(f"{file}: cannot read without unpickling ({err}); store masks as uint8 "
                                 f"and case_ids as a numpy string array") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise SamplesFormatError(f"{file}: not a readable .npz file ({err})") from err
    return _validate(arrays["samples"], arrays["experts"], arrays.get("present"), arrays.get("case_ids"),
                     file)


def write_samples_npz(path: str | os.PathLike, samples, experts, present=None, case_ids=None,
                      compress: bool = True, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write a samples file atomically (temp file + os.replace) and return its path.

    `path` is a folder (created if needed; the file is its samples.npz) or a file name ending in .npz.
    Masks are validated (0/1, matching shapes, every scan with a present expert unless M = 0) before
    anything is written. `extra` arrays (e.g. `labels`, `soft`) are stored beside them, one row per scan.
    """
    p = Path(path)
    file = p if p.suffix == ".npz" else p / SAMPLES_FILE
    sample_set = _validate(samples, experts, present, case_ids, file)
    extra = {name: np.asarray(arr) for name, arr in (extra or {}).items()}
    for name, arr in extra.items():
        if name in ("samples", "experts", "present", "case_ids"):
            raise ValueError(f"{file}: extra array {name!r} would replace a required array")
        if arr.dtype.kind not in "biuf" or arr.ndim == 0 or arr.shape[0] != sample_set.n_scans:
            raise SamplesFormatError(f"{file}: extra array {name!r} must be numeric with one row per scan "
                                     f"({sample_set.n_scans}); got dtype {arr.dtype}, shape {arr.shape}")
    arrays = {"samples": sample_set.samples, "experts": sample_set.experts, "present": sample_set.present,
              "case_ids": np.asarray(sample_set.case_ids, dtype=str), **extra}
    return write_atomic(file, lambda fh: save_npz(fh, arrays, compress))


def save_npz(fh, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """What np.savez(_compressed) writes, with every member's time stamp fixed (1980-01-01), so that the
    same arrays always give the same bytes (np.savez stamps the current time). Nothing is pickled."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(fh, mode="w", compression=method, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
