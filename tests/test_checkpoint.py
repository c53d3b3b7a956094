"""Checkpoints: safetensors round trips, and each kind of bad file refused with its own message."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ssb_fast import atomic, load_model
from ssb_fast import checkpoint as ckpt
from ssb_fast.model import UNet, UNetConfig


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = UNet(UNetConfig.preset("tiny", image_size=16))
    with torch.no_grad():  # leave the zero-initialised output layers non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def write_run_model(path):
    model, ema = tiny_model(0), tiny_model(1)
    config = {"model": model.config.to_dict(), "bridge": {"n_timesteps": 1000, "beta_max": 0.3}}
    ckpt.save_model_checkpoint(path, model.state_dict(), ema.state_dict(), config)
    return model, ema, config


def test_model_round_trip_loads_ema_weights(tmp_path):
    path = tmp_path / "model.safetensors"
    model, ema, config = write_run_model(path)
    loaded = load_model(path)
    assert not loaded.training
    for name, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.run_config["bridge"] == config["bridge"]
    raw = load_model(path, weights="model")
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())
    _, meta = ckpt.read_checkpoint(path, ckpt.MODEL_FORMAT)
    assert meta["format"] == "ssb-fast/model" and meta["schema"] == str(ckpt.SCHEMA)
    assert {"ssb_fast_version", "created_at", "config"} <= set(meta)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temporary file may remain"


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_run_model(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt checkpoint: tensor data needs"):
        load_model(path)
    path.write_bytes(data[:5])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt checkpoint: 5 bytes"):
        load_model(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ckpt.CheckpointError, match="header is damaged"):
        load_model(path)


def test_wrong_schema_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    model = tiny_model()
    meta = {"format": ckpt.MODEL_FORMAT, "schema": "3", "ssb_fast_version": "9.0",
            "config": json.dumps({"model": model.config.to_dict()})}
    save_file({f"ema.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=f"written by schema 3, this is schema {ckpt.SCHEMA}"):
        load_model(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(ckpt.CheckpointError, match="not an ssb-fast checkpoint of kind 'ssb-fast/model' "
                                                   r"\(no ssb-fast metadata\)"):
        load_model(path)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    model = tiny_model()
    state = dict(model.state_dict())
    state.pop(next(iter(state)))
    ckpt.save_model_checkpoint(path, state, state, {"model": model.config.to_dict()})
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit the model config"):
        load_model(path)


def test_train_state_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 2, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([0, 4])).square().mean().backward()
        opt.step()
    path = tmp_path / "train_state.safetensors"
    ckpt.save_resume_point(tmp_path / "model.safetensors", path, model.state_dict(), model.state_dict(),
                           {"model": model.config.to_dict()}, opt, step=2, extra={"world_size": 1})
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, extra = ckpt.load_train_state(path, fresh)
    assert step == 2 and extra == {"world_size": 1}
    a, b = opt.state_dict(), fresh.state_dict()
    assert json.loads(json.dumps(a["param_groups"])) == b["param_groups"]  # tuples come back as lists
    for index, values in a["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(b["state"][index][key]), torch.as_tensor(value)), (index, key)
    with pytest.raises(ckpt.CheckpointError, match="kind 'ssb-fast/train-state'"):
        ckpt.load_train_state(write_model_for(tmp_path), fresh)


def write_model_for(tmp_path):
    path = tmp_path / "m.safetensors"
    write_run_model(path)
    return path


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_run_model(path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)  # the new bytes are written, then the flush fails
    with pytest.raises(OSError, match="disk full"):
        write_run_model(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_foreign_tensors_are_counted_and_named(tmp_path):
    """Right metadata, someone else's tensors: every one of them is unexpected, and every weight is missing."""
    path = tmp_path / "model.safetensors"
    model = tiny_model()
    meta = {"format": ckpt.MODEL_FORMAT, "schema": str(ckpt.SCHEMA), "ssb_fast_version": "0",
            "config": json.dumps({"model": model.config.to_dict()})}
    save_file({f"encoder.layer.{i:03d}.weight": torch.zeros(2) for i in range(300)}, str(path), metadata=meta)
    n_weights = len(model.state_dict())
    with pytest.raises(ckpt.CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert f"{n_weights} missing (ema." in message
    assert "300 unexpected (encoder.layer.000.weight, encoder.layer.001.weight" in message
    assert "(295 more)" in message


def test_weights_of_another_shape_are_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    model = tiny_model()
    state = dict(model.state_dict())
    name = next(k for k, v in state.items() if v.dim() == 4)
    state[name] = torch.zeros(1, 1, 1, 1)
    ckpt.save_model_checkpoint(path, state, state, {"model": model.config.to_dict()})
    with pytest.raises(ckpt.CheckpointError, match=rf"1 of another shape \({name} \(1, 1, 1, 1\) in the file"):
        load_model(path)


def test_checkpoint_error_survives_pickling():
    """Under torchrun, rank 0's error reaches the other ranks as a pickled object."""
    import pickle

    err = pickle.loads(pickle.dumps(ckpt.CheckpointError("/run/model.safetensors", "truncated")))
    assert isinstance(err, ckpt.CheckpointError) and str(err) == "/run/model.safetensors: truncated"
    assert err.path == "/run/model.safetensors"


def _resume_point(tmp_path, step, monkeypatch=None, cut_after_first_rename=False):
    model, ema = tiny_model(step), tiny_model(step + 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    paths = tmp_path / "model.safetensors", tmp_path / "train_state.safetensors"
    if cut_after_first_rename:
        real = atomic.commit_file

        def commit_once(tmp, final):
            if final.name == "train_state.safetensors":
                raise KeyboardInterrupt
            real(tmp, final)

        monkeypatch.setattr(atomic, "commit_file", commit_once)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_resume_point(*paths, model.state_dict(), ema.state_dict(), {"model": model.config.to_dict()},
                                   opt, step)
        monkeypatch.undo()
    else:
        ckpt.save_resume_point(*paths, model.state_dict(), ema.state_dict(), {"model": model.config.to_dict()},
                               opt, step)
    return paths


def test_a_save_cut_between_its_two_renames_is_finished(tmp_path, monkeypatch):
    model_path, state_path = _resume_point(tmp_path, 3)
    assert ckpt.settle_resume_point(model_path, state_path) == 3
    _resume_point(tmp_path, 6, monkeypatch, cut_after_first_rename=True)
    assert ckpt.read_checkpoint(model_path, ckpt.MODEL_FORMAT)[1]["config"]["step"] == 6
    assert ckpt.read_checkpoint(state_path, ckpt.TRAIN_STATE_FORMAT)[1]["step"] == "3"
    (tmp_path / ".train_state.safetensors-cut.tmp").write_bytes(b"\x10\x00")  # a staged file cut short
    assert ckpt.settle_resume_point(model_path, state_path) == 6
    assert ckpt.read_checkpoint(state_path, ckpt.TRAIN_STATE_FORMAT)[1]["step"] == "6"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "train_state.safetensors"]


def test_a_first_save_cut_between_its_renames_is_finished(tmp_path, monkeypatch):
    model_path, state_path = _resume_point(tmp_path, 3, monkeypatch, cut_after_first_rename=True)
    assert not state_path.exists()
    assert ckpt.settle_resume_point(model_path, state_path) == 3
    assert ckpt.read_checkpoint(state_path, ckpt.TRAIN_STATE_FORMAT)[1]["step"] == "3"


def test_a_pair_that_cannot_be_matched_is_refused(tmp_path, monkeypatch):
    model_path, state_path = _resume_point(tmp_path, 3)
    _resume_point(tmp_path, 6, monkeypatch, cut_after_first_rename=True)
    atomic.remove_staged(state_path)
    with pytest.raises(ckpt.CheckpointError, match="holds step 3 but model.safetensors holds step 6"):
        ckpt.settle_resume_point(model_path, state_path)
    state_path.unlink()
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file but model.safetensors holds step 6"):
        ckpt.settle_resume_point(model_path, state_path)
