"""`load(path, split)`: a dataset folder or split file as a torch `Dataset` of multi-reader cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssb_fast.data.dataset_format import SPLITS, DataFormatError, read_meta, read_split


class SegmentationDataset(Dataset):
    """Cases with up to `n_raters` reader masks each, held in memory.

    Item i is `{"image": float32 (C,H,W) in [-1,1], "masks": uint8 (M,H,W), "present": bool (M,),
    "case_id": str}`; `present[k]` says whether reader slot k holds a real annotation. The whole split is
    also available as tensors (`images`, `masks`, `present`) for code that batches on its own.
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None, source: str | None = None):
        self.images = torch.from_numpy(arrays["images"])
        self.masks = torch.from_numpy(arrays["masks"])
        self.present = torch.from_numpy(arrays["present"])
        self.case_ids: list[str] = [str(c) for c in arrays["case_ids"].tolist()]
        self.patient_ids: list[str] | None = (
            [str(p) for p in arrays["patient_ids"].tolist()] if "patient_ids" in arrays else None
        )
        self.meta = dict(meta or {})
        self.source = source
        self.n_raters = int(self.masks.shape[1])
        self.image_channels = int(self.images.shape[1])
        self.image_size = (int(self.images.shape[2]), int(self.images.shape[3]))

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict:
        # Clones are cheap at these sizes and keep a caller's in-place edits from reaching the dataset.
        return {
            "image": self.images[index].clone(),
            "masks": self.masks[index].clone(),
            "present": self.present[index].clone(),
            "case_id": self.case_ids[index],
        }

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"SegmentationDataset({len(self)} cases, {self.image_channels}x{h}x{w}, {self.n_raters} readers, "
            f"source={self.source!r})"
        )


def load(path: str | os.PathLike, split: str = "train") -> SegmentationDataset:
    """Load split `split` of a dataset folder (`<split>.npz` + `meta.json`), or one split `.npz` file.

    Raises DataFormatError (a ValueError) naming the file and case when the data break the format.
    """
    path = Path(path)
    if path.is_dir():
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        file = path / f"{split}.npz"
        meta = read_meta(path)
    elif path.suffix == ".npz":
        file = path
        meta = read_meta(path.parent)
    elif not path.exists():
        raise DataFormatError(path, "no such dataset folder or split file")
    else:
        raise DataFormatError(path, f"expected a dataset folder or a split .npz file, found {path.suffix!r}")
    return SegmentationDataset(read_split(file), meta, source=str(file))
