"""Run `ssb-fast sample`: N masks for many scans, into a folder a person can open, without losing finished
work, in one process or sharded over many.

`sample_dataset` (the scans of a dataset split, with their experts' masks), `sample_images` (image files
and NIfTI, no experts) and `sample_scans` load the model, check every scan and the output folder, and
run the one `Sampler` over this process's part of the cases in groups. After each group every finished
case is written (ssb_fast.sample_folder owns the folder's format); once every case of the run exists,
samples.npz, the NIfTI maps, summary.json and run.json are assembled. A rerun with `resume=True` reuses
the finished cases whose settings and scans match and samples the rest; with `shard` (a part of K, or a
torchrun rank, see ssb_fast.sharding) a process samples only its part and assembles when it finds the
run complete (under torchrun, rank 0 after all ranks are done).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ssb_fast.atomic import write_json_atomic
from ssb_fast.bridge import Bridge
from ssb_fast.checkpoint import CheckpointError, load_model
from ssb_fast.devices import describe_device, resolve_device
from ssb_fast.metrics import METRIC_NAMES
from ssb_fast.progress import progress_bar
from ssb_fast.run_record import command_line, device_record, versions
from ssb_fast.sample_folder import (
    ARGS_FILE,
    CASES_DIR,
    MASK_SETTINGS,
    PARTS_DIR,
    RUN_FILE,
    SUMMARY_FILE,
    case_file_stems,
    case_paths,
    check_folder,
    check_out_folder,
    folder_lock,
    missing_cases,
    read_finished_cases,
    read_part_records,
    refresh_case_outputs,
    remove_interrupted_writes,
    reusable,
    scan_digest,
    write_case_outputs,
    write_nifti_maps,
    write_part_record,
    write_run_samples,
)
from ssb_fast.sample_inputs import (
    SampleRunError,
    ScanSet,
    check_scans_fit,
    model_input,
    scans_from_dataset,
    scans_from_images,
)
from ssb_fast.sampler import LABEL_MODES, Sampler
from ssb_fast.samples_io import SAMPLES_FILE
from ssb_fast.sharding import RankGroup, Shard
from ssb_fast.step_runner import PRECISIONS

MODEL_FILE = "model.safetensors"

__all__ = ["SampleOptions", "SampleRunError", "file_sha256", "resolve_model_path", "sample_dataset", "sample_images",
           "sample_scans"]


@dataclass
class SampleOptions:
    """How to sample and what to write; `check()` rejects bad values before any work starts."""

    n_samples: int = 16
    nfe: int = 20
    guidance: float = 1.0
    first_step_noise: float = 1.0
    labels: str = "cycle"
    ot_ode: bool = False
    seed: int = 0
    max_batch: int | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool | str | None = None
    cuda_graphs: bool = False
    soft: bool = False
    png: bool = True
    resume: bool = False
    progress: bool = True

    def check(self) -> torch.device:
        """Validate every option; return the resolved device. Raises SampleRunError naming the option."""
        for name, low in (("n_samples", 1), ("nfe", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SampleRunError(f"{name} must be an int >= {low}; got {value!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise SampleRunError(f"max_batch must be an int >= 1; got {self.max_batch!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise SampleRunError(f"guidance must be a finite number >= 0; got {self.guidance!r}")
        if (isinstance(self.first_step_noise, bool) or not isinstance(self.first_step_noise, (int, float))
                or not math.isfinite(self.first_step_noise) or self.first_step_noise <= 0):
            raise SampleRunError(f"first_step_noise must be a finite number > 0; got {self.first_step_noise!r}")
        if self.labels not in LABEL_MODES:
            raise SampleRunError(f"labels must be one of {', '.join(LABEL_MODES)}; got {self.labels!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise SampleRunError(f"precision must be auto or one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        try:
            device = resolve_device(str(self.device))
        except ValueError as err:
            raise SampleRunError(str(err)) from None
        if self.cuda_graphs and device.type != "cuda":
            raise SampleRunError(f"cuda_graphs needs a CUDA device; the device is {device}")
        return device


# ---- model --------------------------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run folder means its model.safetensors; a file is taken as it is."""
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_for_sampling(model_path, device: torch.device):
    """(EMA model on `device`, its file, its bridge); CheckpointError when either cannot be built."""
    file = resolve_model_path(model_path)
    net = load_model(file, device=device)
    bridge_cfg = net.run_config.get("bridge")
    if not isinstance(bridge_cfg, dict):
        raise CheckpointError(file, "the checkpoint's config has no bridge settings")
    try:
        bridge = Bridge(**bridge_cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(file, f"the bridge config cannot build a Bridge: {err}") from None
    return net, file, bridge


# ---- entry points ---------------------------------------------------------------------------------------
def sample_dataset(model_path: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                   split: str = "test", cases: int | None = None, case_ids: Sequence[str] | None = None,
                   shard: Shard | None = None, group: RankGroup | None = None, **options) -> dict:
    """Sample every chosen scan of a dataset split into `out` (with the experts, so `evaluate` works on it).

    `options` are the fields of SampleOptions; `shard` is this process's part of the cases (default: all),
    `group` the torchrun ranks it meets (None for separate processes). Returns the summary, also written
    to out/summary.json when the run is complete. Raises SampleRunError (settings, output folder),
    CheckpointError (model) or DataFormatError (scans, an --out that is a file).
    """
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = load_for_sampling(model_path, device)
    scans = scans_from_dataset(data, split, cases, case_ids)
    check_scans_fit(net, scans)
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start, shard, group)


