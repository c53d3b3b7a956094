"""The project dataset format: write/read round trip, the loader's items, validation and atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssb_fast.data import DataFormatError, load, read_split, split_by_group, write_dataset


def _split(n: int, m: int = 3, size: int = 8, seed: int = 0, prefix: str = "c") -> dict:
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, m, size, size)) > 0.6).astype(np.uint8)
    present = np.ones((n, m), dtype=bool)
    present[0, -1] = False
    return {
        "images": rng.uniform(-1, 1, (n, 2, size, size)).astype(np.float32),
        "masks": masks,
        "present": present,
        "case_ids": [f"{prefix}{i}" for i in range(n)],
        "patient_ids": [f"p{i // 2}" for i in range(n)],
    }


def test_round_trip_and_items(tmp_path):
    splits = {"train": _split(5, prefix="a"), "val": _split(2, prefix="b"), "test": _split(3, prefix="c")}
    write_dataset(tmp_path, splits, {"name": "toy", "source": "test"})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == "ssb-fast-dataset" and meta["name"] == "toy"
    assert meta["image_channels"] == 2 and meta["image_size"] == [8, 8] and meta["n_raters"] == 3
    assert meta["splits"]["train"]["n_cases"] == 5
    assert meta["splits"]["train"]["n_reader_masks"] == 5 * 3 - 1

    ds = load(tmp_path, "train")
    assert len(ds) == 5 and ds.n_raters == 3 and ds.image_channels == 2 and ds.image_size == (8, 8)
    assert ds.case_ids == ["a0", "a1", "a2", "a3", "a4"] and ds.meta["name"] == "toy"
    item = ds[1]
    assert set(item) == {"image", "masks", "present", "case_id"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, 8, 8)
    assert item["masks"].dtype == torch.uint8 and item["masks"].shape == (3, 8, 8)
    assert item["present"].dtype == torch.bool and item["case_id"] == "a1"
    np.testing.assert_array_equal(item["image"].numpy(), splits["train"]["images"][1])
    np.testing.assert_array_equal(item["masks"].numpy(), splits["train"]["masks"][1])
    assert not ds[0]["present"][-1]
    # Items are copies: editing one does not change the dataset.
    item["masks"].fill_(1)
    assert ds[1]["masks"].sum() == splits["train"]["masks"][1].sum()
    # A single split file loads on its own, with the folder's meta.
    single = load(tmp_path / "test.npz")
    assert single.case_ids == ["c0", "c1", "c2"] and single.meta["name"] == "toy"
    assert single.patient_ids == ["p0", "p0", "p1"]


def test_empty_split_is_allowed(tmp_path):
    empty = {
        "images": np.zeros((0, 1, 4, 4), np.float32),
        "masks": np.zeros((0, 2, 4, 4), np.uint8),
        "present": np.zeros((0, 2), bool),
        "case_ids": [],
    }
    full = _split(2, m=2, size=4)
    full["images"] = full["images"][:, :1]
    write_dataset(tmp_path, {"train": full, "val": empty, "test": empty}, {})
    assert len(load(tmp_path, "val")) == 0 and len(load(tmp_path, "train")) == 2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["masks"].__setitem__((1, 0, 0, 0), 2), "binary"),
        (lambda s: s["images"].__setitem__((1, 0, 0, 0), np.nan), "NaN/Inf"),
        (lambda s: s["images"].__setitem__((1, 0, 0, 0), 1.5), "[-1, 1]"),
        (lambda s: s["present"].__setitem__((1, slice(None)), False), "zero reader masks"),
    ],
)
def test_write_refuses_bad_cases_naming_the_case(tmp_path, corrupt, message):
    split = _split(3)
    corrupt(split)
    with pytest.raises(DataFormatError) as err:
        write_dataset(tmp_path, {"train": split}, {})
    assert message in str(err.value) and "'c1'" in str(err.value) and "train.npz" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_write_refuses_shape_mismatch(tmp_path):
    split = _split(2)
    split["masks"] = split["masks"][:, :, :7, :]
    with pytest.raises(DataFormatError, match="image and mask shapes differ"):
        write_dataset(tmp_path, {"train": split}, {})


def test_read_split_names_file_and_case(tmp_path):
    good = _split(3)
    np.savez(
        tmp_path / "train.npz",
        **{**good, "case_ids": np.array(good["case_ids"]), "patient_ids": np.array(good["patient_ids"])},
    )
    assert read_split(tmp_path / "train.npz")["images"].shape == (3, 2, 8, 8)
    bad = dict(good)
    bad["masks"] = good["masks"].copy()
    bad["masks"][2, 1, 3, 3] = 255
    np.savez(
        tmp_path / "bad.npz",
        **{**bad, "case_ids": np.array(good["case_ids"]), "patient_ids": np.array(good["patient_ids"])},
    )
    with pytest.raises(DataFormatError, match=r"bad\.npz: case 'c2': masks are not binary"):
        read_split(tmp_path / "bad.npz")
    np.savez(tmp_path / "missing.npz", images=good["images"])
    with pytest.raises(DataFormatError, match="missing arrays"):
        read_split(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataFormatError, match="unreadable split file"):
        read_split(tmp_path / "garbage.npz")
    with pytest.raises(DataFormatError, match="no such dataset"):
        load(tmp_path / "nowhere")


def test_failed_write_keeps_existing_dataset(tmp_path):
    write_dataset(tmp_path, {"train": _split(2)}, {"name": "old"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    split = _split(2)
    split["images"][0, 0, 0, 0] = np.inf
    with pytest.raises(DataFormatError):
        write_dataset(tmp_path, {"train": split}, {"name": "new"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_split_by_group_keeps_groups_whole_and_is_seeded():
    groups = [f"patient{i % 40}" for i in range(200)]
    parts = split_by_group(groups, seed=3)
    assert sorted(i for idx in parts.values() for i in idx) == list(range(200))
    owners = {name: {groups[i] for i in idx} for name, idx in parts.items()}
    assert not (owners["train"] & owners["val"]) and not (owners["train"] & owners["test"])
    assert not (owners["val"] & owners["test"])
    assert [len(owners[s]) for s in ("train", "val", "test")] == [28, 6, 6]
    assert split_by_group(groups, seed=3) == parts
    assert split_by_group(groups, seed=4) != parts
    with pytest.raises(ValueError, match="sum"):
        split_by_group(groups, fractions=(0.5, 0.2, 0.2))
