"""The SSB training loop: one process or many, exact resume, EMA, validation, atomic checkpoints.

A run folder holds `config.json` (the resolved settings), `model.safetensors` (weights + EMA +
config), `train_state.safetensors` (optimizer, step, RNG) and `log.jsonl` (one line per log interval).
Every random choice of step s on rank r comes from seeds hashed from (seed, s, r), so a run resumed at
step s continues bit for bit as if it had never stopped.

The run saves every `save_every` steps and every `save_minutes` of wall-clock time. Ctrl-C, SIGTERM and
SIGUSR1 (how Slurm and Kubernetes stop or pre-empt a job) finish the current step, save and stop; the
command line then exits with 128 + the signal's number. While it runs, the process holds an exclusive
lock on the folder (ssb_fast.run_lock), so a second run on the same folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from ssb_fast.kernels.noise import hash_seed
from ssb_fast.train.augment import augment, draw_augment
from ssb_fast.train.batches import ShuffledStream
from ssb_fast.train.distributed import (
    DistContext,
    barrier,
    init_distributed,
    max_across_ranks,
    mean_across_ranks,
    run_on_main,
    shutdown,
)
from ssb_fast.train.ema import EMA
from ssb_fast.train.loss import (
    EXPERT_LABELS,
    area_ranks,
    draw,
    resolve_expert_labels,
    ssb_loss,
    with_area_rank_labels,
)
from ssb_fast.train.validate import validate, validation_references
from torch.nn.parallel import DistributedDataParallel

from ssb_fast import __version__
from ssb_fast.atomic import remove_staged, write_json_atomic
from ssb_fast.bridge import Bridge
from ssb_fast.checkpoint import (
    MODEL_FORMAT,
    load_train_state,
    load_weights,
    read_checkpoint,
    save_model_checkpoint,
    save_resume_point,
    settle_resume_point,
)
from ssb_fast.model import UNet, UNetConfig
from ssb_fast.progress import progress_bar
from ssb_fast.run_lock import RunLock

CONFIG_FILE, MODEL_FILE, STATE_FILE, LOG_FILE = "config.json", "model.safetensors", "train_state.safetensors", \
    "log.jsonl"
BEST_FILE = "best.safetensors"  # the EMA weights of the validation with the lowest GED
LR_SCHEDULES = ("constant", "cosine")
AGREE_EVERY = 10  # under DDP, steps between the ranks' agreement on a signal or a timed save
MIN_LR_RATIO = 0.05  # cosine decays to this fraction of the peak


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then constant or a cosine decay to MIN_LR_RATIO * lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainConfig:
    """Every setting of a training run; written to RUN/config.json and into the checkpoint."""

    data: str
    out: str
    preset: str = "ssb++"
    steps: int = 20000
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    lambda_dice: float = 0.1
    expert_labels: str = "auto"
    augment: bool = False
    n_timesteps: int = 1000
    # Not I2SB's 0.3: with that little bridge noise each (scan, label) draws its mode (`bench bridge-odds`).
    beta_max: float = 10.0
    nfe_val: int = 10
    val_every: int = 1000
    val_scans: int = 64
    val_samples: int = 16
    log_every: int = 25
    save_every: int = 1000
    save_minutes: float = 10.0
    seed: int = 0
    device: str = "auto"
    compile: bool | None = None
    amp: bool | None = None
    deterministic: bool = False
    model_overrides: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        positive = ("steps", "batch_size", "n_timesteps", "nfe_val", "log_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "val_every", "val_scans", "val_samples", "lambda_dice")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not (self.save_minutes >= 0 and math.isfinite(self.save_minutes)):
            raise ValueError(f"save_minutes must be a number >= 0 (0 = off); got {self.save_minutes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if self.expert_labels not in EXPERT_LABELS:
            raise ValueError(f"expert_labels must be one of {', '.join(EXPERT_LABELS)}; got {self.expert_labels!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"p_uncond must be in [0, 1]; got {self.p_uncond}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0; got {self.grad_clip}")
        if self.nfe_val >= self.n_timesteps:
            raise ValueError(f"nfe_val must be < n_timesteps ({self.n_timesteps}); got {self.nfe_val}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        # Runs saved before these options existed conditioned on the slot and used I2SB's beta_max.
        d = {"expert_labels": "slot", "beta_max": 0.3, **d}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    model: torch.nn.Module
    ema: EMA
    last_log: dict
    stopped_early: bool = False
    rank: int = 0
    last_val: dict = field(default_factory=dict)
    stop_signal: int | None = None  # the signal that stopped the run early (SIGINT, SIGTERM, SIGUSR1)


# Ctrl-C; what Slurm and Kubernetes send to stop or pre-empt a job (Slurm's --signal sends SIGUSR1 ahead).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class _StopFlag:
    """Ctrl-C, SIGTERM or SIGUSR1 finish the current step, save, and stop: no half-updated weights on disk."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal received
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:  # a second Ctrl-C stops at once; a repeated SIGTERM waits for the save
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old.clear()


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run config (is {run_dir} a training run folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


class BatchSource:
    """Training batches gathered by index from the split's tensors. On CUDA the images and masks move to
    the device once when they take at most `device_fraction` of its memory, so a step copies only the
    indices; `present` stays on the CPU, where the annotator draw reads it."""

    def __init__(self, dataset, device: torch.device, device_fraction: float = 0.25):
        self.device = device
        images, masks = dataset.images, dataset.masks
        self.on_device = False
        if device.type == "cuda":
            need = images.numel() * images.element_size() + masks.numel() * masks.element_size()
            if need <= device_fraction * torch.cuda.get_device_properties(device).total_memory:
                images, masks = images.to(device), masks.to(device)
                self.on_device = True
        self.images, self.masks, self.present = images, masks, dataset.present

    def batch(self, indices: list[int]):
        idx = torch.tensor(indices, dtype=torch.int64)
        present = self.present[idx]
        if self.on_device:
            idx = idx.to(self.device, non_blocking=True)
            return self.images[idx], self.masks[idx], present
        return (self.images[idx].to(self.device, non_blocking=True),
                self.masks[idx].to(self.device, non_blocking=True), present)


def set_deterministic(on: bool, device: torch.device) -> None:
    """Bit-exact CUDA training (and resume): deterministic kernels, no cuDNN autotuning. CPU runs are
    bit-exact without it."""
    if not on:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def _best_ged(run_dir: Path) -> float:
    """The validation GED of the run's best checkpoint so far (inf when there is none)."""
    path = run_dir / BEST_FILE
    if not path.exists():
        return math.inf
    _, meta = read_checkpoint(path, MODEL_FORMAT)
    try:
        return float(meta["config"]["val"]["ged"])
    except (KeyError, TypeError, ValueError):
        return math.inf


def build_model_config(cfg: TrainConfig, dataset) -> UNetConfig:
    height, width = dataset.image_size
    if height != width:
        raise ValueError(f"the U-Net trains on square images; the dataset's are {height}x{width}")
    return UNetConfig.preset(cfg.preset, image_size=height, scan_channels=dataset.image_channels,
                             n_labels=dataset.n_raters, **cfg.model_overrides)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or, with `resume`, continue) the run in `cfg.out`. Works under torchrun as well.

    Refuses (FileExistsError) a folder that holds a saved run unless `resume`, and a folder another live
    process is training in (run_lock.FolderBusyError); `resume` on a run that never saved raises
    NeverSavedError (a FileNotFoundError) saying that starting it afresh is safe.
    """
    from ssb_fast.data import load as load_dataset

    cfg.check()
    ctx = init_distributed(cfg.device)
    locks: list[RunLock] = []
    try:
        claim = run_on_main(ctx, lambda: _claim_folder(Path(cfg.out), resume, locks))
        return _train(cfg, ctx, resume, progress, load_dataset, claim)
    finally:
        for lock in locks:
            lock.release()
        shutdown(ctx)


class NeverSavedError(FileNotFoundError):
    """--resume on a run folder without a checkpoint: nothing to resume, and nothing to lose by starting again."""


def _claim_folder(run_dir: Path, resume: bool, locks: list[RunLock]) -> dict:
    """Lock the run folder (the lock goes into `locks`) and make it ready: for a resume, settle the
    checkpoint pair that a crash may have left a save apart and drop a log line cut short; for a new run,
    refuse a folder with a saved run and keep aside the log of one that never saved. Removes files that
    interrupted atomic writes staged. Returns what the start line of the log should record."""
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE}: no run config (is {run_dir} a training run folder?)")
    locks.append(RunLock(run_dir).acquire())
    model_path, state_path = run_dir / MODEL_FILE, run_dir / STATE_FILE
    for name in (CONFIG_FILE, BEST_FILE):
        remove_staged(run_dir / name)
    if resume:
        present = [p for p in (model_path, state_path) if p.exists()]
        if not present:
            remove_staged(model_path)
            remove_staged(state_path)
            raise NeverSavedError(
                f"{run_dir} never saved a checkpoint (it stopped before its first save), so there is nothing "
                f"to resume and nothing to lose: start it again with the same --out (ssb-fast train --data DIR "
                f"--out {run_dir} ...); its log is kept aside")
        settle_resume_point(model_path, state_path)
        _drop_partial_line(run_dir / LOG_FILE)
        return {}
    if model_path.exists() or state_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                              f"or choose another --out")
    remove_staged(model_path)
    remove_staged(state_path)
    kept = _keep_aside_unsaved(run_dir)
    return {"kept_aside": kept} if kept else {}


def _keep_aside_unsaved(run_dir: Path) -> list[str]:
    """Rename the log (and best checkpoint) of an earlier run in `run_dir` that never saved to
    `<stem>.unsaved-K<suffix>`, so that a new run starts its own log instead of appending a second one."""
    names = [n for n in (LOG_FILE, BEST_FILE) if (run_dir / n).exists()]
    if not names:
        return []
    k = 1
    aside = lambda name, k: f"{Path(name).stem}.unsaved-{k}{Path(name).suffix}"
    while any((run_dir / aside(n, k)).exists() for n in (LOG_FILE, BEST_FILE)):
        k += 1
    for name in names:
        os.replace(run_dir / name, run_dir / aside(name, k))
    return [aside(n, k) for n in names]


def _drop_partial_line(path: Path) -> None:
    """Cut a last log line that a kill left without its newline, so the resumed run's lines stay JSON."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool, progress: bool, load_dataset,
           claim: dict) -> TrainResult:
    device = ctx.device
    on_cuda = device.type == "cuda"
    use_amp = on_cuda if cfg.amp is None else cfg.amp
    use_compile = on_cuda if cfg.compile is None else cfg.compile
    run_dir = Path(cfg.out)

    dataset = load_dataset(cfg.data, "train")
    try:
        val_set = load_dataset(cfg.data, "val")
    except FileNotFoundError:
        val_set = None
    bridge = Bridge(cfg.n_timesteps, cfg.beta_max)
    cfg.expert_labels = resolve_expert_labels(cfg.expert_labels, dataset.meta)  # the config records the choice
    model_cfg = build_model_config(cfg, dataset)
    torch.manual_seed(hash_seed(cfg.seed, "init"))
    set_deterministic(cfg.deterministic, device)
    model = UNet(model_cfg).to(device)
    ema = EMA(model, cfg.ema_decay)
    # fused AdamW: one kernel for the whole update on CUDA, instead of a loop over parameter tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if on_cuda else {}))
    run_config = {
        "model": model_cfg.to_dict(),
        "bridge": {"n_timesteps": cfg.n_timesteps, "beta_max": cfg.beta_max},
        "data": {"path": str(cfg.data), "n_raters": dataset.n_raters, "image_channels": dataset.image_channels,
                 "image_size": list(dataset.image_size), "train_cases": len(dataset),
                 "source": (dataset.meta or {}).get("source")},
        "train": asdict(cfg),
        "ssb_fast_version": __version__,
    }

    start_step = 0
    if resume:
        model_path = run_dir / MODEL_FILE
        tensors, _ = read_checkpoint(model_path, MODEL_FORMAT)
        load_weights(model, tensors, "model.", model_path)
        load_weights(ema, tensors, "ema.", model_path)
        start_step, _ = load_train_state(run_dir / STATE_FILE, optimizer)
    if ctx.is_main:
        write_json_atomic(run_dir / CONFIG_FILE, run_config, sort_keys=True)

    net = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None) if ctx.distributed \
        else model
    if use_compile:
        net = torch.compile(net)
    stream = ShuffledStream(len(dataset), cfg.seed)
    batches = BatchSource(dataset, device)
    # Area ranks of the whole split, once on the CPU: a step then only indexes them (no device work, no sync).
    ranks = area_ranks(dataset.masks, dataset.present) if cfg.expert_labels == "area-rank" else None
    log_path = run_dir / LOG_FILE
    effective_batch = cfg.batch_size * ctx.world_size

    def log(record: dict) -> None:
        if ctx.is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    log({"event": "resume" if resume else "start", "step": start_step, "steps": cfg.steps,
         "world_size": ctx.world_size, "batch_per_process": cfg.batch_size, "effective_batch": effective_batch,
         "device": str(device), "amp_bf16": use_amp, "compile": use_compile, "deterministic": cfg.deterministic,
         "data_on_device": batches.on_device, "cpu_threads": torch.get_num_threads(),
         "parameters": sum(p.numel() for p in model.parameters()), "time": time.time(), **claim})

    saved = {"at": time.monotonic()}

    def save(step: int) -> None:
        if ctx.is_main:
            run_config["step"] = step
            save_resume_point(run_dir / MODEL_FILE, run_dir / STATE_FILE, model.state_dict(), ema.state_dict(),
                              run_config, optimizer, step, {"world_size": ctx.world_size})
        barrier(ctx)
        saved["at"] = time.monotonic()

    sums = torch.zeros(4, device=device)  # loss, mse, dice_loss, grad_norm since the last log line
    count, last_log, last_val, t_last = 0, {}, {}, time.perf_counter()
    references, best_ged = {}, _best_ged(run_dir) if resume else math.inf
    if val_set is not None and cfg.val_every and ctx.is_main:
        references = validation_references(val_set, cfg.val_scans, cfg.val_samples, cfg.seed)
        log({"event": "references", **{k: v for k, v in references.items() if not k.endswith("_per_scan")}})
    step = start_step
    stopped_early, stop_signal = False, None
    save_seconds = cfg.save_minutes * 60
    model.train()
    with _StopFlag() as stop, progress_bar("train", cfg.steps, progress and ctx.is_main,
                                           fields="loss {task.fields[loss]}") as advance:
        advance(start_step)
        while step < cfg.steps:
            torch.manual_seed(hash_seed(cfg.seed, "step", step, ctx.rank))  # dropout
            gen = torch.Generator().manual_seed(hash_seed(cfg.seed, "draw", step, ctx.rank))
            indices = stream.batch_indices(step, cfg.batch_size, ctx.rank, ctx.world_size)
            images, masks, present = batches.batch(indices)
            sample = draw(present, model.null_label, cfg.n_timesteps, cfg.p_uncond, gen)
            if ranks is not None:
                sample = with_area_rank_labels(sample, ranks[indices], model.null_label)
            if cfg.augment:
                images, masks = augment(images, masks, draw_augment(len(images), images.shape[-2:], gen))
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                parts = ssb_loss(net, bridge, images, masks, sample, cfg.lambda_dice)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.update(model, step)
            step += 1
            sums += torch.stack([parts.loss.detach(), parts.mse, parts.dice_loss, grad_norm.detach()]).float()
            count += 1
            # Every rank must stop, and save, at the same step: under DDP they agree through one small
            # all-reduce (a host sync), held to every AGREE_EVERY steps so the step loop keeps its pipeline.
            signum, time_due = 0, False
            if not ctx.distributed or step % AGREE_EVERY == 0 or step == cfg.steps:
                signum, time_due = max_across_ranks(
                    ctx, stop.signum or 0, save_seconds > 0 and time.monotonic() - saved["at"] >= save_seconds)
            stopping = signum > 0

            if step % cfg.log_every == 0 or step == cfg.steps:
                means = (mean_across_ranks(ctx, sums) / count).tolist()
                now = time.perf_counter()
                last_log = {"step": step, "loss": means[0], "mse": means[1], "dice_loss": means[2],
                            "grad_norm": means[3], "lr": lr, "steps_per_s": count / (now - t_last),
                            "effective_batch": effective_batch}
                log(last_log)
                sums.zero_()
                count, t_last = 0, now
                advance(0, loss=f"{means[0]:.4f}")
            if (val_set is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps)
                    and ctx.is_main and not stopping):  # a stop saves first: a scheduler's grace period is short
                scores = validate(ema.shadow, bridge, val_set, cfg.val_scans, cfg.val_samples, cfg.nfe_val,
                                  seed=cfg.seed, device=device, references=references)
                last_val = {"step": step, **scores}
                log({"step": step, "val": scores})
                if scores and scores["ged"] < best_ged:
                    best_ged = scores["ged"]
                    save_model_checkpoint(run_dir / BEST_FILE, model.state_dict(), ema.state_dict(),
                                          {**run_config, "step": step, "val": scores})
                model.train()
            if step % cfg.save_every == 0 or step == cfg.steps or time_due or stopping:
                save(step)
            advance(1)
            if stopping and step < cfg.steps:
                stopped_early, stop_signal = True, int(signum)
                log({"event": "stopped", "step": step, "signal": signal.Signals(stop_signal).name})
                break
    return TrainResult(step, run_dir, model, ema, last_log, stopped_early, ctx.rank, last_val, stop_signal)
