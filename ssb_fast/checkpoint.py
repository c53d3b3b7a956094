"""Checkpoints: safetensors only (no pickle), written atomically, checked before use.

`RUN/model.safetensors`: weights `model.*` and EMA weights `ema.*`, metadata `format`, `ssb_fast_version`,
`schema`, `config` (JSON: model, bridge, data and training settings) and `created_at`.
`RUN/train_state.safetensors`: optimizer state `optim.<param>.<key>`, RNG states `rng.*`, and the step,
so `--resume` continues exactly where a run stopped. Training writes the two as one resume point
(`save_resume_point`), and `settle_resume_point` finishes a save that a crash cut between the two files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ssb_fast import __version__
from ssb_fast.atomic import commit_file, remove_staged, staged_versions, write_bytes_atomic, write_together

SCHEMA = 1
MODEL_FORMAT = "ssb-fast/model"
TRAIN_STATE_FORMAT = "ssb-fast/train-state"
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # pickled across ranks (torch.distributed broadcasts errors as objects)
        return type(self), (self.path, self.problem)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    flat, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.data_ptr() in seen:  # safetensors refuses shared storage
            value = value.clone()
        seen.add(value.data_ptr())
        flat[key] = value
    return safetensors_bytes(flat, metadata=metadata)


def _base_metadata(fmt: str, **extra: str) -> dict[str, str]:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"format": fmt, "ssb_fast_version": __version__, "schema": str(SCHEMA), "created_at": now, **extra}


def _check_header(path: Path) -> None:
    """Validate the safetensors framing ourselves, so truncation and garbage get their own message."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"truncated or corrupt checkpoint: {size} bytes, not a safetensors file")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(path, "truncated or corrupt checkpoint: the safetensors header is damaged "
                                        f"(declares {header_len} header bytes in a {size}-byte file)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(path, "truncated or corrupt checkpoint: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "truncated or corrupt checkpoint: the header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    data_len = size - 8 - header_len
    if ends and max(ends) > data_len:
        raise CheckpointError(path, f"truncated or corrupt checkpoint: tensor data needs {max(ends)} bytes, "
                                    f"the file holds {data_len}")


def _check_metadata(path: Path, metadata: dict, expected_format: str) -> None:
    fmt = metadata.get("format")
    if fmt != expected_format:
        what = f"format {fmt!r}" if fmt else "no ssb-fast metadata"
        raise CheckpointError(path, f"not an ssb-fast checkpoint of kind {expected_format!r} ({what})")
    schema = metadata.get("schema", "")
    if not schema.isdigit():
        raise CheckpointError(path, f"checkpoint schema is {schema!r}, not an integer")
    if int(schema) != SCHEMA:
        raise CheckpointError(path, f"written by schema {schema}, this is schema {SCHEMA} "
                                    f"(ssb-fast {__version__}; the file says ssb-fast "
                                    f"{metadata.get('ssb_fast_version', '?')})")


