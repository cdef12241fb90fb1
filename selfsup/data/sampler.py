"""A seeded, rank-sharded epoch sampler that can resume in the middle of an epoch.

The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen, on one process or many. Rank ``r`` of ``W`` takes positions
``r, r + W, ...`` of the permutation; with ``drop_last`` every rank gets the same number of samples
(MMCR's global nuclear norm needs equal local batches).

With ``keyed=True`` it yields ``(epoch, index)`` keys for :class:`selfsup.data.keyed.KeyedDataset`
(per-sample augmentation seeded on them). ``start(epoch)`` (a callable asked when an epoch's iteration
begins) says how many of this rank's samples of that epoch were already trained on: a run resumed from
a mid-epoch checkpoint continues with the next batch. ``len()`` stays the full epoch, as the trainer's
step bookkeeping expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler):
    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        keyed: bool = False,
        start: Optional[Callable[[int], int]] = None,
        epoch: int = 0,
    ):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.keyed, self.start = keyed, start
        self.epoch = int(epoch)  # a resumed run's loader may be iterated before the trainer calls set_epoch

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
        idx = self._indices()
        if self.start is not None:
            idx = idx[max(0, int(self.start(self.epoch))) :]
        if self.keyed:
            return iter([(self.epoch, i) for i in idx])
        return iter(idx)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return -(-self.n // self.world_size)
