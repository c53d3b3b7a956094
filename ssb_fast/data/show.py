"""What a dataset holds: counts, readers per case, how much the readers disagree, and a PNG montage of cases
with all their reader masks."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from ssb_fast.data.dataset import SegmentationDataset
from ssb_fast.render import CAPTION, READER_COLOURS, TEXT, grey_rgb, heat, new_canvas, overlay, paste_tiles


def pairwise_iou_distance(masks: np.ndarray) -> np.ndarray:
    """d = 1 - IoU between every pair of reader masks of each case: (N, M, H, W) -> (N, M, M), with
    IoU(empty, empty) = 1 so that two readers who both drew nothing agree."""
    n, m = masks.shape[:2]
    flat = masks.reshape(n, m, -1).astype(np.float32)
    inter = np.matmul(flat, flat.transpose(0, 2, 1))
    area = np.diagonal(inter, axis1=1, axis2=2)
    union = area[:, :, None] + area[:, None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)
    return 1.0 - iou


def reader_statistics(masks: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
    """Per-case inter-reader disagreement over the readers present (d = 1 - IoU, IoU(empty, empty) = 1).

    - `ged_reader_term`: E d(Y, Y') over ordered reader pairs, i = j included: the readers' own term of
      the squared generalised energy distance D^2_GED = 2 E d(S, Y) - E d(S, S') - E d(Y, Y').
    - `ged_reader_vs_rest`: D^2_GED of one reader (as a one-sample prediction) against the other readers,
      averaged over readers: the score of a model that draws exactly like a single reader.
    - `mean_pairwise_distance`: mean d over reader pairs i < j.
    The last two are NaN for cases with fewer than two readers present.
    """
    masks = np.asarray(masks)
    valid = np.asarray(present, dtype=bool)
    d = pairwise_iou_distance(masks).astype(np.float64)
    pair = valid[:, :, None] & valid[:, None, :]
    m = valid.sum(1).astype(np.float64)
    total = (d * pair).sum((1, 2))
    ged_term = total / np.maximum(m**2, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pairwise = np.where(m >= 2, total / (m * (m - 1)), np.nan)
        # Reader k against the rest R = present \ {k}:
        # 2 mean_{j in R} d(k, j) - 0 - mean_{j, j' in R} d(j, j').
        row = (d * pair).sum(2)  # sum over j of d(k, j), j present (d(k, k) = 0)
        rest_pairs = total[:, None] - 2.0 * row  # sum over j, j' in R
        vs_rest = 2.0 * row / (m[:, None] - 1) - rest_pairs / (m[:, None] - 1) ** 2
        vs_rest = np.where(valid, vs_rest, 0.0).sum(1) / np.maximum(m, 1.0)
        vs_rest = np.where(m >= 2, vs_rest, np.nan)
    return {
        "readers_present": m.astype(np.int64),
        "non_empty": (masks.reshape(*masks.shape[:2], -1).any(-1) & valid).sum(1),
        "ged_reader_term": ged_term,
        "ged_reader_vs_rest": vs_rest,
        "mean_pairwise_distance": pairwise,
    }


def dataset_summary(datasets: dict[str, SegmentationDataset]) -> dict:
    """Counts and inter-reader statistics of each split (`datasets`: split name -> dataset)."""
    out: dict = {}
    for name, ds in datasets.items():
        masks, present = ds.masks.numpy(), ds.present.numpy()
        stats = reader_statistics(masks, present) if len(ds) else None
        entry = {
            "cases": len(ds),
            "image": [ds.image_channels, *ds.image_size],
            "reader_slots": ds.n_raters,
        }
        if stats is not None:
            multi = stats["readers_present"] >= 2
            area = masks.reshape(*masks.shape[:2], -1).sum(-1)
            entry.update(
                {
                    "cases_by_readers_present": _histogram(stats["readers_present"], ds.n_raters),
                    "cases_by_non_empty_masks": _histogram(stats["non_empty"], ds.n_raters),
                    "empty_mask_fraction": round(float(((area == 0) & present).sum() / max(present.sum(), 1)), 4),
                    "mean_mask_area_px": round(float(area[(area > 0) & present].mean()), 1)
                    if ((area > 0) & present).any()
                    else 0.0,
                    "ged_reader_term": round(float(stats["ged_reader_term"].mean()), 4),
                    "ged_reader_vs_rest": round(float(np.nanmean(stats["ged_reader_vs_rest"])), 4)
                    if multi.any()
                    else None,
                    "mean_pairwise_1_minus_iou": round(float(np.nanmean(stats["mean_pairwise_distance"])), 4)
                    if multi.any()
                    else None,
                    "cases_with_2plus_readers": int(multi.sum()),
                }
            )
        if ds.patient_ids is not None:
            entry["patients"] = len(set(ds.patient_ids))
        out[name] = entry
    return out


def _histogram(values: np.ndarray, top: int) -> dict[str, int]:
    counts = Counter(int(v) for v in values)
    return {str(k): counts.get(k, 0) for k in range(0, top + 1)}


def montage(dataset: SegmentationDataset, out_png: str | os.PathLike, n_cases: int = 12, tile: int = 128) -> Path:
    """Write a PNG grid: one row per case (image, each reader's mask over the image, the readers' mean),
    rows picked evenly through the split; absent readers are marked. Returns the path."""
    if len(dataset) == 0:
        raise ValueError("the split has no cases to show")
    n_rows = min(n_cases, len(dataset))
    picks = np.unique(np.linspace(0, len(dataset) - 1, n_rows).round().astype(int))
    h, w = dataset.image_size
    scale = max(1, tile // max(h, w))
    th, tw = h * scale, w * scale
    m = dataset.n_raters
    header, gap = 18, 2
    canvas, draw, font = new_canvas((m + 2) * (tw + gap), header + len(picks) * (th + gap))
    titles = ["image"] + [f"reader {k + 1}" for k in range(m)] + ["reader mean"]
    for c, title in enumerate(titles):
        draw.text((c * (tw + gap) + 3, 3), title, fill=TEXT, font=font)
    for r, idx in enumerate(picks):
        item = dataset[int(idx)]
        grey = grey_rgb(item["image"].numpy())
        masks = item["masks"].numpy().astype(bool)
        present = item["present"].numpy()
        y = header + r * (th + gap)
        tiles = [grey] + [overlay(grey, masks[k], READER_COLOURS[k % len(READER_COLOURS)]) if present[k] else None
                          for k in range(m)]
        tiles.append(heat(masks[present].mean(0) if present.any() else np.zeros((h, w))))
        paste_tiles(canvas, draw, font, tiles, y, tw, th, gap)
        # The case id may run on into the first reader's tile: ids are often longer than one tile is wide.
        draw.text((3, y + th - 12), item["case_id"][: max(8, 2 * tw // 6)], fill=CAPTION, font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png