def read_checkpoint(path: str | os.PathLike, expected_format: str,
                    tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors and metadata, after checking framing, format and schema. Raises CheckpointError.

    With `tensors=False` only the metadata is read (the tensor dict comes back empty).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            _check_metadata(path, metadata, expected_format)
            values = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError on damaged files
        raise CheckpointError(path, f"truncated or corrupt checkpoint: {err}") from None
    if "config" in metadata:
        try:
            metadata["config"] = json.loads(metadata["config"])
        except json.JSONDecodeError:
            raise CheckpointError(path, "corrupt checkpoint: the config metadata is not valid JSON") from None
    return values, metadata


# ---- model file --------------------------------------------------------------------------------------
WEIGHT_PREFIXES = ("model.", "ema.")  # the training weights and their moving average


def _model_file_bytes(model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                      config: dict) -> bytes:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    return _safetensors_bytes(tensors, _base_metadata(MODEL_FORMAT, config=json.dumps(config, sort_keys=True)))


def save_model_checkpoint(path, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                          config: dict) -> Path:
    return write_bytes_atomic(path, _model_file_bytes(model_state, ema_state, config))


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def load_weights(target, tensors: dict[str, torch.Tensor], prefix: str, path: str | os.PathLike) -> None:
    """Load the `prefix` weights of a model file into `target` (a module, or anything with state_dict and
    load_state_dict), or raise CheckpointError counting and naming what does not fit: names the model needs
    and the file lacks, tensors in the file that no model of this config has (under any prefix), and shapes
    that differ."""
    expected = target.state_dict()
    own = split_prefix(tensors, prefix)
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(k for k in tensors
                        if not any(k.startswith(p) and k[len(p):] in expected for p in WEIGHT_PREFIXES))
    reshaped = sorted(f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
                      for k, v in own.items() if k in expected and v.shape != expected[k].shape)
    problems = [f"{len(missing)} missing ({_few([prefix + k for k in missing])})" if missing else "",
                f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
                f"{len(reshaped)} of another shape ({_few(reshaped, 3)})" if reshaped else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(path, f"weights do not fit the model config ({len(expected)} tensors under "
                                    f"{prefix!r}): {'; '.join(problems)}")
    target.load_state_dict(own)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", weights: str = "ema"):
    """The model of a run, ready to sample: EMA weights (or `weights="model"`), eval mode, on `device`.

    The run's config (model, bridge, data, training) is attached as `model.run_config`.
    """
    from ssb_fast.model import UNet, UNetConfig

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model'; got {weights!r}")
    tensors, metadata = read_checkpoint(path, MODEL_FORMAT)
    config = metadata.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(path, "corrupt checkpoint: the metadata has no model config")
    try:
        model_config = UNetConfig.from_dict(config["model"])
        # Built on the meta device first (no memory), so that a config naming a model far larger than the file's
        # weights is refused by the shape check below instead of allocating it.
        with torch.device("meta"):
            shape_of = UNet(model_config)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(path, f"the model config cannot build a UNet: {err}") from None
    load_weights(_ShapesOnly(shape_of), tensors, f"{weights}.", path)
    _check_bridge(path, config)
    model = UNet(model_config)
    load_weights(model, tensors, f"{weights}.", path)
    model.run_config = config
    return model.to(device).eval()


class _ShapesOnly:
    """A meta-device module's state_dict for `load_weights` to check names and shapes against."""

    def __init__(self, module: torch.nn.Module):
        self._state = module.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def load_state_dict(self, _state) -> None:
        pass


def _check_bridge(path, config: dict) -> None:
    """CheckpointError unless the config's bridge settings (when present) build a Bridge."""
    from ssb_fast.bridge import Bridge

    bridge = config.get("bridge")
    if bridge is None:
        return
    if not isinstance(bridge, dict):
        raise CheckpointError(path, f"the bridge config must be a JSON object; got {type(bridge).__name__}")
    try:
        Bridge(**bridge)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"the bridge config cannot build a Bridge: {err}") from None


# ---- training state ---------------------------------------------------------------------------------
def _train_state_bytes(optimizer: torch.optim.Optimizer, step: int, extra: dict | None) -> bytes:
    """Optimizer tensors, CPU/CUDA RNG states and the step; param groups go to JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda_{i}"] = s
    meta = _base_metadata(TRAIN_STATE_FORMAT, step=str(int(step)),
                          param_groups=json.dumps(state["param_groups"]), optim_scalars=json.dumps(scalars),
                          extra=json.dumps(extra or {}, sort_keys=True))
    return _safetensors_bytes(tensors, meta)


def load_train_state(path, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore the optimizer and RNG states; returns (step, extra)."""
    tensors, metadata = read_checkpoint(path, TRAIN_STATE_FORMAT)
    try:
        groups = json.loads(metadata["param_groups"])
        scalars = json.loads(metadata.get("optim_scalars", "{}"))
        step = int(metadata["step"])
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, ValueError) as err:
        raise CheckpointError(path, f"corrupt training state metadata: {err}") from None
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        per_param.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(path, f"optimizer state does not fit this model: {err}") from None
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return step, extra


# ---- the resume point: model file + training state of one step --------------------------------------
def save_resume_point(model_path, state_path, model_state: dict[str, torch.Tensor],
                      ema_state: dict[str, torch.Tensor], config: dict, optimizer: torch.optim.Optimizer,
                      step: int, extra: dict | None = None) -> None:
    """Write the model file and the training state of `step` together (atomic.write_together): both are
    staged before either is replaced, and both record the step, so that `settle_resume_point` can tell a
    matching pair from one cut between its two renames, and finish that save."""
    model_bytes = _model_file_bytes(model_state, ema_state, {**config, "step": int(step)})
    state_bytes = _train_state_bytes(optimizer, step, extra)
    write_together([(model_path, lambda fh: fh.write(model_bytes)), (state_path, lambda fh: fh.write(state_bytes))])


def _saved_step(path: Path, fmt: str) -> int:
    """The step a model file (config.step) or training state (step) was saved at; CheckpointError if unreadable."""
    _, metadata = read_checkpoint(path, fmt, tensors=False)
    value = (metadata.get("config") or {}).get("step") if fmt == MODEL_FORMAT else metadata.get("step")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CheckpointError(path, f"the metadata records no step (found {value!r})") from None


def settle_resume_point(model_path, state_path) -> int:
    """The step at which the model file and the training state agree; call while no other process writes them.

    A crash between the two renames of `save_resume_point` leaves one file a save ahead of the other (or
    alone, at the first save), and the newer version of the other staged beside it: that version is moved
    into place. Staged leftovers of either file are removed. Raises CheckpointError when a file is
    unreadable or the pair cannot be matched.
    """
    files = {Path(model_path): MODEL_FORMAT, Path(state_path): TRAIN_STATE_FORMAT}
    steps = {path: _saved_step(path, fmt) if path.exists() else None for path, fmt in files.items()}
    if all(step is None for step in steps.values()):
        raise CheckpointError(model_path, f"no such checkpoint file, nor {Path(state_path).name}")
    newest = max(step for step in steps.values() if step is not None)
    for path, fmt in files.items():
        if steps[path] == newest:
            continue
        for staged in staged_versions(path):
            try:
                if _saved_step(staged, fmt) == newest:
                    commit_file(staged, path)
                    steps[path] = newest
                    break
            except CheckpointError:  # a staged file cut short while it was written: not the one
                continue
        if steps[path] != newest:
            other = next(p for p in files if p != path).name
            what = "no such checkpoint file" if steps[path] is None else f"holds step {steps[path]}"
            raise CheckpointError(path, f"{what} but {other} holds step {newest} (a save was interrupted), and "
                                        f"no complete copy of step {newest} is staged beside it; the run cannot "
                                        f"be resumed from this pair")
    for path in files:
        remove_staged(path)
    return newest
