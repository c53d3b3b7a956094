"""`bench nfe` in parts: each process samples every K-th case of the sweep, writes its masks to a part file,
and the last part to finish assembles the whole report.

Part i of K takes the cases at positions i, i + K, i + 2K, ... of the sweep's case list (the same rule as
`ssb-fast sample --num-parts`). The noise is keyed by case id and mask index, so the assembled report is
the one a single process would write, masks/s aside: that is the rate of one process, total masks over
the parts' summed sampling seconds. A part file records the settings it was sampled with; parts that
disagree (another model, NFE list, N, guidance, seed or case list) are refused by name, never mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from ssb_fast.atomic import write_atomic
from ssb_fast.sharding import Shard

PARTS_DIR = "parts"


class PartError(ValueError):
    """A part file that cannot be read, or that was sampled with other settings than this run's."""


def part_cases(picks: list[int], part_id: int, num_parts: int) -> list[int]:
    """The split indices part `part_id` of `num_parts` samples: `sample`'s rule applied to `picks`."""
    return [picks[j] for j in Shard(part_id=part_id, num_parts=num_parts).cases(len(picks))]


def part_path(out_dir: Path, part_id: int, num_parts: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"nfe-{Shard(part_id=part_id, num_parts=num_parts).label}.npz"


def model_digest(net: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names and bytes), so that parts of one report come from
    one model whatever path each process loaded it from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sweep_settings(net, dataset, picks: list[int], nfes: list[int], n_samples: int, guidance: float, seed: int,
                   num_parts: int, first_step_noise: float = 1.0) -> dict:
    """What every part of one report must share."""
    return {"model_sha256": model_digest(net), "data": str(dataset.source), "split_cases": len(dataset),
            "case_indices": list(picks), "nfes": sorted(nfes), "n_samples": int(n_samples),
            "guidance": float(guidance), "first_step_noise": float(first_step_noise), "seed": int(seed),
            "num_parts": int(num_parts)}


def save_part(path: Path, settings: dict, part_id: int, picks: list[int], sampled: dict[int, dict]) -> Path:
    """One part's masks (bit-packed), labels and timings, with the settings they were sampled with."""
    arrays = {"settings": np.array(json.dumps(settings)), "part_id": np.array(part_id),
              "case_indices": np.asarray(picks, dtype=np.int64)}
    for nfe, entry in sampled.items():
        masks = entry["masks"].bool().cpu().numpy()
        arrays[f"masks_shape_{nfe}"] = np.asarray(masks.shape, dtype=np.int64)
        arrays[f"masks_{nfe}"] = np.packbits(masks.reshape(-1))
        arrays[f"labels_{nfe}"] = entry["labels"].cpu().numpy().astype(np.int64)
        arrays[f"timing_{nfe}"] = np.asarray([entry["masks_per_s"] or 0.0, entry["warmup_s"] or 0.0])

    def write(fh):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        fh.write(buffer.getvalue())

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


def load_part(path: Path, settings: dict, part_id: int) -> tuple[list[int], dict[int, dict]]:
    """(the part's split indices, its sampled NFEs) after checking it was sampled with `settings`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            # parts saved before the first-step noise was a setting were sampled with I2SB's noise (1)
            found = {"first_step_noise": 1.0, **json.loads(str(npz["settings"]))}
            if int(npz["part_id"]) != part_id:
                raise PartError(f"{path}: expected part {part_id}, found part {int(npz['part_id'])}")
            differ = sorted(k for k in set(settings) | set(found) if settings.get(k) != found.get(k))
            if differ:
                raise PartError(f"{path}: sampled with other settings than this run ({', '.join(differ)} differ); "
                                f"remove it, or give this run another --out")
            picks = npz["case_indices"].tolist()
            sampled = {}
            for nfe in settings["nfes"]:
                shape = tuple(npz[f"masks_shape_{nfe}"].tolist())
                bits = np.unpackbits(npz[f"masks_{nfe}"], count=int(np.prod(shape)))
                mps, warmup = npz[f"timing_{nfe}"].tolist()
                sampled[nfe] = {"masks": torch.from_numpy(bits.reshape(shape).astype(bool)),
                                "labels": torch.from_numpy(npz[f"labels_{nfe}"]),
                                "masks_per_s": mps, "warmup_s": warmup}
    except PartError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise PartError(f"{path}: not a readable `bench nfe` part file (expected the npz a part writes): "
                        f"{err}") from err
    return picks, sampled


def missing_parts(out_dir: Path, num_parts: int) -> list[int]:
    return [i for i in range(num_parts) if not part_path(out_dir, i, num_parts).exists()]


def assemble_parts(out_dir: Path, settings: dict, picks: list[int]) -> dict[int, dict]:
    """Every part's masks put back in the order of `picks`, as `sample_sweep` returns them for the whole run;
    masks/s is the rate of one process (total masks over the summed sampling seconds), warm-up the longest."""
    num_parts = settings["num_parts"]
    position = {case: j for j, case in enumerate(picks)}
    loaded = []
    for i in range(num_parts):
        path = part_path(out_dir, i, num_parts)
        part_picks, sampled = load_part(path, settings, i)
        if part_picks != part_cases(picks, i, num_parts):
            raise PartError(f"{path}: holds other cases than part {i} of {num_parts} of this run")
        loaded.append((part_picks, sampled))
    assembled = {}
    for nfe in settings["nfes"]:
        first = loaded[0][1][nfe]
        masks = torch.zeros((len(picks), *first["masks"].shape[1:]), dtype=torch.bool)
        labels = torch.zeros((len(picks), first["labels"].shape[1]), dtype=torch.int64)
        seconds, count, warmup = 0.0, 0, 0.0
        for part_picks, sampled in loaded:
            rows = torch.tensor([position[c] for c in part_picks], dtype=torch.int64)
            entry = sampled[nfe]
            masks[rows], labels[rows] = entry["masks"], entry["labels"]
            n = entry["masks"].shape[0] * entry["masks"].shape[1]
            count += n
            seconds += n / entry["masks_per_s"] if entry["masks_per_s"] > 0 else 0.0
            warmup = max(warmup, entry["warmup_s"])
        assembled[nfe] = {"masks": masks, "labels": labels, "masks_per_s": count / seconds if seconds > 0 else 0.0,
                          "warmup_s": warmup}
    return assembled
