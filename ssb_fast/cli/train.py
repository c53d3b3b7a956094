"""`ssb-fast train`: train an SSB / SSB++ model on a dataset folder, on one process or many (torchrun)."""

from __future__ import annotations

import dataclasses
import signal
from typing import Annotated

import typer

from ssb_fast.cli.app import DeviceOption, ExitCode, JsonOption, ThreadsOption, app, fail, print_json

# Settings that may change when a run is resumed; anything else would silently break the run's recipe.
RESUMABLE = {"steps", "log_every", "val_every", "save_every", "save_minutes", "device", "compile", "amp",
             "deterministic"}


def _d(name: str):
    """The TrainConfig default of `name`, for help texts."""
    from ssb_fast.train.loop import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ssb-fast train --data data/synthetic --preset tiny --steps 300 --out runs/tiny\n\n"
        "  ssb-fast train --resume runs/tiny --steps 600\n\n"
        "  torchrun --nproc-per-node 2 -m ssb_fast.cli train --data DIR --preset ssb++ --out RUN"
    )
)
def train(
    data: Annotated[str | None, typer.Option(
        metavar="DIR", help="Dataset folder (train.npz, val.npz, meta.json).")] = None,
    out: Annotated[str | None, typer.Option(
        metavar="RUN", help="Run folder to create (config, checkpoints, log).")] = None,
    resume: Annotated[str | None, typer.Option(
        metavar="RUN", help="Continue the run in this folder exactly where it stopped (--steps may raise the "
                            "target).")] = None,
    preset: Annotated[str | None, typer.Option(
        metavar="NAME", help=f"U-Net preset: tiny, small, ssb, ssb++ (default {_d('preset')}).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help=f"Optimizer steps in total "
                                                 f"(default {_d('steps')}).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help=f"Batch per process; the effective batch "
                                                      f"is this times the number of processes "
                                                      f"(default {_d('batch_size')}).")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help=f"AdamW peak learning rate "
                                                f"(default {_d('lr')}).")] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        "--lr-schedule", metavar="constant|cosine",
        help=f"After warmup: constant, or a cosine decay to 5% of --lr at --steps (default {_d('lr_schedule')}).")]
    = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help=f"Linear warmup steps "
                                                        f"(default {_d('warmup_steps')}).")] = None,
    weight_decay: Annotated[float | None, typer.Option(min=0.0, help="AdamW weight decay (default 0).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help=f"Gradient norm clip "
                                                       f"(default {_d('grad_clip')}).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help=f"EMA decay of the sampling weights "
                                                       f"(default {_d('ema_decay')}).")] = None,
    p_uncond: Annotated[float | None, typer.Option(min=0.0, max=1.0, help=f"Probability of the null label "
                                                      f"(CFG dropout; default {_d('p_uncond')}).")] = None,
    lambda_dice: Annotated[float | None, typer.Option(min=0.0, help=f"Weight of the soft-Dice term "
                                                         f"(default {_d('lambda_dice')}).")] = None,
    expert_labels: Annotated[str | None, typer.Option(
        metavar="auto|area-rank|slot",
        help="What the expert label fed to the U-Net means: area-rank = the rank of the drawn reader's mask by "
             "area among the case's readers (0 = the widest, empty masks last; for anonymous readers such as "
             "LIDC-IDRI's), slot = the reader's slot in the dataset (readers who are the same people in every "
             "case). Default auto: slot when the dataset names its annotators (the synthetic data), else "
             "area-rank.")] = None,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="Flip and turn each item, and vary its contrast, gamma, blur and noise "
                                       "(default: off). Helps a model trained on semi-synthetic images "
                                       "on real scans.")] = None,
    n_timesteps: Annotated[int | None, typer.Option(min=2, help=f"Bridge timesteps "
                                                       f"(default {_d('n_timesteps')}).")] = None,
    beta_max: Annotated[float | None, typer.Option(help=(
        f"Bridge beta_max, the bridge's noise (default {_d('beta_max')}). Every mask of a scan starts at the scan, "
        "so whether a mask marks a nodule only some readers marked is drawn from this noise: at I2SB's 0.3 "
        "each (scan, label) draws its likelier outcome nearly always; `ssb-fast bench bridge-odds` shows the "
        "odds a setting can draw for your region sizes."))] = None,
    nfe_val: Annotated[int | None, typer.Option(min=1, help=f"NFE of validation sampling "
                                                   f"(default {_d('nfe_val')}).")] = None,
    val_every: Annotated[int | None, typer.Option(min=0, help=f"Validate every K steps, 0 = never "
                                                     f"(default {_d('val_every')}).")] = None,
    val_scans: Annotated[int | None, typer.Option(min=0, help=f"Validation scans "
                                                     f"(default {_d('val_scans')}).")] = None,
    val_samples: Annotated[int | None, typer.Option(min=1, help=f"Masks per validation scan "
                                                       f"(default {_d('val_samples')}).")] = None,
    log_every: Annotated[int | None, typer.Option(min=1, help=f"Steps per log.jsonl line "
                                                     f"(default {_d('log_every')}).")] = None,
    save_every: Annotated[int | None, typer.Option(min=1, help=f"Steps per checkpoint "
                                                      f"(default {_d('save_every')}).")] = None,
    save_minutes: Annotated[float | None, typer.Option(
        min=0.0, metavar="M", help=f"Also save every M minutes of wall-clock time, so that a hard kill (SIGKILL, "
                                   f"a lost node) costs at most M minutes; 0 = off "
                                   f"(default {_d('save_minutes'):g}).")] = None,
    base_channels: Annotated[int | None, typer.Option(min=1, help="Override the preset's base channels.")] = None,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Override the preset's dropout.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice (default 0).")] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the U-Net "
                                                    "(default: on with CUDA, off on CPU).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast (default: on with CUDA).")]
    = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic", help="Deterministic CUDA kernels (torch.use_deterministic_algorithms, no cuDNN "
                                "autotuning), so that a resumed CUDA run is bit-exact; slower. CPU runs are "
                                "bit-exact without it.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Train an SSB / SSB++ model: I2SB bridge loss with expert labels, CFG label dropout and a Dice term.

    Writes RUN/config.json, RUN/model.safetensors (weights + EMA), RUN/train_state.safetensors
    (optimizer, step, RNG) and RUN/log.jsonl. Ctrl-C, SIGTERM or SIGUSR1 finish the step, save and stop
    with exit code 130, 143 or 138 (128 + the signal); --resume RUN continues bit for bit. A folder that
    holds a saved run, or that another run is writing, is refused (exit 2). Under torchrun every process
    trains (DDP: NCCL on CUDA, gloo on CPU) and only rank 0 writes.
    """
    from ssb_fast.checkpoint import CheckpointError
    from ssb_fast.data import DataFormatError
    from ssb_fast.devices import set_threads
    from ssb_fast.train.loop import TrainConfig, read_run_config
    from ssb_fast.train.loop import train as run_training

    set_threads(threads)
    given = {k: v for k, v in dict(
        data=data, out=out, preset=preset, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, p_uncond=p_uncond,
        lr_schedule=lr_schedule,
        lambda_dice=lambda_dice, expert_labels=expert_labels, augment=augment, n_timesteps=n_timesteps,
        beta_max=beta_max, nfe_val=nfe_val,
        val_every=val_every,
        val_scans=val_scans, val_samples=val_samples, log_every=log_every, save_every=save_every,
        save_minutes=save_minutes, seed=seed, compile=compile, amp=amp,
        deterministic=deterministic).items() if v is not None}
    overrides = {k: v for k, v in (("base_channels", base_channels), ("dropout", dropout)) if v is not None}
    if device != "auto":
        given["device"] = device
    try:
        if resume:
            fixed = sorted(set(given) - RESUMABLE - {"out"}) + sorted(overrides)
            if fixed:
                fail(f"--resume continues a run with its own settings; cannot change {', '.join(fixed)} "
                     f"(changeable: {', '.join(sorted(RESUMABLE))})", ExitCode.BAD_ARGUMENTS)
            if out is not None and out != resume:
                fail("--out and --resume name different folders; --resume RUN writes into RUN",
                     ExitCode.BAD_ARGUMENTS)
            saved = read_run_config(resume)["train"]
            cfg = TrainConfig.from_dict({**saved, **given, "out": resume})
        else:
            if data is None or out is None:
                fail("--data and --out are required (or --resume RUN to continue a run)", ExitCode.BAD_ARGUMENTS)
            cfg = TrainConfig(**given, model_overrides=overrides)
        result = run_training(cfg, resume=bool(resume), progress=not no_progress)
    except DataFormatError as err:
        fail(str(err), ExitCode.BAD_DATA)
    except CheckpointError as err:
        fail(str(err), ExitCode.BAD_CHECKPOINT)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        fail(str(err), ExitCode.BAD_ARGUMENTS)
    stop_code = 128 + (result.stop_signal or signal.SIGINT)  # the shell's code for "ended by that signal"
    if result.rank != 0:  # under torchrun only rank 0 reports
        raise typer.Exit(stop_code if result.stopped_early else 0)
    summary = {"run": str(result.run_dir), "step": result.step, "stopped_early": result.stopped_early,
               "stop_signal": signal.Signals(result.stop_signal).name if result.stop_signal else None,
               "train": result.last_log, "val": result.last_val}
    if json_out:
        print_json(summary)
    else:
        log = result.last_log
        if log:
            typer.echo(f"trained to step {result.step} ({log['steps_per_s']:.2f} steps/s, effective batch "
                       f"{log['effective_batch']}): loss {log['loss']:.4f}  mse {log['mse']:.4f}  "
                       f"dice loss {log['dice_loss']:.4f}")
        val = result.last_val
        if val:
            typer.echo(f"validation at step {val['step']} ({val['n_scans']} scans x {val['n_samples']} masks, "
                       f"NFE {val['nfe']}): GED {val['ged']:.4f}  D_max {val['d_max']:.4f}  CI {val['ci']:.4f}  "
                       f"HM-IoU {val['hm_iou']:.4f}")
        typer.echo(f"run folder: {result.run_dir} (config.json, model.safetensors, train_state.safetensors, "
                   f"log.jsonl)")
    if result.stopped_early:
        name = signal.Signals(result.stop_signal or signal.SIGINT).name
        typer.echo(f"stopped by {name} after step {result.step}, saved; continue with: ssb-fast train --resume "
                   f"{result.run_dir}", err=True)
        raise typer.Exit(stop_code)
