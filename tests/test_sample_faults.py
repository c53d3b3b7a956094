"""Interrupted sampling: `ssb-fast sample` processes killed with SIGKILL at chosen points (after N case files
appear, while a case's files are being written, aimed with the test-only delay before each rename, and
while the run's files are assembled), each followed by `--continue`.

After every kill each case file in cases/ loads, holds the whole case, and every file drawn from it is
there (a case is marked finished only by its .npz, written last); a samples.npz present loads. The
interrupted-and-continued run ends with every case complete and, file for file, byte-identical to an
uninterrupted run (all but the records that hold times: args.json, summary.json, run.json).

The default suite tries four kills; `-m slow` adds seeded schedules of many more (at least 10 in all).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _helpers import sample_cli
from _helpers import wait_until as _wait_until

from ssb_fast.atomic import REPLACE_DELAY_ENV
from ssb_fast.sample_folder import CASES_DIR, case_paths, read_case_file
from ssb_fast.samples_io import SAMPLES_FILE, read_samples_npz

N_SAMPLES, N_CASES = 2, 5
SAMPLE_ARGS = ["--split", "train", "--cases", str(N_CASES), "--n-samples", str(N_SAMPLES), "--nfe", "3",
               "--max-batch", "2", "--seed", "3", "--device", "cpu", "--threads", "1", "--no-progress"]
DELAY_S = 0.08  # sleep before each rename when a kill is aimed at a write
TIMEOUT_S = 300
TIMED = {"args.json", "summary.json", "run.json", ".lock"}  # records with times, devices or arguments


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """The files of an uninterrupted run (relative path -> bytes), sampled in this process on one thread."""
    run, data = tiny_run
    out = tmp_path_factory.mktemp("sample_faults") / "straight"
    threads = torch.get_num_threads()
    try:
        result = sample_cli("--model", run, "--data", data, "--out", out, *SAMPLE_ARGS)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return folder_bytes(out)


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in TIMED}


def launch(args: list[str], log: Path, delay: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != REPLACE_DELAY_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if delay:
        env[REPLACE_DELAY_ENV] = str(DELAY_S)
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "ssb_fast.cli", "sample", *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)



def wait_until(proc: subprocess.Popen, condition, timeout: float = TIMEOUT_S) -> bool:
    return _wait_until(proc, condition, timeout, "the sampling process")


def case_files(out: Path) -> list[Path]:
    return sorted((out / CASES_DIR).glob("*.npz")) if (out / CASES_DIR).is_dir() else []


def staged_in(folder: Path, name_glob: str) -> bool:
    """A staged (written or being written, not yet renamed) file matching `.<name_glob>-*.tmp` in `folder`."""
    return folder.is_dir() and any(folder.glob(f".{name_glob}-*.tmp"))


# Kill points: "cases" (once `n` more case files exist), "case_npz" (a case file staged), "case_maps" (a file of a
# case's folder staged), "samples", "summary", "run" (that assembled file staged), "time" (after `n` tenths of a s).
KINDS = ("cases", "case_npz", "case_maps", "samples", "summary", "run", "time")


@dataclass
class Kill:
    kind: str
    n: int = 1

    @property
    def delay(self) -> bool:
        return self.kind not in ("cases", "time")


@dataclass
class Tally:
    tried: int = 0
    passed: int = 0
    finished_first: int = 0
    kinds: dict = field(default_factory=dict)


def reach(proc: subprocess.Popen, out: Path, kill: Kill) -> bool:
    cases = out / CASES_DIR
    if kill.kind == "cases":
        base = len(case_files(out))
        return wait_until(proc, lambda: len(case_files(out)) >= base + kill.n)
    if kill.kind == "time":
        return _sleep(proc, 0.1 * kill.n)
    if kill.kind == "case_npz":
        return wait_until(proc, lambda: staged_in(cases, "*.npz"))
    if kill.kind == "case_maps":
        return wait_until(proc, lambda: cases.is_dir() and any(staged_in(d, "*") for d in cases.iterdir()
                                                                 if d.is_dir()))
    name = {"samples": SAMPLES_FILE, "summary": "summary.json", "run": "run.json"}[kill.kind]
    return wait_until(proc, lambda: staged_in(out, name))


def _sleep(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


def check_disk(out: Path) -> int:
    """Every case file present loads and holds its whole case, with every file drawn from it beside it; a
    samples.npz present loads. Returns the number of finished cases."""
    files = case_files(out)
    stems = [p.stem for p in files]
    for path, paths in zip(files, case_paths(out, stems)):
        case = read_case_file(path)
        assert case["samples"].shape[0] == N_SAMPLES and case["labels"].shape == (N_SAMPLES,), path
        missing = [p.name for p in paths.derived(png=True) if not p.exists()]
        assert not missing, f"{path.name} marks its case finished without {missing}"
    if (out / SAMPLES_FILE).exists():
        assert read_samples_npz(out).n_scans == N_CASES
    return len(files)


def run_with_kills(tiny_run, out: Path, kills: list[Kill]) -> Tally:
    run, data = tiny_run
    args = ["--model", str(run), "--data", str(data), "--out", str(out), *SAMPLE_ARGS]
    log = out.parent / f"{out.name}.log"
    tally = Tally()
    resume: list[str] = []
    for kill in [*kills, None]:
        proc = launch([*args, *resume], log, delay=kill is not None and kill.delay)
        if kill is None or not reach(proc, out, kill):
            assert proc.wait(TIMEOUT_S) == 0, log.read_text()[-3000:]
            if kill is not None:
                tally.finished_first += 1
                resume = ["--continue"]
                continue
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT_S)
        tally.tried += 1
        tally.kinds[kill.kind] = tally.kinds.get(kill.kind, 0) + 1
        check_disk(out)
        tally.passed += 1
        if (out / "args.json").exists() or case_files(out):
            resume = ["--continue"]
    assert check_disk(out) == N_CASES
    return tally


def assert_same_as_reference(out: Path, reference: dict[str, bytes]) -> None:
    got = folder_bytes(out)
    leftovers = sorted(k for k in got if k.endswith(".tmp"))
    assert not leftovers, f"staged files of interrupted writes are left in the run folder: {leftovers}"
    assert sorted(got) == sorted(reference)
    differ = [k for k in reference if got[k] != reference[k]]
    assert not differ, f"{len(differ)} files differ from the uninterrupted run, e.g. {differ[:5]}"


def report(tally: Tally, capsys) -> None:
    with capsys.disabled():
        print(f"\n  sampling kills tried {tally.tried}, passed {tally.passed} ({tally.kinds}; "
              f"finished before the kill point: {tally.finished_first})")


def test_sigkill_after_cases_inside_a_case_write_and_in_assembly_then_continue(tiny_run, reference, tmp_path,
                                                                                 capsys):
    """After the first case file, while a case file is staged, while a case's maps are written, and while
    samples.npz is assembled; then --continue gives the uninterrupted run's bytes."""
    out = tmp_path / "out"
    tally = run_with_kills(tiny_run, out, [Kill("cases", 1), Kill("case_npz"), Kill("case_maps"), Kill("samples")])
    report(tally, capsys)
    assert tally.tried == tally.passed == 4 and tally.finished_first == 0, tally
    assert_same_as_reference(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_seeded_points(tiny_run, reference, tmp_path, capsys, seed):
    """Seeded schedules of five kills each, of every kind."""
    rng = random.Random(seed)
    kills = [Kill(rng.choice(KINDS), rng.randint(1, 8)) for _ in range(5)]
    out = tmp_path / "out"
    tally = run_with_kills(tiny_run, out, kills)
    report(tally, capsys)
    assert tally.tried == tally.passed >= 3, (kills, tally)
    assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigkill_in_every_assembly_write(tiny_run, reference, tmp_path, capsys):
    """samples.npz, then summary.json, then run.json staged when the kill comes."""
    out = tmp_path / "out"
    tally = run_with_kills(tiny_run, out, [Kill("samples"), Kill("summary"), Kill("run")])
    report(tally, capsys)
    assert tally.tried == tally.passed == 3, tally
    assert_same_as_reference(out, reference)
