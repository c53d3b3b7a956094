"""Interrupted training: `ssb-fast train` processes killed with SIGKILL at chosen points (after N log lines,
and inside a checkpoint save, aimed with the test-only delay before each rename), and stopped with SIGTERM.

After every kill each checkpoint file on disk loads (none is ever half-written); `--resume` continues from
the last checkpoint (or, for a run that never saved, the run starts again with the same --out); and the
final weights, EMA weights and optimizer state equal those of an uninterrupted run bit for bit.

The default suite tries three kills and one SIGTERM; `-m slow` adds seeded schedules of many more.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _helpers import wait_until as _wait_until
from typer.testing import CliRunner

from ssb_fast.atomic import REPLACE_DELAY_ENV
from ssb_fast.checkpoint import MODEL_FORMAT, TRAIN_STATE_FORMAT, read_checkpoint
from ssb_fast.cli import app
from ssb_fast.data import write_synthetic

STEPS = 20
RUN_ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--batch-size", "2", "--lr", "2e-3", "--warmup-steps", "3",
            "--log-every", "1", "--val-every", "0", "--seed", "5", "--device", "cpu"]
COMMON = ["--threads", "1", "--no-progress"]
SAVE_EVERY = ["--save-every", "3", "--save-minutes", "0"]
DELAY_S = 0.5  # sleep before each rename when a kill is aimed at a save
TIMEOUT_S = 300
MODEL, STATE = "model.safetensors", "train_state.safetensors"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("faults") / "data", n_cases=8, size=32, seed=0)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Tensors of an uninterrupted run of STEPS steps, in this process on one thread like the killed ones:
    model + EMA weights, and the optimizer state."""
    run = tmp_path_factory.mktemp("faults") / "straight"
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["train", "--data", str(data_dir), "--out", str(run), *RUN_ARGS,
                                          *SAVE_EVERY, *COMMON])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return final_tensors(run)


