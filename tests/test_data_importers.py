"""Importers: round trips through small files the tests write, the restricted unpickler, and every kind of
bad input (exit code 3, the file and the case named, nothing left half-written)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.cli import app
from ssb_fast.data import (
    DataFormatError,
    DataWarning,
    import_folder,
    import_lidc_pickle,
    load,
    safe_load_pickle,
)

runner = CliRunner()
REAL_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-crops-28"


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _cases(n: int = 3, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    masks = (rng.random((n, 3, size, size)) > 0.7).astype(np.uint8)
    return images, masks


def _standard_folder(root: Path, images, masks, ext: str = ".png", skip=()) -> None:
    for i, image in enumerate(images):
        _png(root / "images" / f"case{i}{'.png'}", image)
        for k in range(masks.shape[1]):
            if (i, k) in skip:
                continue
            target = root / "masks" / f"case{i}_r{k}{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if ext == ".png":
                _png(target, masks[i, k] * 255)
            else:
                np.save(target, masks[i, k].astype(bool))


def _all_cases(out: Path) -> dict:
    found = {}
    for split in ("train", "val", "test"):
        ds = load(out, split)
        for i, cid in enumerate(ds.case_ids):
            found[cid] = (ds.images[i].numpy(), ds.masks[i].numpy(), ds.present[i].numpy(), split)
    return found


def test_folder_round_trip_png_and_npy(tmp_path):
    images, masks = _cases(6)
    _standard_folder(tmp_path / "png", images, masks, skip={(2, 1)})
    meta = import_folder(tmp_path / "png", tmp_path / "out", split="test")
    assert meta["image_scaling"]["rule"] == "8-bit" and meta["reader_slots"] == ["0", "1", "2"]
    got = _all_cases(tmp_path / "out")
    assert set(got) == {f"case{i}" for i in range(6)} and {v[3] for v in got.values()} == {"test"}
    for i in range(6):
        image, mask, present, _ = got[f"case{i}"]
        np.testing.assert_allclose(image[0], images[i] / 127.5 - 1.0, atol=1e-6)
        expected_present = np.array([True, (i, 1) != (2, 1), True])
        np.testing.assert_array_equal(present, expected_present)
        np.testing.assert_array_equal(mask[expected_present], masks[i][expected_present])
        assert not mask[~expected_present].any()

    _standard_folder(tmp_path / "npy", images, masks, ext=".npy")
    import_folder(tmp_path / "npy", tmp_path / "out_npy", seed=1)
    got = _all_cases(tmp_path / "out_npy")
    assert len({v[3] for v in got.values()}) >= 2  # split 70/15/15 by case
    np.testing.assert_array_equal(got["case4"][1], masks[4])


def test_folder_float_npy_images_and_split_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for i in range(n):
            (tmp_path / "src" / split / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / split / "masks").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "src" / split / "images" / f"{split}{i}.npy", rng.random((12, 12)))
            np.save(tmp_path / "src" / split / "masks" / f"{split}{i}_r1.npy", np.eye(12, dtype=np.uint8))
    meta = import_folder(tmp_path / "src", tmp_path / "out")
    assert meta["split_rule"] == "the source's own split folders"
    assert meta["image_scaling"]["rule"] == "values within [0, 1]"
    assert {s: meta["splits"][s]["n_cases"] for s in ("train", "val", "test")} == {
        "train": 3,
        "val": 1,
        "test": 2,
    }
    got = _all_cases(tmp_path / "out")
    assert got["val0"][3] == "val" and got["val0"][1].shape == (1, 12, 12)


def test_folder_nifti_round_trip(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    images, masks = _cases(2, size=10)
    for i in range(2):
        for folder, name, array in (
            ("images", f"ct{i}", images[i].astype(np.int16) * 4 - 500),
            ("masks", f"ct{i}_r0", masks[i, 0]),
            ("masks", f"ct{i}_r1", masks[i, 1]),
        ):
            (tmp_path / "src" / folder).mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(tmp_path / "src" / folder / f"{name}.nii.gz"))
    meta = import_folder(tmp_path / "src", tmp_path / "out", split="train", image_range=(-500.0, 520.0))
    assert meta["image_scaling"] == {"from": [-500.0, 520.0], "to": [-1.0, 1.0], "rule": "given"}
    ds = load(tmp_path / "out", "train")
    np.testing.assert_array_equal(ds.masks[0, :2].numpy(), masks[0, :2])
    np.testing.assert_allclose(ds.images[1, 0].numpy(), (images[1] * 4.0 - 500 + 500) / 1020 * 2 - 1, atol=1e-5)


def test_jpeg_masks_are_thresholded_with_a_warning(tmp_path):
    images, masks = _cases(2, size=32)
    for i in range(2):
        case = tmp_path / "src" / "training" / f"{i}"
        _png(case / f"image_{i + 1}.jpg", images[i])
        for k in range(3):
            big = np.zeros((32, 32), np.uint8)
            big[8:20, 6 : 18 + k] = 255  # blocks survive JPEG; their edges ring
            _png(case / f"label{k}_.jpg", big)
    with pytest.warns(DataWarning, match="thresholded at 0.5"):
        meta = import_folder(tmp_path / "src", tmp_path / "out")
    assert meta["layout"] == "cimd" and meta["jpeg_masks_thresholded"]
    ds = load(tmp_path / "out", "train")
    assert ds.case_ids == ["training-0", "training-1"]
    assert set(np.unique(ds.masks.numpy())) == {0, 1}
    assert abs(int(ds.masks[0, 2].sum()) - 12 * 14) <= 4
    result = runner.invoke(app, ["data", "import-folder", str(tmp_path / "src"), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "warning: 6 JPEG mask(s) in 2 case(s)" in result.output


@pytest.mark.skipif(not REAL_CROPS.is_dir(), reason="the real LIDC crops folder is not beside the project")
def test_real_lidc_crops_import(tmp_path):
    with pytest.warns(DataWarning):
        meta = import_folder(REAL_CROPS, tmp_path / "crops")
    assert meta["splits"]["train"]["n_cases"] == 19 and meta["splits"]["test"]["n_cases"] == 9
    ds = load(tmp_path / "crops", "test")
    assert ds.image_size == (128, 128) and ds.n_raters == 4 and "testing-12" in ds.case_ids
    # Case 12: only the fourth reader marked the nodule (15 pixels above 127 in its JPEG).
    masks = ds.masks[ds.case_ids.index("testing-12")].numpy()
    assert masks[:3].sum() == 0 and masks[3].sum() == 15


def _pickle_records(n: int = 8, size: int = 16):
    rng = np.random.default_rng(3)
    return {
        f"LIDC-{i:03d}.png": {
            "image": rng.random((size, size)).astype(np.float32),
            "masks": [(rng.random((size, size)) > 0.8).astype(np.uint8) for _ in range(4)],
            "series_uid": f"1.2.3.{i // 2}",
        }
        for i in range(n)
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(tmp_path, protocol):
    records = _pickle_records()
    (tmp_path / "crops.pickle").write_bytes(pickle.dumps(records, protocol=protocol))
    meta = import_lidc_pickle(tmp_path / "crops.pickle", tmp_path / "out", seed=0)
    assert meta["image_scaling"]["rule"] == "values within [0, 1]" and meta["counts"]["patients"] == 4
    got = _all_cases(tmp_path / "out")
    assert set(got) == set(records)
    for key, record in records.items():
        image, masks, present, split = got[key]
        np.testing.assert_allclose(image[0], record["image"] * 2 - 1, atol=1e-6)
        np.testing.assert_array_equal(masks, np.stack(record["masks"]))
        assert present.all()
    series_split = {}
    for key, record in records.items():  # whole series per split
        assert series_split.setdefault(record["series_uid"], got[key][3]) == got[key][3]


class _MakesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    records = _pickle_records(2)
    records["LIDC-000.png"]["image"] = _MakesAFile(marker)
    payload = pickle.dumps(records)
    # The payload is live: an ordinary unpickler creates the file.
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(_MakesAFile(control)))
    assert control.exists()
    assert not marker.exists()
    (tmp_path / "evil.pickle").write_bytes(payload)
    with pytest.raises(DataFormatError, match=r"evil\.pickle: pickle refers to io\.open.*refused without running it"):
        safe_load_pickle(tmp_path / "evil.pickle")
    assert not marker.exists()
    result = runner.invoke(
        app, ["data", "import-lidc-pickle", str(tmp_path / "evil.pickle"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 3 and "io.open" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()
    # Types outside the allowed set are refused too: by global name (protocol 2 rebuilds a set by calling
    # __builtin__.set) or, where an opcode builds them without a global, by the check of what was loaded.
    (tmp_path / "set2.pickle").write_bytes(pickle.dumps({"a": {1, 2}}, protocol=2))
    with pytest.raises(DataFormatError, match="refers to __builtin__.set"):
        safe_load_pickle(tmp_path / "set2.pickle")
    (tmp_path / "set5.pickle").write_bytes(pickle.dumps({"a": {1, 2}}, protocol=5))
    with pytest.raises(DataFormatError, match=r"set at top level\['a'\]"):
        safe_load_pickle(tmp_path / "set5.pickle")


def test_pickle_bad_records(tmp_path):
    records = _pickle_records(3)
    del records["LIDC-001.png"]["masks"]
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps(records))
    with pytest.raises(DataFormatError, match=r"case 'LIDC-001\.png': case record lacks \['masks'\]"):
        import_lidc_pickle(tmp_path / "bad.pickle", tmp_path / "out")
    (tmp_path / "cut.pickle").write_bytes(pickle.dumps(_pickle_records(3))[:200])
    with pytest.raises(DataFormatError, match="not a readable pickle"):
        safe_load_pickle(tmp_path / "cut.pickle")


@pytest.mark.parametrize("channels_last", [True, False])
def test_hdf5_round_trip(tmp_path, channels_last):
    h5py = pytest.importorskip("h5py")
    from ssb_fast.data import import_lidc_hdf5

    rng = np.random.default_rng(4)
    written = {}
    with h5py.File(tmp_path / "lidc.hdf5", "w") as f:
        for split, n in (("train", 5), ("val", 2), ("test", 3)):
            images = rng.random((n, 16, 16)) - 0.5  # PHiSeg stores image - 0.5
            labels = (rng.random((n, 4, 16, 16)) > 0.7).astype(np.uint8)
            g = f.create_group(split)
            g.create_dataset("images", data=images)
            g.create_dataset("labels", data=np.moveaxis(labels, 1, -1) if channels_last else labels)
            g.create_dataset("uids", data=np.arange(n) // 2)
            written[split] = (images, labels)
    meta = import_lidc_hdf5(tmp_path / "lidc.hdf5", tmp_path / "out")
    assert meta["image_scaling"]["rule"] == "values within [-0.5, 0.5]"
    for split, (images, labels) in written.items():
        ds = load(tmp_path / "out", split)
        assert len(ds) == len(images) and ds.case_ids[0] == f"{split}_00000"
        np.testing.assert_allclose(ds.images[:, 0].numpy(), images * 2, atol=1e-6)
        np.testing.assert_array_equal(ds.masks.numpy(), labels)
        assert ds.patient_ids[:2] == ["0", "0"]


def test_hdf5_wrong_layout_is_bad_data(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "odd.hdf5", "w") as f:
        f.create_group("train").create_dataset("images", data=np.zeros((2, 8, 8)))
        f["train"].create_dataset("labels", data=np.zeros((2, 8, 4)))
    result = runner.invoke(
        app, ["data", "import-lidc-hdf5", str(tmp_path / "odd.hdf5"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 3 and "train/labels must be" in result.output and "odd.hdf5" in result.output


def _cli_import(src: Path, out: Path, *extra: str):
    return runner.invoke(app, ["data", "import-folder", str(src), "--out", str(out), "--split", "train", *extra])


@pytest.mark.parametrize(
    "damage, message, names",
    [
        (
            "grey_mask",
            "mask is not binary: expected values 0/1 (or 0/255), found 0, 128",
            "masks/case1_r0.png",
        ),
        ("nan_image", "image holds 1 NaN/Inf value(s)", "images/case1.npy"),
        ("shape", "image and mask shapes differ: image is 16x16, mask is 8x8", "masks/case1_r2.png"),
        ("no_masks", "case has zero reader masks", "images/case1.png"),
        ("extension", "unknown extension '.bmp'", "images/case9.bmp"),
        ("corrupt", "unreadable .png file", "masks/case1_r1.png"),
    ],
)
def test_bad_input_exit_code_3_names_file_and_case(tmp_path, damage, message, names):
    images, masks = _cases(3)
    src = tmp_path / "src"
    _standard_folder(src, images, masks)
    if damage == "grey_mask":
        _png(src / "masks" / "case1_r0.png", (masks[1, 0] * 128).astype(np.uint8))
    elif damage == "nan_image":
        (src / "images" / "case1.png").unlink()
        bad = images[1].astype(np.float32)
        bad[3, 4] = np.nan
        np.save(src / "images" / "case1.npy", bad)
    elif damage == "shape":
        _png(src / "masks" / "case1_r2.png", np.zeros((8, 8), np.uint8))
    elif damage == "no_masks":
        for k in range(3):
            (src / "masks" / f"case1_r{k}.png").unlink()
    elif damage == "extension":
        (src / "images" / "case9.bmp").write_bytes(b"BM")
    elif damage == "corrupt":
        (src / "masks" / "case1_r1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = _cli_import(src, out)
    assert result.exit_code == 3, result.output
    assert message in result.output and names in result.output.replace("\\", "/")
    if damage != "extension":
        assert "case 'case1'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even a partial file


def test_non_binary_masks_pass_with_threshold(tmp_path):
    images, masks = _cases(2)
    _standard_folder(tmp_path / "src", images, masks)
    _png(tmp_path / "src" / "masks" / "case1_r0.png", (masks[1, 0] * 200 + 20).astype(np.uint8))
    assert _cli_import(tmp_path / "src", tmp_path / "bad").exit_code == 3
    result = _cli_import(tmp_path / "src", tmp_path / "out", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load(tmp_path / "out", "train").masks[1, 0].numpy(), masks[1, 0])


def test_failed_import_keeps_the_previous_dataset(tmp_path):
    images, masks = _cases(3)
    _standard_folder(tmp_path / "src", images, masks)
    out = tmp_path / "out"
    assert _cli_import(tmp_path / "src", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _png(tmp_path / "src" / "masks" / "case2_r1.png", np.full((16, 16), 7, np.uint8))
    assert _cli_import(tmp_path / "src", out).exit_code == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_arguments_exit_code_2(tmp_path):
    images, masks = _cases(2)
    _standard_folder(tmp_path / "src", images, masks)
    for extra in (
        ["--image-range", "0;1"],
        ["--image-range", "5,1"],
        ["--split", "everything"],
        ["--threshold", "3"],
    ):
        result = runner.invoke(
            app, ["data", "import-folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *extra]
        )
        assert result.exit_code == 2, (extra, result.output)
    assert not (tmp_path / "out").exists()


def test_resize_by_area_averaging_keeps_means_and_mask_areas():
    from ssb_fast.data.importers import resize_area, resize_mask

    image = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    half = resize_area(image, 2)
    np.testing.assert_allclose(half[0], [[2.5, 4.5], [10.5, 12.5]])  # each 2x2 block's mean
    np.testing.assert_allclose(resize_area(np.ones((3, 3)), 2), np.ones((2, 2)))  # fractions included
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0:3, 0:3] = 1  # a quarter of the area
    small = resize_mask(mask, 2)
    assert small.tolist() == [[1, 0], [0, 0]]
    assert resize_mask(mask, 12).sum() == 36  # up-sizing keeps the area: each pixel becomes 2x2
    thin = np.zeros((8, 8), dtype=np.uint8)
    thin[1, :] = 1  # a quarter of each 4x4 block's rows: below half, so gone at 2x2
    assert resize_mask(thin, 2).sum() == 0
    thin[2, :] = 1  # half of the top blocks: kept
    assert resize_mask(thin, 2).tolist() == [[1, 1], [0, 0]]


def test_folder_import_with_size_resizes_scans_of_different_sizes(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "src"
    for i, size in enumerate((16, 24, 32)):
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        _png(root / "images" / f"case{i}.png", image)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[: size // 2, : size // 2] = 255
        _png(root / "masks" / f"case{i}_r0.png", mask)
    with pytest.raises(DataFormatError, match="differs from the first case"):
        import_folder(root, tmp_path / "plain", split="test")
    meta = import_folder(root, tmp_path / "out", split="test", size=8)
    assert meta["resized"]["size"] == 8 and meta["resized"]["source_shapes"] == ["16x16", "24x24", "32x32"]
    ds = load(tmp_path / "out", "test")
    assert ds.image_size == (8, 8)
    for i in range(3):
        m = ds.masks[ds.case_ids.index(f"case{i}")][0].numpy()
        assert m[:4, :4].all() and not m[4:].any() and not m[:, 4:].any()  # the top-left quarter, exactly
    result = runner.invoke(app, ["data", "import-folder", str(root), "--out", str(tmp_path / "cli"),
                                 "--split", "test", "--size", "12"])
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "cli", "test").image_size == (12, 12)


def test_folder_import_with_center_crop_keeps_the_central_pixels_then_resizes(tmp_path):
    root = tmp_path / "src"
    image = (np.arange(20 * 20).reshape(20, 20) % 256).astype(np.uint8)
    _png(root / "images" / "case0.png", image)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[6:10, 6:10] = 255  # inside the central 16x16 (rows and columns 2..17), at its offset 4..7
    mask[0, 0] = 255  # outside it: cut away
    _png(root / "masks" / "case0_r0.png", mask)
    meta = import_folder(root, tmp_path / "crop", split="test", crop=16)
    assert meta["center_crop"] == {"side": 16, "source_shapes": ["20x20"]}
    ds = load(tmp_path / "crop", "test")
    assert ds.image_size == (16, 16)
    m = ds.masks[0][0].numpy()
    assert m.sum() == 16 and m[4:8, 4:8].all()
    expected = image[2:18, 2:18].astype(np.float64) / 255 * 2 - 1
    np.testing.assert_allclose(ds.images[0][0].numpy(), expected, atol=1e-6)
    meta = import_folder(root, tmp_path / "both", split="test", crop=16, size=8)  # crop first, then resize
    assert meta["resized"]["size"] == 8
    m = load(tmp_path / "both", "test").masks[0][0].numpy()
    assert m[2:4, 2:4].all() and m.sum() == 4
    with pytest.raises(DataFormatError, match="smaller than the 24x24 centre crop"):
        import_folder(root, tmp_path / "big", split="test", crop=24)
    result = runner.invoke(app, ["data", "import-folder", str(root), "--out", str(tmp_path / "cli"),
                                 "--split", "test", "--center-crop", "24"])
    assert result.exit_code == 3 and "case0.png" in result.output and "24x24" in result.output, result.output
    assert not (tmp_path / "cli").exists()
    result = runner.invoke(app, ["data", "import-folder", str(root), "--out", str(tmp_path / "cli"),
                                 "--split", "test", "--center-crop", "10"])
    assert result.exit_code == 0 and "central 10x10 pixels of 20x20" in result.output, result.output
