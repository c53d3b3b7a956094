"""Sharded sampling: `--num-parts` parts and torchrun ranks write the very files one process writes, into one
folder, without corrupting it; the run is assembled once every case is there (by the last part, by
`--continue` without parts, or by rank 0 after all ranks are done)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _helpers import sample_cli
from PIL import Image
from typer.testing import CliRunner

import ssb_fast.sample_run as sample_run
from ssb_fast.sample_folder import ARGS_FILE, CASES_DIR, PARTS_DIR, RUN_FILE, SUMMARY_FILE, read_case_file
from ssb_fast.sample_run import sample_dataset
from ssb_fast.samples_io import SAMPLES_FILE, read_samples_npz
from ssb_fast.sharding import RankGroup, Shard, make_shard

runner = CliRunner()
FAST = ["--n-samples", "4", "--nfe", "2", "--device", "cpu", "--threads", "1"]
N_CASES = 5


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


sample = sample_cli


def base_args(run) -> list:
    run_dir, data = run
    return ["--model", run_dir, "--data", data, "--split", "train", "--cases", N_CASES, *FAST]


@pytest.fixture(scope="module")
def single(run, tmp_path_factory) -> Path:
    """The same 5 cases sampled by one process."""
    out = tmp_path_factory.mktemp("single") / "out"
    result = sample(*base_args(run), "--out", out)
    assert result.exit_code == 0, result.output
    return out


def case_files(out: Path) -> dict[str, bytes]:
    """Every file under OUT/cases, by its path relative to OUT."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / CASES_DIR).rglob("*")) if p.is_file()}


def assert_same_run(out: Path, single: Path) -> None:
    """Byte-identical case files and samples.npz, and the same arrays in it."""
    got, want = case_files(out), case_files(single)
    assert sorted(got) == sorted(want)
    assert [name for name in got if got[name] != want[name]] == []
    assert (out / SAMPLES_FILE).read_bytes() == (single / SAMPLES_FILE).read_bytes()
    a, b = read_samples_npz(out), read_samples_npz(single)
    assert np.array_equal(a.samples, b.samples) and a.case_ids == b.case_ids and np.array_equal(a.experts, b.experts)


# ---- the partition ------------------------------------------------------------------------------------------
def test_parts_take_every_kth_case_and_cover_the_run_once():
    for k in (1, 2, 3, 7):
        parts = [Shard(part_id=i, num_parts=k, launcher="parts").cases(10) for i in range(k)]
        assert parts == [list(range(10))[i::k] for i in range(k)]
        assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(ValueError, match=r"part_id must lie in \[0, 2\)"):
        Shard(part_id=2, num_parts=2)


def test_torchrun_ranks_become_parts():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    shard = make_shard(env=env)
    assert (shard.part_id, shard.num_parts, shard.launcher, shard.local_rank) == (3, 4, "torchrun", 1)
    assert not shard.is_main and make_shard(env={**env, "RANK": "0"}).is_main
    both = make_shard(num_parts=2, part_id=1, env=env)  # rank r of W in part i of K: part i + r*K of K*W
    assert (both.part_id, both.num_parts, both.launcher) == (1 + 3 * 2, 8, "torchrun+parts")
    ranks = [make_shard(2, i, {"WORLD_SIZE": "4", "RANK": str(r), "LOCAL_RANK": "0"}).cases(40)
             for i in range(2) for r in range(4)]
    assert sorted(sum(ranks, [])) == list(range(40))
    assert make_shard(env={"WORLD_SIZE": "1"}) == Shard()
    with pytest.raises(ValueError, match="go together"):
        make_shard(part_id=1, env={})
    with pytest.raises(ValueError, match="RANK"):
        make_shard(env={"WORLD_SIZE": "2"})


class DictStore:
    """The one Store method RankGroup uses, shared between threads like torch's TCPStore between ranks."""

    def __init__(self):
        self.values: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, key: str, n: int) -> int:
        with self.lock:
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]


def test_rank_zero_sees_the_work_of_every_rank():
    store = DictStore()
    ranks = [RankGroup(2, store, poll_seconds=0.001) for _ in range(2)]
    ranks[0].announce(10)
    ranks[1].announce(6)
    assert ranks[0].progress(4) == (4, 16)
    assert ranks[1].progress(6) == (10, 16)
    seen = []
    waiter = threading.Thread(target=ranks[0].wait_for_all, args=(lambda done, todo: seen.append((done, todo)),))
    waiter.start()
    ranks[0].progress(6)  # rank 0's last chunk lands while it waits (as if reported just before)
    ranks[1].wait_for_all()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and seen[-1] == (16, 16)
    assert RankGroup(2).progress(3) is None  # without a store each rank reports only its own share