def sample_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  axis: int | None = None, slices=None, shard: Shard | None = None, group: RankGroup | None = None,
                  **options) -> dict:
    """Sample image files (or folders of them) into `out`; there are no experts (M = 0 in samples.npz).

    A NIfTI volume is sampled on the slices `slices` (a SliceSpec, see ssb_fast.nifti_io.parse_slices)
    along `axis` (default the last); every NIfTI input gets its maps back as NIfTI in out/nifti.
    Same options, return value and errors as `sample_dataset`.
    """
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = load_for_sampling(model_path, device)
    scans = scans_from_images(images, expect=model_input(net), axis=axis, slices=slices)
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start, shard, group)


def sample_scans(model_path: str | os.PathLike, scans: ScanSet, out: str | os.PathLike, *,
                 shard: Shard | None = None, group: RankGroup | None = None, **options) -> dict:
    """Sample a ScanSet built elsewhere into `out`; same options, return value and errors as above."""
    start = time.perf_counter()
    opts = SampleOptions(**options)
    device = opts.check()
    net, model_file, bridge = load_for_sampling(model_path, device)
    check_scans_fit(net, scans)
    return _run(net, model_file, bridge, scans, Path(out), opts, device, start, shard, group)


# ---- the run ----------------------------------------------------------------------------------------
def _run(net, model_file: Path, bridge: Bridge, scans: ScanSet, out: Path, opts: SampleOptions,
         device: torch.device, wall_start: float, shard: Shard | None, group: RankGroup | None) -> dict:
    """Check OUT, write args.json, sample this part's unfinished cases group by group, then assemble the
    run's files if every case is there."""
    from ssb_fast import __version__

    shard = shard or Shard()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    check_out_folder(out)
    # True compiles with Inductor; a string names another torch.compile backend
    compile_net = device.type == "cuda" if opts.compile is None else opts.compile
    if not isinstance(compile_net, str):
        compile_net = bool(compile_net)
    args = {
        "command": "ssb-fast sample",
        "ssb_fast_version": __version__,
        "model": str(model_file.resolve()),
        "model_sha256": file_sha256(model_file),
        "bridge": dict(net.run_config["bridge"]),
        "input": scans.input,
        "case_ids": list(scans.case_ids),
        **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
           if f.name not in ("resume", "progress", "compile", "device", "max_batch", "precision")},
        "device": str(device),
        "compile": compile_net,
        "shard": {"num_parts": shard.num_parts, "launcher": shard.launcher,
                  "rule": "case j belongs to part j mod num_parts"},
    }
    settings = json.loads(json.dumps({key: args[key] for key in MASK_SETTINGS}))  # as case files hold them
    try:
        sampler = Sampler(net, bridge, nfe=opts.nfe, guidance=opts.guidance, labels=opts.labels, ot_ode=opts.ot_ode,
                          first_step_noise=opts.first_step_noise, seed=opts.seed, max_batch=opts.max_batch,
                          device=device, compile=compile_net,
                          cuda_graphs=opts.cuda_graphs, precision=None if opts.precision == "auto" else opts.precision)
    except ValueError as err:  # e.g. an NFE beyond the model's bridge
        raise SampleRunError(str(err)) from None
    args["precision"] = sampler.runner.precision
    args["rows_per_step"] = f"{sampler.halves}B"
    paths = case_paths(out, case_file_stems(scans.case_ids))
    digests = [scan_digest(image) for image in scans.images]
    mine = shard.cases(len(scans))
    finished: dict[int, dict] = {}
    with folder_lock(out):
        saved = check_folder(out, args, settings, shard, opts.resume, [paths[i] for i in mine])
        if opts.resume:
            for i in mine:
                case = reusable(paths[i].npz, scans.case_ids[i], digests[i], settings)
                if case is not None:
                    finished[i] = case
        # Only now, with every check passed, does the folder change. A part joining a sharded run keeps the
        # args.json its first part wrote (they differ only in this process's device and batch).
        args.update({"max_batch": sampler.max_batch, "continue": opts.resume})
        if not shard.sharded or saved is None:
            write_json_atomic(out / ARGS_FILE, args)
        # A process killed while writing leaves its staged files behind; this part's cases are written by this
        # process alone, and args.json only under the lock.
        remove_interrupted_writes([out / ARGS_FILE, *(f for i in mine for f in _case_files(paths[i]))])
    reused = set(finished)
    todo = [i for i in mine if i not in reused]
    settings_line = (f"N = {opts.n_samples}, NFE {opts.nfe}, guidance {opts.guidance:g}, labels {opts.labels}"
                     + (f", first-step noise {opts.first_step_noise:g}" if opts.first_step_noise != 1 else ""))
    records: dict[int, dict] = {}

    def scan_of(i: int) -> np.ndarray:
        return scans.images[i].numpy()

    for i in sorted(reused):  # maps and pictures of reused cases, where missing
        records[i] = refresh_case_outputs(paths[i], finished[i], scan_of(i), scans.sources[i], settings_line,
                                          opts.png)
    del finished  # the case files hold them; the assembly reads them back

    totals = {"seconds": 0.0, "warmup_seconds": 0.0, "network_rows": 0, "padding_rows": 0, "groups": 0,
              "oom_retries": 0}
    stats_of: dict[int, dict] = {}
    # A group of scans fills at least one chunk, so the network never runs on a chunk smaller than it must.
    group_size = max(1, math.ceil(sampler.max_batch / opts.n_samples))
    device_name = describe_device(device)
    total = len(todo) * opts.n_samples
    run_wide = group is not None and group.store is not None
    if group is not None:
        group.announce(total)
    label = "sampling masks" if group is None else ("sampling masks, all ranks" if run_wide else
                                                     f"sampling masks, rank {shard.rank}'s share")
    with progress_bar(label, total, enabled=opts.progress and shard.is_main, unit="masks") as advance:
        def report(new: int) -> None:
            counts = group.progress(new) if group is not None else None
            if counts is None:
                advance(new)
            else:
                advance(0, completed=counts[0], total=counts[1])

        for start in range(0, len(todo), group_size):
            chunk_cases = todo[start:start + group_size]
            reported = 0

            def on_chunk(done: int, _total: int) -> None:
                nonlocal reported
                report(done - reported)
                reported = done

            result = sampler.sample(scans.images[chunk_cases], opts.n_samples,
                                    case_ids=[scans.case_ids[i] for i in chunk_cases], return_soft=opts.soft,
                                    on_chunk=on_chunk)
            stats = result.stats
            for key in ("seconds", "warmup_seconds", "network_rows", "padding_rows", "oom_retries"):
                totals[key] += stats[key]
            totals["groups"] += 1
            for j, i in enumerate(chunk_cases):
                case = {
                    "case_id": scans.case_ids[i], "samples": result.masks[j].numpy(),
                    "labels": result.labels[j].numpy(), "experts": scans.experts[i], "present": scans.present[i],
                    "soft": result.soft[j].numpy() if result.soft is not None else None,
                    "scan_digest": digests[i], "settings": settings,
                }
                # a case's time and network rows are its share of its group's
                stats_of[i] = {"seconds": stats["seconds"] / len(chunk_cases), "masks_per_s": stats["masks_per_s"],
                               "warmup_seconds": stats["warmup_seconds"] / len(chunk_cases),
                               "network_rows": stats["network_rows"] / len(chunk_cases),
                               "group_scans": len(chunk_cases), "chunks_in_group": stats["chunks"],
                               "max_batch": stats["final_batch"], "device": device_name}
                records[i] = write_case_outputs(paths[i], case, scan_of(i), scans.sources[i], settings_line,
                                                opts.png)

        masks = len(todo) * opts.n_samples
        part = {
            "part": shard.to_dict(), "started_at": started_at, "device": device_record(device),
            "versions": versions(device), "masks": masks, "seconds": totals["seconds"],
            "warmup_seconds": totals["warmup_seconds"],
            # throughput over the steady state; compile, autotuning and graph capture are counted apart
            "masks_per_s": masks / totals["seconds"] if totals["seconds"] > 0 else None,
            "masks_per_s_with_warmup": (masks / (totals["seconds"] + totals["warmup_seconds"])
                                        if totals["seconds"] + totals["warmup_seconds"] > 0 else None),
            "network_rows": totals["network_rows"], "padding_rows": totals["padding_rows"],
            "network_rows_per_mask": totals["network_rows"] / masks if masks else None,
            "rows_per_step": f"{sampler.halves}B", "precision": sampler.runner.precision,
            "compiled_shapes": sorted(sampler.runner.shapes), "groups": totals["groups"],
            "max_batch": sampler.max_batch, "oom_retries": totals["oom_retries"],
            "part_cases": len(mine), "sampled_cases": [scans.case_ids[i] for i in todo],
            "reused_cases": [scans.case_ids[i] for i in sorted(reused)],
            "case_stats": {scans.case_ids[i]: stats_of[i] for i in todo},
        }
        part["wall_seconds"] = time.perf_counter() - wall_start
        if shard.sharded:
            write_part_record(out, shard, part)
        if group is not None:  # torchrun: every rank's case files exist once all ranks are past this
            def show_all(done: int, todo_all: int) -> None:
                advance(0, completed=done, total=todo_all)

            group.wait_for_all(show_all if run_wide else None)

    base = _invocation_summary(out, model_file, device_name, scans, opts, part, shard)
    if group is not None and not shard.is_main:
        return {**base, "assembled": False, "missing_cases": None, "assembled_by": "rank 0"}
    with folder_lock(out):
        missing = missing_cases(paths)
        if missing:
            return {**base, "assembled": False, "missing_cases": len(missing),
                    "missing_case_ids": [scans.case_ids[i] for i in missing[:10]]}
        cases = read_finished_cases(paths, scans.case_ids, digests, settings)
        for i, case in enumerate(cases):
            if i not in records:  # another part's case: its record, redrawn if a file is missing
                records[i] = refresh_case_outputs(paths[i], case, scan_of(i), scans.sources[i], settings_line,
                                                  opts.png)
        # the run's files are written only under the lock; the cases' files, once every case exists, only by a
        # process refreshing them (under the lock here, or in a single-process run)
        remove_interrupted_writes([out / SAMPLES_FILE, out / SUMMARY_FILE, out / RUN_FILE,
                                   *(f for p in (paths if not shard.sharded else ()) for f in _case_files(p))])
        write_run_samples(out, cases, scans.case_ids, opts.soft)
        nifti = write_nifti_maps(out, scans.volumes, cases) if scans.volumes else []
        del cases
        parts = read_part_records(out) if (out / PARTS_DIR).is_dir() else []
        if not shard.sharded and (part["masks"] or not parts):  # a plain --continue that only assembled adds none
            parts.append(part)
        summary = _run_summary(base, out, scans, paths, records, stats_of, parts, nifti)
        write_json_atomic(out / SUMMARY_FILE, summary)
        write_json_atomic(out / RUN_FILE, _run_record(args, part, parts, shard, summary))
    return summary


