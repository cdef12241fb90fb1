"""A seeded, rank-sharded epoch sampler.

The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen, on one process or many. Rank ``r`` of ``W`` takes positions
``r, r + W, ...`` of the permutation; with ``drop_last`` every rank gets the same number of samples
(MMCR's global nuclear norm needs equal local batches).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[int]):
    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: (self.n // self.world_size) * self.world_size]
        else:  # pad by wrapping so every rank has the same count
            per = -(-self.n // self.world_size)
            order = (order * 2)[: per * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return -(-self.n // self.world_size)