# ---- parts in one folder --------------------------------------------------------------------------------
def test_two_parts_then_continue_give_the_files_of_one_process(run, single, tmp_path):
    out = tmp_path / "out"
    first = sample(*base_args(run), "--num-parts", 2, "--part-id", 0, "--out", out)
    assert first.exit_code == 0, first.output
    assert "part 0 of 2 (parts): 3 of 5 case(s)" in first.output
    assert "2 of 5 case(s) are not in" in first.output and "--continue" in first.output
    assert sorted(p.name for p in (out / CASES_DIR).glob("*.npz")) == [
        "synthetic_00000.npz", "synthetic_00003.npz", "synthetic_00005.npz"]  # cases 0, 2, 4 of the split
    assert not (out / SAMPLES_FILE).exists() and not (out / SUMMARY_FILE).exists()
    assert (out / PARTS_DIR / "part-0-of-2.json").exists()

    second = sample(*base_args(run), "--num-parts", 2, "--part-id", 1, "--out", out)
    assert second.exit_code == 0, second.output
    assert "sampled 2 case(s)" in second.output and "assembled with the 3 case(s) of the other parts" in second.output
    assert_same_run(out, single)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [(p["part"], p["cases"]) for p in summary["parts"]] == [("part-0-of-2", 3), ("part-1-of-2", 2)]
    assert [c["sampled_by"] for c in summary["cases"]] == ["part-0-of-2", "part-1-of-2"] * 2 + ["part-0-of-2"]
    record = json.loads((out / RUN_FILE).read_text())
    assert record["shard_layout"]["num_parts"] == 2 and len(record["parts"]) == 2

    again = sample(*base_args(run), "--continue", "--out", out)  # the "done when" command: nothing left to sample
    assert again.exit_code == 0, again.output
    assert "reused 5 finished case(s)" in again.output and "sampled" not in again.output
    assert_same_run(out, single)


def test_continue_without_parts_samples_the_missing_part_and_assembles(run, single, tmp_path):
    out = tmp_path / "out"
    assert sample(*base_args(run), "--num-parts", 2, "--part-id", 1, "--out", out).exit_code == 0
    result = sample(*base_args(run), "--continue", "--out", out)
    assert result.exit_code == 0, result.output
    assert "sampled 3 case(s)" in result.output and "reused 2 finished case(s)" in result.output
    assert_same_run(out, single)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [p["part"] for p in summary["parts"]] == ["part-1-of-2", "part-0-of-1"]


def test_parts_refuse_to_mix_runs(run, tmp_path):
    out = tmp_path / "out"
    assert sample(*base_args(run), "--num-parts", 2, "--part-id", 0, "--out", out).exit_code == 0
    before = case_files(out), (out / ARGS_FILE).read_bytes()
    twice = sample(*base_args(run), "--num-parts", 2, "--part-id", 0, "--out", out)
    assert twice.exit_code == 2 and "part 0 of 2 already ran" in twice.output
    other = sample(*base_args(run), "--num-parts", 2, "--part-id", 1, "--out", out, "--seed", 3)
    assert other.exit_code == 2 and "seed 0 there, 3 now" in other.output
    fewer = sample(*[a if a != N_CASES else 4 for a in base_args(run)], "--num-parts", 2, "--part-id", 1,
                   "--out", out)
    assert fewer.exit_code == 2 and "every part must be given the same scans" in fewer.output
    layout = sample(*base_args(run), "--num-parts", 3, "--part-id", 1, "--out", out)
    assert layout.exit_code == 2 and "already holds a sampling run" in layout.output
    assert (case_files(out), (out / ARGS_FILE).read_bytes()) == before  # nothing was touched
    whole = tmp_path / "whole"
    assert sample(*base_args(run), "--out", whole).exit_code == 0
    late = sample(*base_args(run), "--num-parts", 2, "--part-id", 1, "--out", whole)
    assert late.exit_code == 2 and "already holds a sampling run; pass --continue" in late.output