def _case_files(paths) -> list[Path]:
    """Every file a case writes: its case file and what is drawn from it."""
    return [paths.npz, *paths.derived(png=True)]


def _invocation_summary(out: Path, model_file: Path, device_name: str, scans: ScanSet, opts: SampleOptions,
                        part: dict, shard: Shard) -> dict:
    """What this process did: its cases, masks and speed."""
    sampled = len(part["sampled_cases"])
    return {
        "out": str(out), "model": str(model_file), "device": device_name,
        "n_cases": len(scans), "n_samples": opts.n_samples, "nfe": opts.nfe, "guidance": opts.guidance,
        "first_step_noise": opts.first_step_noise, "labels": opts.labels, "ot_ode": opts.ot_ode, "seed": opts.seed,
        "has_experts": bool(scans.experts.shape[1] > 0),
        "shard": shard.to_dict(), "part_cases": part["part_cases"],
        "sampled_cases": sampled, "reused_cases": part["part_cases"] - sampled,
        **{key: part[key] for key in ("masks", "seconds", "warmup_seconds", "masks_per_s", "masks_per_s_with_warmup",
                                      "network_rows", "padding_rows", "network_rows_per_mask", "rows_per_step",
                                      "precision", "compiled_shapes", "groups", "max_batch", "oom_retries",
                                      "wall_seconds")},
    }


