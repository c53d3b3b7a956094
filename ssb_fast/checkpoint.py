"""Checkpoints: safetensors only (no pickle), written atomically, checked before use.

`RUN/model.safetensors`: weights `model.*` and EMA weights `ema.*`, metadata `format`, `ssb_fast_version`,
`schema`, `config` (JSON: model, bridge, data and training settings) and `created_at`.
`RUN/train_state.safetensors`: optimizer state `optim.<param>.<key>`, RNG states `rng.*`, and the step,
so `--resume` continues exactly where a run stopped.
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
from ssb_fast.atomic import write_bytes_atomic

SCHEMA = 1
MODEL_FORMAT = "ssb-fast/model"
TRAIN_STATE_FORMAT = "ssb-fast/train-state"
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically, so a crash never leaves half a checkpoint."""
    flat, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.data_ptr() in seen:  # safetensors refuses shared storage
            value = value.clone()
        seen.add(value.data_ptr())
        flat[key] = value
    return write_bytes_atomic(path, safetensors_bytes(flat, metadata=metadata))


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


def read_checkpoint(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors and metadata, after checking framing, format and schema. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
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
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError on damaged files
        raise CheckpointError(path, f"truncated or corrupt checkpoint: {err}") from None
    if "config" in metadata:
        try:
            metadata["config"] = json.loads(metadata["config"])
        except json.JSONDecodeError:
            raise CheckpointError(path, "corrupt checkpoint: the config metadata is not valid JSON") from None
    return tensors, metadata


# ---- model file --------------------------------------------------------------------------------------
def save_model_checkpoint(path, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                          config: dict) -> Path:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    return atomic_save(tensors, path, _base_metadata(MODEL_FORMAT, config=json.dumps(config, sort_keys=True)))


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


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
        model = UNet(UNetConfig.from_dict(config["model"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"the model config cannot build a UNet: {err}") from None
    state = split_prefix(tensors, f"{weights}.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(path, f"weights do not fit the model config: missing {sorted(missing)[:5]}, "
                                    f"unexpected {sorted(unexpected)[:5]}")
    model.run_config = config
    return model.to(device).eval()


# ---- training state ---------------------------------------------------------------------------------
def save_train_state(path, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None) -> Path:
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
    return atomic_save(tensors, path, meta)


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