@pytest.mark.parametrize("args, message", [
    (["--num-parts", "2"], "go together"),
    (["--part-id", "0"], "go together"),
    (["--num-parts", "2", "--part-id", "2"], "--part-id must lie in 0..1"),
])
def test_bad_part_options_exit_2(run, tmp_path, args, message):
    result = sample(*base_args(run), *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ssb_fast.cli", "sample", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def _every_file_reads(out: Path) -> None:
    """Every file the run left is whole: JSON parses, arrays load, pictures decode, case files check."""
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    assert not [p for p in files if p.name.endswith(".tmp")]  # no staged file left behind
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        elif p.suffix == ".png":
            with Image.open(p) as img:
                img.verify()
        elif p.parent.name == CASES_DIR and p.suffix == ".npz":
            read_case_file(p)
    read_samples_npz(out)


def test_two_processes_writing_their_parts_at_once(run, single, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli(*base_args(run), "--num-parts", 2, "--part-id", i, "--out", out),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for i in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("wrote" in o for o in outputs) >= 1  # the last to finish assembled the run
    _every_file_reads(out)
    assert_same_run(out, single)
    args = json.loads((out / ARGS_FILE).read_text())
    assert args["shard"]["num_parts"] == 2 and args["case_ids"] == read_samples_npz(single).case_ids
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["part-0-of-2.json", "part-1-of-2.json"]


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(run, single, tmp_path):
    """torchrun --nproc-per-node 2 with gloo: each rank samples its part; rank 0 assembles after both are done."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssb_fast.cli", "sample", *map(str, base_args(run)), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("wrote ") == 1 and "part 0 of 2 (torchrun, rank 0 of 2)" in done.stdout
    _every_file_reads(out)
    assert_same_run(out, single)
    record = json.loads((out / RUN_FILE).read_text())
    assert [p["launcher"] for p in record["shard_layout"]["parts"]] == ["torchrun", "torchrun"]
    assert [p["cases"] for p in record["shard_layout"]["parts"]] == [3, 2]


def test_only_rank_zero_draws_the_bar_over_every_rank(run, single, tmp_path, monkeypatch):
    """Rank 0 of two (rank 1 simulated through a shared store): its bar counts masks over both ranks."""
    bars = []

    @contextlib.contextmanager
    def recording_bar(description, total, enabled=True, fields="", unit="it"):
        calls = []
        bars.append({"description": description, "total": total, "enabled": enabled, "unit": unit, "calls": calls})
        yield lambda n=1, **kw: calls.append((n, kw))

    monkeypatch.setattr(sample_run, "progress_bar", recording_bar)
    run_dir, data = run
    out = tmp_path / "out"
    opts = dict(split="train", cases=N_CASES, n_samples=4, nfe=2, device="cpu")
    # rank 1's part, written as separate part 1 of 2 (the same files), then its counters in the store
    sample_dataset(run_dir, data, out, shard=Shard(part_id=1, num_parts=2, launcher="parts"), **opts)
    store = DictStore()
    store.add(RankGroup.TO_SAMPLE, 8)
    store.add(RankGroup.DONE, 8)
    store.add(RankGroup.FINISHED, 1)
    shard = Shard(part_id=0, num_parts=2, launcher="torchrun", rank=0, world_size=2)
    summary = sample_dataset(run_dir, data, out, shard=shard, group=RankGroup(2, store, poll_seconds=0.001), **opts)
    bar = bars[-1]
    assert bar["enabled"] and bar["unit"] == "masks" and bar["description"] == "sampling masks, all ranks"
    assert bar["calls"][-1] == (0, {"completed": 20, "total": 20})  # 12 masks of rank 0 + 8 of rank 1
    assert summary["assembled"] and summary["sampled_cases"] == 3
    assert_same_run(out, single)
    # a rank other than 0 draws nothing and leaves the assembly to rank 0
    store = DictStore()
    store.add(RankGroup.FINISHED, 1)
    other = Shard(part_id=1, num_parts=2, launcher="torchrun", rank=1, world_size=2)
    result = sample_dataset(run_dir, data, tmp_path / "rank1", shard=other, group=RankGroup(2, store), **opts)
    assert not bars[-1]["enabled"] and not result["assembled"] and result["assembled_by"] == "rank 0"
    assert not (tmp_path / "rank1" / SAMPLES_FILE).exists()