def _run_summary(base: dict, out: Path, scans: ScanSet, paths, records: dict[int, dict], stats_of: dict[int, dict],
                 parts: list[dict], nifti: list[str]) -> dict:
    """The assembled run: this process's work, every part's speed, the metrics and every case's files."""
    known: dict[str, tuple[str, dict]] = {}  # case id -> (part, stats) from every part's record
    for record in parts:
        for case_id, stats in record.get("case_stats", {}).items():
            known[case_id] = (_part_label(record["part"]), stats)
    cases = []
    for i, path in enumerate(paths):
        case_id = scans.case_ids[i]
        by, stats = known.get(case_id, (None, {}))
        cases.append({
            "case_id": case_id, "file": path.npz.relative_to(out).as_posix(),
            "png": path.png.relative_to(out).as_posix() if path.png.exists() else None,
            "folder": path.folder.relative_to(out).as_posix(),
            "grid": path.grid.relative_to(out).as_posix() if path.grid.exists() else None,
            "reused": i not in stats_of, "sampled_by": by,
            "uncertainty": records[i]["uncertainty"], "metrics": records[i]["metrics"],
            **(stats_of.get(i) or stats),
        })
    scored = [c["metrics"] for c in cases if c["metrics"] is not None]
    metrics = None
    if scored:
        metrics = {"n_cases": len(scored), "n_samples": base["n_samples"],
                   "mean": {name: float(np.mean([m[name] for m in scored])) for name in METRIC_NAMES}}
    n_cases = len(scans)
    return {
        **base, "other_parts_cases": n_cases - base["part_cases"], "assembled": True, "missing_cases": 0,
        "parts": [_part_brief(r) for r in parts],
        "metrics": metrics,
        "entropy_bits_mean": float(np.mean([c["uncertainty"]["entropy_bits_mean"] for c in cases])),
        "files": {"samples": SAMPLES_FILE, "args": ARGS_FILE, "summary": SUMMARY_FILE, "run": RUN_FILE,
                  "cases": CASES_DIR, "nifti": nifti},
        "cases": cases,
    }


