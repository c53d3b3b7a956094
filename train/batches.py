"""Which dataset items each rank reads at each step: a resumable, distributed shuffled stream.

The stream is the concatenation of per-epoch permutations seeded by (seed, epoch). Step s takes
positions [s * B * W, (s + 1) * B * W), and rank r the r-th block of B of them. A step's batch is a
pure function of (seed, step, rank, world size), so resuming at step s needs no sampler state.
"""

from __future__ import annotations

import torch
from ssb_fast.kernels.noise import hash_seed


class ShuffledStream:
    def __init__(self, n_items: int, seed: int):
        if n_items < 1:
            raise ValueError("the training split is empty")
        self.n_items, self.seed = n_items, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(hash_seed(self.seed, "epoch", epoch))
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n_items, generator=g)
        return self._perms[epoch]

    def batch_indices(self, step: int, batch: int, rank: int = 0, world: int = 1) -> list[int]:
        start = (step * world + rank) * batch
        return [int(self._perm(p // self.n_items)[p % self.n_items]) for p in range(start, start + batch)]
