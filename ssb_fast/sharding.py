"""Which cases a process samples, and how the processes of one sharded run meet.

A run's cases are split into K parts: part i takes every K-th case starting at case i (case j of the
run's case list belongs to part j mod K). The rule depends only on the case list, never on timing or
on which part runs first, so every process knows the whole partition and two parts never sample the
same case. K parts come from `--num-parts K --part-id i` (separate jobs: a job array, several
machines sharing a folder) or from torchrun (rank r of W is part r of W, on `cuda:LOCAL_RANK`); both
together split each of the K parts over the W ranks: rank r in part i samples part i + r*K of K*W.

Under torchrun the ranks meet through the process group's key-value store: each adds the masks it
has to do and has done to two counters (no collective, so ranks with more work never block the
others), which lets rank 0 draw one bar over the whole run; a counter of finished ranks followed by a
barrier tells rank 0 when every case file is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

LAUNCHERS = ("single", "parts", "torchrun", "torchrun+parts")


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: `part_id` of `num_parts`, how it was launched, and (under
    torchrun) its rank among `world_size` processes."""

    part_id: int = 0
    num_parts: int = 1
    launcher: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        for name, low in (("num_parts", 1), ("part_id", 0), ("world_size", 1), ("rank", 0), ("local_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        if self.part_id >= self.num_parts:
            raise ValueError(f"part_id must lie in [0, {self.num_parts}) for {self.num_parts} part(s); "
                             f"got {self.part_id}")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {self.launcher!r}")

    @property
    def sharded(self) -> bool:
        return self.num_parts > 1

    @property
    def is_main(self) -> bool:
        """The process that draws the bar and prints: rank 0 under torchrun, every separate job else."""
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"part-{self.part_id}-of-{self.num_parts}"

    def cases(self, n_cases: int) -> list[int]:
        """Indices of this part's cases among `n_cases`: every num_parts-th, starting at part_id."""
        return list(range(self.part_id, n_cases, self.num_parts))

    def to_dict(self) -> dict:
        return {"part_id": self.part_id, "num_parts": self.num_parts, "launcher": self.launcher,
                "rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "rule": "case j belongs to part j mod num_parts"}


def torchrun_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process with more than one rank."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer; got {env.get('WORLD_SIZE')!r}") from None
    if world <= 1:
        return None
    missing = [name for name in ("RANK", "LOCAL_RANK") if name not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} is not: start the "
                         f"processes with torchrun")
    return int(env["RANK"]), world, int(env["LOCAL_RANK"])


def make_shard(num_parts: int | None = None, part_id: int | None = None,
               env: Mapping[str, str] | None = None) -> Shard:
    """The Shard for `--num-parts/--part-id` and torchrun's environment (either, both or neither)."""
    if (num_parts is None) != (part_id is None):
        raise ValueError("--num-parts K and --part-id I go together (part I of K, I in 0..K-1)")
    k, i = (1, 0) if num_parts is None else (int(num_parts), int(part_id))
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"--part-id must lie in 0..{k - 1} for --num-parts {k}; got {i}")
    ranks = torchrun_env(env)
    if ranks is None:
        return Shard(part_id=i, num_parts=k, launcher="parts" if num_parts is not None else "single")
    rank, world, local = ranks
    launcher = "torchrun+parts" if num_parts is not None else "torchrun"
    return Shard(part_id=i + rank * k, num_parts=k * world, launcher=launcher, rank=rank, world_size=world,
                 local_rank=local)


class RankGroup:
    """The torchrun ranks of one run. `store` is a torch.distributed Store (or anything with
    `add(key, n) -> int`); `barrier` a callable. Without a store, each rank reports only its own share."""

    TO_SAMPLE, DONE, FINISHED = "ssb_fast/sample/todo", "ssb_fast/sample/done", "ssb_fast/sample/finished"

    def __init__(self, world_size: int, store=None, barrier: Callable[[], None] | None = None,
                 poll_seconds: float = 0.2):
        self.world_size = int(world_size)
        self.store = store
        self._barrier = barrier
        self.poll_seconds = poll_seconds

    @classmethod
    def from_process_group(cls) -> RankGroup:
        """The initialised default process group of torch.distributed, with its store when reachable."""
        import torch.distributed as dist

        store = None
        try:  # a private accessor, stable for years; without it the bar shows this rank's share
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
        except Exception:
            store = None
        return cls(dist.get_world_size(), store, dist.barrier)

    def _add(self, key: str, n: int) -> int | None:
        if self.store is None:
            return None
        try:
            return int(self.store.add(key, int(n)))
        except Exception:  # a store that went away: fall back to this rank's own numbers
            self.store = None
            return None

    def announce(self, todo_masks: int) -> None:
        """Add this rank's masks to sample to the run's total."""
        self._add(self.TO_SAMPLE, todo_masks)

    def progress(self, done_masks: int = 0) -> tuple[int, int] | None:
        """Add `done_masks` finished masks; return (done, to do) over all ranks, or None without a store."""
        done = self._add(self.DONE, done_masks)
        todo = self._add(self.TO_SAMPLE, 0)
        return None if done is None or todo is None else (done, todo)

    def wait_for_all(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Mark this rank finished, wait until every rank is (calling on_progress(done, todo) while
        waiting), then meet at the barrier, after which every case file of the run exists."""
        if self._add(self.FINISHED, 1) is not None:
            while True:
                finished = self._add(self.FINISHED, 0)
                counts = self.progress(0) if on_progress is not None else None
                if counts is not None:  # read after `finished`: once all are finished, the counts are final
                    on_progress(*counts)
                if finished is None or finished >= self.world_size:
                    break
                time.sleep(self.poll_seconds)
        if self._barrier is not None:
            self._barrier()