def _part_label(part: dict) -> str:
    return f"part-{part['part_id']}-of-{part['num_parts']}"


def _part_brief(record: dict) -> dict:
    return {"part": _part_label(record["part"]), "launcher": record["part"]["launcher"],
            "host": record["device"]["host"], "device": record["device"]["device"],
            "device_name": record["device"]["name"], "device_uuid": record["device"]["uuid"],
            "cases": len(record["sampled_cases"]), "masks": record["masks"], "seconds": record["seconds"],
            "warmup_seconds": record["warmup_seconds"], "masks_per_s": record["masks_per_s"],
            "wall_seconds": record["wall_seconds"], "started_at": record["started_at"]}


def _run_record(args: dict, part: dict, parts: list[dict], shard: Shard, summary: dict) -> dict:
    """run.json: the resolved arguments, the versions, this process's device and timing, every part."""
    rates = [r["masks_per_s"] for r in parts if r["masks_per_s"]]
    return {
        "command": "ssb-fast sample", "argv": command_line(), "args": args,
        "versions": part["versions"], "device": part["device"],
        "wall_seconds": part["wall_seconds"], "started_at": part["started_at"],
        "assembled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "masks": part["masks"], "warmup_seconds": part["warmup_seconds"], "seconds": part["seconds"],
        "steady_masks_per_s": part["masks_per_s"], "masks_per_s_with_warmup": part["masks_per_s_with_warmup"],
        "shard_layout": {
            "this_process": shard.to_dict(),
            "num_parts": max([shard.num_parts, *(r["part"]["num_parts"] for r in parts)]),
            "rule": "case j belongs to part j mod num_parts",
            "parts": [_part_brief(r) for r in parts],
            # parts that ran at the same time sample at about the sum of their steady rates
            "sum_of_steady_masks_per_s": sum(rates) if rates else None,
        },
        "parts": parts,
        "n_cases": summary["n_cases"], "n_samples": summary["n_samples"],
    }