def launch(args: list[str], log_stem: Path, delay: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != REPLACE_DELAY_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if delay:
        env[REPLACE_DELAY_ENV] = str(DELAY_S)
    with open(f"{log_stem}.out", "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "ssb_fast.cli", "train", *args, *COMMON], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def output(log_stem: Path) -> str:
    path = Path(f"{log_stem}.out")
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    weights, _ = read_checkpoint(run / MODEL, MODEL_FORMAT)
    state, meta = read_checkpoint(run / STATE, TRAIN_STATE_FORMAT)
    assert int(meta["step"]) == STEPS
    return {**weights, **{k: v for k, v in state.items() if k.startswith("optim.")}}


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def step_lines(run: Path) -> int:
    try:
        return (run / "log.jsonl").read_text().count('"loss"')
    except FileNotFoundError:
        return 0


def staged(run: Path) -> set[str]:
    """Which of the two checkpoint files have a staged (not yet renamed) version in the folder."""
    return {name for name in (MODEL, STATE) if any(run.glob(f".{name}-*.tmp"))}



def wait_until(proc: subprocess.Popen, condition, timeout: float = TIMEOUT_S) -> bool:
    return _wait_until(proc, condition, timeout, "the training process")


def check_disk(run: Path) -> dict[str, int]:
    """Every checkpoint file present loads (read_checkpoint checks framing, metadata and every tensor);
    config.json parses; every complete log line is JSON. Returns the step each checkpoint file holds."""
    steps = {}
    if (run / MODEL).exists():
        _, meta = read_checkpoint(run / MODEL, MODEL_FORMAT)
        steps[MODEL] = int(meta["config"]["step"])
    if (run / STATE).exists():
        _, meta = read_checkpoint(run / STATE, TRAIN_STATE_FORMAT)
        steps[STATE] = int(meta["step"])
    if (run / "config.json").exists():
        json.loads((run / "config.json").read_text())
    if (run / "log.jsonl").exists():
        for line in (run / "log.jsonl").read_text().splitlines(keepends=True):
            if line.endswith("\n"):  # a kill may cut the last line; a resume drops it
                json.loads(line)
    return steps


@dataclass
class Kill:
    """SIGKILL once `lines` new step lines are logged; then, with `save`, at the next save: "staged" (both
    files staged, neither renamed) or "between" (the model renamed, the training state not yet)."""

    lines: int
    save: str | None = None


@dataclass
class Tally:
    tried: int = 0
    survived: int = 0
    never_saved: int = 0
    windows: dict = field(default_factory=lambda: {"staged": 0, "between": 0})


def reach(proc: subprocess.Popen, run: Path, kill: Kill) -> bool:
    """Wait for the kill point of `kill`; False if the process ends first."""
    base = step_lines(run)
    if not wait_until(proc, lambda: step_lines(run) >= base + kill.lines):
        return False
    if kill.save is None:
        return True
    seen_both = False

    def at_window() -> bool:
        nonlocal seen_both
        now = staged(run)
        if kill.save == "staged":
            return now == {MODEL, STATE}
        seen_both |= now == {MODEL, STATE}
        return seen_both and now == {STATE}

    return wait_until(proc, at_window)


def run_with_kills(data_dir: Path, run: Path, kills: list[Kill]) -> Tally:
    """Train STEPS steps in `run`, killing the process at each of `kills` in turn and resuming after each."""
    tally = Tally()
    fresh = ["--data", str(data_dir), "--out", str(run), *RUN_ARGS, *SAVE_EVERY]
    args = fresh
    for kill in [*kills, None]:
        proc = launch(args, run.parent / run.name, delay=kill is not None and kill.save is not None)
        if kill is None:
            assert proc.wait(TIMEOUT_S) == 0, output(run.parent / run.name)
            break
        if not reach(proc, run, kill):  # the run finished before the kill point
            assert proc.wait(TIMEOUT_S) == 0, output(run.parent / run.name)
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT_S)
        tally.tried += 1
        steps = check_disk(run)
        if kill.save == "between":
            assert steps[MODEL] > steps.get(STATE, -1), ("the kill was aimed between the two renames", steps)
        if kill.save:
            tally.windows[kill.save] += 1
        if steps:
            args = ["--resume", str(run)]
        else:  # killed before the first save: --resume says so, and starting again is safe
            refused = CliRunner().invoke(app, ["train", "--resume", str(run), *COMMON])
            assert refused.exit_code == 2 and "never saved" in refused.output, refused.output
            tally.never_saved += 1
            args = fresh
        tally.survived += 1
    assert not list(run.glob(".*.tmp")), "a resume removes what interrupted saves staged"
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == STEPS
    return tally


def report(tally: Tally, capsys) -> None:
    with capsys.disabled():
        print(f"\n  kills tried {tally.tried}, survived {tally.survived} (inside a save: {tally.windows}; "
              f"before the first save: {tally.never_saved})")


def test_sigkill_at_three_points_then_resume_equals_an_uninterrupted_run(data_dir, reference, tmp_path, capsys):
    """Before the first checkpoint, between the two renames of a save, and with both files of a save staged."""
    run = tmp_path / "run"
    tally = run_with_kills(data_dir, run, [Kill(lines=2), Kill(lines=1, save="between"), Kill(lines=1, save="staged")])
    report(tally, capsys)
    assert tally.tried == tally.survived == 3 and tally.never_saved == 1
    assert tally.windows == {"staged": 1, "between": 1}
    assert_bit_equal(final_tensors(run), reference)
    kept = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert kept["event"] == "start" and kept["kept_aside"] == ["log.unsaved-1.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_seeded_points(data_dir, reference, tmp_path, capsys, seed):
    """Seeded schedules of four kills each: after 1-6 step lines, two in three of them inside a save."""
    rng = random.Random(seed)
    kills = [Kill(lines=rng.randint(1, 6), save=rng.choice([None, "staged", "between"])) for _ in range(4)]
    run = tmp_path / "run"
    tally = run_with_kills(data_dir, run, kills)
    report(tally, capsys)
    assert tally.tried == tally.survived >= 3, kills
    assert_bit_equal(final_tensors(run), reference)


def test_sigterm_saves_exits_143_and_resume_equals_an_uninterrupted_run(data_dir, reference, tmp_path):
    run = tmp_path / "run"
    stem = tmp_path / "run"
    # No step- or time-based save before the signal: whatever is on disk afterwards, SIGTERM saved.
    proc = launch(["--data", str(data_dir), "--out", str(run), *RUN_ARGS, "--save-every", "1000",
                   "--save-minutes", "0"], stem)
    assert wait_until(proc, lambda: step_lines(run) >= 5), output(stem)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT_S) == 128 + signal.SIGTERM == 143, output(stem)
    assert "stopped by SIGTERM" in output(stem) and f"--resume {run}" in output(stem)
    steps = check_disk(run)
    stopped = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"stopped"' in x]
    assert stopped == [{"event": "stopped", "step": steps[STATE], "signal": "SIGTERM"}]
    assert 5 <= steps[MODEL] == steps[STATE] < STEPS
    proc = launch(["--resume", str(run)], stem)
    assert proc.wait(TIMEOUT_S) == 0, output(stem)
    assert_bit_equal(final_tensors(run), reference)
