"""Hostile and broken files: each gets a clear error naming the file and its exit code (4 for checkpoints, 3 for
data), never a traceback, and nothing runs: no pickle payload creates its marker file, no output folder appears
and no large array is allocated for an image the model cannot take. Case ids that try to escape --out leave
every output inside it.

Checkpoints go through `ssb-fast sample --model` and `ssb_fast.load_model`; data files through `ssb-fast sample
--images` / `--data`, `ssb-fast data import-folder` and `import-lidc-pickle`. The default suite truncates the
model file at 20 seeded points; `-m slow` at 200 more.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _helpers import sample_cli
from PIL import Image
from typer.testing import CliRunner

from ssb_fast.checkpoint import CheckpointError, load_model
from ssb_fast.cli import app
from ssb_fast.data import DataFormatError, write_synthetic
from ssb_fast.sample_inputs import ModelInput, scans_from_images
from ssb_fast.samples_io import save_npz

runner = CliRunner()
MODEL = "model.safetensors"


class Payload:
    """Unpickling this creates `marker`: the proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def assert_clean_failure(result, code: int, *names: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for name in names:
        assert name in result.output, (name, result.output)


@pytest.fixture(scope="module")
def model_bytes(tiny_run) -> bytes:
    return (tiny_run[0] / MODEL).read_bytes()


def sample_with_model(model: Path, data: Path, out: Path):
    return sample_cli("--model", model, "--data", data, "--out", out, "--n-samples", "1", "--nfe", "1",
                      "--cases", "1", "--no-progress", "--device", "cpu")


def check_refused_checkpoint(path: Path, data: Path, tmp_path: Path, *expect: str, loads: bool = False) -> None:
    """`ssb-fast sample --model path` exits 4 naming the file; `load_model` raises (unless `loads`: a file
    whose model is whole but that cannot be sampled)."""
    if not loads:
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        for text in expect:
            assert text in str(err.value), (text, str(err.value))
    out = tmp_path / "never"
    assert_clean_failure(sample_with_model(path, data, out), 4, path.name, *expect)
    assert not out.exists(), "a refused checkpoint must stop the run before it writes anything"


# ---- checkpoints ------------------------------------------------------------------------------------------
def truncation_points(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted({0, 7, 8, size - 1, *(rng.randrange(0, size) for _ in range(count))})[:count]


def test_checkpoint_truncated_at_20_points(tiny_run, model_bytes, tmp_path, capsys):
    _, data = tiny_run
    points = truncation_points(len(model_bytes), 20, seed=0)
    passed = 0
    for cut in points:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(model_bytes[:cut])
        check_refused_checkpoint(path, data, tmp_path, "truncated or corrupt")
        passed += 1
    with capsys.disabled():
        print(f"\n  truncated checkpoints tried {len(points)}, passed {passed}")
    assert passed == len(points) == 20


@pytest.mark.slow
def test_checkpoint_truncated_at_200_more_points(tiny_run, model_bytes, tmp_path):
    for cut in truncation_points(len(model_bytes), 200, seed=1):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(model_bytes[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_model(path)


def _safetensors(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _with_metadata(model_bytes: bytes, **changes) -> bytes:
    """The tiny model's file with its metadata changed (None removes a key)."""
    from safetensors.torch import load

    n = struct.unpack("<Q", model_bytes[:8])[0]
    meta = json.loads(model_bytes[8:8 + n])["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return _safetensors(load(model_bytes), meta)


def hostile_checkpoints(model_bytes: bytes, marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a phrase the error must hold)."""
    import torch
    from safetensors.torch import load

    good = load(model_bytes)
    n = struct.unpack("<Q", model_bytes[:8])[0]
    meta = json.loads(model_bytes[8:8 + n])["__metadata__"]
    config = json.loads(meta["config"])
    wrong_shape = dict(good)
    first = next(k for k in good if k.startswith("ema.") and good[k].ndim)
    wrong_shape[first] = torch.zeros(*good[first].shape[:-1], good[first].shape[-1] + 1)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]},
                         "__metadata__": meta}).encode()
    return {
        "random_bytes": (random.Random(3).randbytes(4096), "truncated or corrupt"),
        "empty": (b"", "truncated or corrupt"),
        "wrong_tensors": (_safetensors({"foo": torch.zeros(3)}, meta), "weights do not fit"),
        "wrong_shapes": (_safetensors(wrong_shape, meta), "of another shape"),
        "no_ema": (_safetensors({k: v for k, v in good.items() if not k.startswith("ema.")}, meta), "missing"),
        "schema_99": (_with_metadata(model_bytes, schema="99"), "written by schema 99"),
        "schema_text": (_with_metadata(model_bytes, schema="one"), "not an integer"),
        "no_schema": (_with_metadata(model_bytes, schema=None), "not an integer"),
        "wrong_format": (_with_metadata(model_bytes, format="ssb-fast/train-state"), "not an ssb-fast checkpoint"),
        "no_metadata": (_safetensors(good, {}), "no ssb-fast metadata"),
        "config_not_json": (_with_metadata(model_bytes, config="{not json"), "config metadata is not valid JSON"),
        "config_a_list": (_with_metadata(model_bytes, config="[1, 2]"), "no model config"),
        "config_no_model": (_with_metadata(model_bytes, config=json.dumps({"bridge": config["bridge"]})),
                            "no model config"),
        "config_bad_model": (_with_metadata(model_bytes, config=json.dumps({**config, "model": {"nonsense": 1}})),
                             "cannot build a UNet"),
        "config_model_not_dict": (_with_metadata(model_bytes, config=json.dumps({**config, "model": 5})),
                                  "cannot build a UNet"),
        "config_bad_bridge": (_with_metadata(model_bytes, config=json.dumps({**config, "bridge": {"beta_max": -1}})),
                              "bridge"),
        "config_huge_bridge": (_with_metadata(model_bytes, config=json.dumps(
            {**config, "bridge": {"n_timesteps": 10**13, "beta_max": 0.3}})), "n_timesteps must be"),
        "config_huge_model": (_with_metadata(model_bytes, config=json.dumps(
            {**config, "model": {**config["model"], "base_channels": 2**16}})), "weights do not fit"),
        "config_no_bridge": (_with_metadata(model_bytes, config=json.dumps(
            {k: v for k, v in config.items() if k != "bridge"})), "no bridge settings"),
        "pickle_renamed": (pickle.dumps({"model": Payload(marker)}), "truncated or corrupt"),
        "torch_save_renamed": (_torch_save_bytes(Payload(marker)), "truncated or corrupt"),
        "tensor_larger_than_file": (struct.pack("<Q", len(header)) + header + b"\0" * 64, "truncated or corrupt"),
        "header_longer_than_file": (struct.pack("<Q", 1 << 40) + b"{}", "truncated or corrupt"),
        "header_not_object": (struct.pack("<Q", 2) + b"[]", "truncated or corrupt"),
        "offsets_overlap": (_overlapping(meta), "truncated or corrupt"),
    }


def _torch_save_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state": obj}, buf)
    return buf.getvalue()


def _overlapping(meta: dict) -> bytes:
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                         "__metadata__": meta}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 24


def test_hostile_checkpoints_exit_4_without_running_anything(tiny_run, model_bytes, tmp_path, capsys):
    _, data = tiny_run
    marker = tmp_path / "pwned"
    cases = hostile_checkpoints(model_bytes, marker)
    passed = 0
    for name, (content, expect) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        check_refused_checkpoint(path, data, tmp_path, expect, loads=name == "config_no_bridge")
        assert not marker.exists(), f"{name}: loading the checkpoint ran its payload"
        passed += 1
    with capsys.disabled():
        print(f"\n  hostile checkpoints tried {len(cases)}, passed {passed}")


# ---- LIDC pickles -------------------------------------------------------------------------------------
def _body(obj) -> bytes:
    """A protocol-2 pickle of `obj` without its PROTO header and STOP, to splice into another stream."""
    raw = pickle.dumps(obj, protocol=2)
    assert raw[:2] == b"\x80\x02" and raw[-1:] == b"."
    return raw[2:-1]


def nested_in_lists(depth: int, inner: bytes) -> bytes:
    """[[[... inner ...]]] `depth` lists deep, built with opcodes (pickle.dumps itself recurses)."""
    return b"\x80\x02" + b"]" * depth + inner + b"a" * depth + b"."


def lidc_record(image=None, masks=None):
    rng = np.random.default_rng(0)
    image = rng.random((16, 16), dtype=np.float32) if image is None else image
    masks = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(2)] if masks is None else masks
    return {"image": image, "masks": masks, "series_uid": "s1"}


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    from collections import OrderedDict

    evil = Payload(marker)
    return {
        "top_level": pickle.dumps(evil),
        "in_a_mask_list": pickle.dumps({"c0": lidc_record(masks=[np.zeros((16, 16), np.uint8), evil])}),
        "as_series_uid": pickle.dumps({"c0": {**lidc_record(), "series_uid": evil}}),
        "as_dict_key": pickle.dumps({"c0": lidc_record(), ("k", evil): 1}, protocol=4),
        "in_an_ordered_dict": pickle.dumps(OrderedDict(c0=OrderedDict(lidc_record(), extra=[evil])), protocol=5),
        "in_an_object_array": pickle.dumps({"c0": lidc_record(image=np.array([evil, 1], dtype=object))}),
        "nested_1000_deep": nested_in_lists(1000, _body(evil)),
        "nested_200000_deep": nested_in_lists(200_000, _body(evil)),
        "nested_deep_plain": nested_in_lists(200_000, _body(1)),
        "os_system": b"cos\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR.",
        "builtins_eval": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93"
                         b"\x8c\x0fopen('x','w')\x94\x85\x94R\x94.",
        "numpy_load_global": b"cnumpy\nload\n(Vx\ntR.",
        "persistent_id": b"\x80\x02Pabc\n.",
        "truncated": pickle.dumps({"c0": lidc_record()})[:100],
        "empty": b"",
    }


def test_hostile_lidc_pickles_exit_3_without_running_anything(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cases = hostile_pickles(marker)
    passed = 0
    for name, content in cases.items():
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(content)
        out = tmp_path / f"out_{name}"
        result = runner.invoke(app, ["data", "import-lidc-pickle", str(path), "--out", str(out), "--no-progress"])
        assert_clean_failure(result, 3, path.name)
        assert not marker.exists(), f"{name}: the pickle's payload ran"
        assert not (tmp_path / "x").exists() and not out.exists(), name
        passed += 1
    with capsys.disabled():
        print(f"\n  hostile LIDC pickles tried {len(cases)}, passed {passed}")


# ---- .npy / .npz object arrays -------------------------------------------------------------------------
def test_object_arrays_in_npy_and_npz_are_refused_unread(tiny_run, tmp_path):
    run, data = tiny_run
    marker = tmp_path / "pwned"
    evil = np.array([Payload(marker), 1], dtype=object)
    # .npy given to sample --images and to import-folder
    npy = tmp_path / "scans" / "obj.npy"
    npy.parent.mkdir()
    np.save(npy, evil, allow_pickle=True)
    result = sample_cli("--model", run, "--images", npy, "--out", tmp_path / "o1", "--no-progress")
    assert_clean_failure(result, 3, "obj.npy")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    np.save(src / "images" / "c0.npy", evil, allow_pickle=True)
    np.save(src / "masks" / "c0_r0.npy", np.zeros((8, 8), np.uint8))
    result = runner.invoke(app, ["data", "import-folder", str(src), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert_clean_failure(result, 3, "c0.npy")
    # a dataset split whose case_ids are an object array, given to sample --data
    bad = tmp_path / "bad_data"
    write_synthetic(bad, n_cases=6, size=32, seed=0)
    with np.load(bad / "train.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["case_ids"] = np.array([Payload(marker)] * len(arrays["case_ids"]), dtype=object)
    with open(bad / "train.npz", "wb") as fh:
        np.savez(fh, **arrays)
    result = sample_cli("--model", run, "--data", bad, "--split", "train", "--out", tmp_path / "o3",
                        "--no-progress")
    assert_clean_failure(result, 3, "train.npz")
    # a samples file holding object arrays, given to evaluate
    samples = tmp_path / "samples.npz"
    np.savez(samples, samples=evil, experts=evil)
    result = runner.invoke(app, ["evaluate", str(samples)])
    assert_clean_failure(result, 3, "samples.npz")
    assert not marker.exists()
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


# ---- broken images ---------------------------------------------------------------------------------------
FORMATS = (".png", ".jpg", ".npy", ".nii.gz")


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.name.endswith(".nii.gz"):
        import nibabel

        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    else:
        Image.fromarray(array).save(path)


def broken_image(path: Path, damage: str) -> str:
    """Write a damaged image of `damage` kind at `path`; returns a phrase its error must hold."""
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    good = (np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) * 7) % 251
    if damage == "truncated":
        write_image(path, good)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return "unreadable"
    if damage == "empty":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return "unreadable"
    if damage == "wrong_dtype":
        if ext == ".png":
            Image.fromarray(good > 100).save(path)  # a 1-bit picture: a mask, not a scan
            return "real numbers"
        if ext == ".npy":
            np.save(path, good.astype(np.complex64))
            return "real numbers"
        if ext == ".nii.gz":
            write_image(path, good.astype(np.complex64))
            return "real numbers"
        raise ValueError(ext)
    if damage == "one_pixel":
        write_image(path, np.full((1, 1), 9, np.uint8))
        return "1x1"
    raise ValueError(damage)


IMAGE_CASES = [(ext, damage) for ext in FORMATS for damage in ("truncated", "empty", "wrong_dtype", "one_pixel")
               if not (ext == ".jpg" and damage == "wrong_dtype")]  # JPEG has no other pixel type to be wrong


@pytest.mark.parametrize(("ext", "damage"), IMAGE_CASES)
def test_broken_images_given_to_sample_exit_3(tiny_run, tmp_path, ext, damage):
    run, _ = tiny_run
    path = tmp_path / f"scan{ext}"
    expect = broken_image(path, damage)
    out = tmp_path / "out"
    result = sample_cli("--model", run, "--images", path, "--out", out, "--no-progress", "--device", "cpu")
    assert_clean_failure(result, 3, path.name, expect)
    assert not out.exists()


@pytest.mark.parametrize(("ext", "damage"), IMAGE_CASES)
def test_broken_images_given_to_import_folder_exit_3(tmp_path, ext, damage):
    src = tmp_path / "src"
    expect = broken_image(src / "images" / f"c0{ext}", damage)
    write_image(src / "masks" / "c0_r0.png", np.zeros((32, 32), np.uint8))
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "import-folder", str(src), "--out", str(out), "--no-progress"])
    assert_clean_failure(result, 3, f"c0{ext}", expect)
    assert not out.exists()


@pytest.mark.parametrize("ext", [".png", ".npy", ".jpg"])
def test_huge_image_is_refused_before_its_pixels_are_read(tmp_path, ext):
    """8192x8192: the model takes 32x32, and the size is refused from the file's header, before a pixel array
    of the image's size is allocated."""
    path = tmp_path / f"huge{ext}"
    if ext == ".npy":  # a sparse file: the header says 8192x8192 float64 (512 MiB), the disk holds nothing
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(8192, 8192)).flush()
    else:
        Image.new("L", (8192, 8192)).save(path)
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="8192x8192") as err:
            scans_from_images([path], expect=ModelInput(1, (32, 32), 4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.name in str(err.value)
    assert peak < 16 << 20, f"reading the header allocated {peak >> 20} MiB"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, with one tiny data chunk."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8192, 40000])
def test_png_header_claiming_a_huge_image_exits_3(tiny_run, tmp_path, side):
    """A 64-byte file claiming 8192x8192 (or 1.6 billion pixels: PIL's decompression-bomb limit) is refused
    from its header, by sample and by import-folder."""
    run, _ = tiny_run
    scan = tmp_path / "scans" / "bomb.png"
    scan.parent.mkdir()
    scan.write_bytes(png_header_only(side, side))
    result = sample_cli("--model", run, "--images", scan, "--out", tmp_path / "o1", "--no-progress")
    assert_clean_failure(result, 3, "bomb.png")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "c0.png").write_bytes(png_header_only(side, side))
    write_image(src / "masks" / "c0_r0.png", np.zeros((32, 32), np.uint8))
    result = runner.invoke(app, ["data", "import-folder", str(src), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert_clean_failure(result, 3, "c0.png")


def test_huge_nifti_is_refused_cleanly(tiny_run, tmp_path):
    run, _ = tiny_run
    path = tmp_path / "huge.nii.gz"
    write_image(path, np.zeros((8192, 8192), np.uint8))
    result = sample_cli("--model", run, "--images", path, "--out", tmp_path / "out", "--no-progress")
    assert_clean_failure(result, 3, "huge.nii.gz", "8192x8192")


# ---- case ids that try to escape --out ---------------------------------------------------------------------
HOSTILE_IDS = ["../../x", "/abs/olute", "..", "a/b", "a\x00b", "Case", "case", ".hidden", "", "x" * 300,
               "nul\x00", "..\\..\\win", "CON"]


def dataset_with_ids(root: Path, ids: list[str]) -> Path:
    data = write_synthetic(root, n_cases=len(ids) + 6, size=32, seed=0)
    with np.load(data / "train.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = len(arrays["case_ids"])
    assert n >= len(ids)
    keep = {k: v[: len(ids)] for k, v in arrays.items()}
    keep["case_ids"] = np.array(ids, dtype=np.str_)
    with open(data / "train.npz", "wb") as fh:
        save_npz(fh, keep)
    return data


def test_case_ids_cannot_escape_out(tiny_run, tmp_path):
    run, _ = tiny_run
    ids = [i for i in HOSTILE_IDS if not i.endswith("\x00")]  # numpy strings drop trailing NULs
    data = dataset_with_ids(tmp_path / "data", ids)
    root = tmp_path / "deep" / "er"
    out = root / "out"
    root.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    result = sample_cli("--model", run, "--data", data, "--split", "train", "--out", out, "--n-samples", "2",
                        "--nfe", "1", "--no-progress", "--device", "cpu", "--no-png")
    assert result.exit_code == 0, result.output
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if out not in p.parents and p != out]
    assert not outside, f"written outside --out: {outside}"
    assert not Path("/abs").exists()
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve()), p
        assert "\x00" not in p.name
    summary = json.loads((out / "summary.json").read_text())
    files = [c["file"] for c in summary["cases"]]
    assert [c["case_id"] for c in summary["cases"]] == ids
    assert len({f.lower() for f in files}) == len(ids), "file names must differ also on case-insensitive systems"
    from ssb_fast.samples_io import read_samples_npz

    assert read_samples_npz(out).case_ids == ids


def test_nifti_file_names_cannot_escape_out(tiny_run, tmp_path):
    """The only case ids taken from file names; their NIfTI maps stay in OUT/nifti."""
    run, _ = tiny_run
    scans = tmp_path / "scans"
    for name in ("..nii.gz", "A.nii.gz", "a.nii.gz"):
        write_image(scans / name, np.full((32, 32), 5, np.uint8))
    out = tmp_path / "out"
    files = [scans / n for n in ("..nii.gz", "A.nii.gz", "a.nii.gz")]  # a folder would hide the dot file
    result = sample_cli("--model", run, "--images", *files, "--out", out, "--n-samples", "1", "--nfe", "1",
                        "--no-progress", "--no-png")
    assert result.exit_code == 0, result.output
    names = sorted(p.name.lower() for p in (out / "nifti").iterdir())
    assert len(names) == len(set(names)) == 9
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
