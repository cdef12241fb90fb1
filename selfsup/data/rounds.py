r"""Epochs of a fixed example set (IMLE-SSL's epoch, spec §3.2): which examples, in which order.

A method that works on a fixed set of examples per epoch (IMLE-SSL searches a latent code for each of them
before training on them) declares an :class:`EpochPlan`. The engine then runs epochs of this shape:

    S_e   = examples of epoch e: positions [e·E, (e+1)·E) of the stream π_0 ++ π_1 ++ ...   (E = examples)
            with π_r a permutation of 0..n−1 keyed on (seed, r)   (identity without shuffle)
    S_e,r = S_e[r::W]                         rank r of W (the search runs sharded: every rank its own part)
    b     = |S_e,r| // B                      minibatches of one pass (B = per-device batch, last partial dropped)
    steps = max(1, iterations // b) · b       optimiser steps of the epoch (the seed's ``passes · n_batches``)
    pass p: S_e,r in an order keyed on (seed, e, p), cut into b minibatches

Each example of the dataset is drawn ``k`` or ``k − 1`` times over a run (the seeds' ``KOrKMinusOne``), and
everything is a pure function of ``(seed, epoch)``: a resumed run sees the same examples in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset, Sampler

from selfsup.data.keyed import key_seed

__all__ = ["EpochPlan", "IndexOnly", "RoundSampler", "epoch_examples", "rank_examples", "steps_per_epoch"]

_STREAM_PERM, _STREAM_PASS = 0x4B4B4D, 0x9A55


@dataclass(frozen=True)
class EpochPlan:
    """What a method asks of the engine's epochs (see the module docstring).

    Attributes:
        examples: ``E``, examples drawn per epoch over all ranks (IMLE-SSL's ``ex_per_epoch``).
        iterations: optimiser steps per epoch asked for (``ipe``); the epoch runs ``max(1, ipe // b) · b``.
        shuffle: shuffle the example stream and each pass (the seeds' ``shuffle_data``).
    """

    examples: int
    iterations: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        for name in ("examples", "iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} per epoch must be an integer >= 1, got {v}")


def epoch_examples(n: int, plan: EpochPlan, epoch: int, seed: int) -> list[int]:
    """``S_e``: the ``plan.examples`` dataset indices of ``epoch`` (each index at most once when ``E <= n``)."""
    if n < 1:
        raise ValueError("cannot draw examples from an empty dataset")
    if plan.examples > n:
        raise ValueError(
            f"examples per epoch ({plan.examples}) exceed the {n} training images: an epoch would hold "
            "an example twice; lower examples_per_epoch"
        )
    e = plan.examples
    start = int(epoch) * e
    r, off = divmod(start, n)
    out: list[int] = []
    while len(out) < e:
        if plan.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(key_seed(seed, r, _STREAM_PERM))).tolist()
        else:
            perm = list(range(n))
        out.extend(perm[off : off + e - len(out)])
        r, off = r + 1, 0
    return out


def rank_examples(n: int, plan: EpochPlan, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """``S_e,r``: this rank's share of the epoch's examples."""
    if plan.examples % world_size:
        raise ValueError(
            f"examples per epoch ({plan.examples}) must be a multiple of the number of processes "
            f"({world_size}): every rank searches and trains on the same number of examples"
        )
    return epoch_examples(n, plan, epoch, seed)[rank::world_size]


def steps_per_epoch(plan: EpochPlan, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps of one epoch, ``max(1, ipe // b) · b`` with ``b = (E / W) // B``."""
    per_rank = plan.examples // world_size
    b = per_rank // batch_size
    if b < 1:
        raise ValueError(
            f"data.batch_size={batch_size} per device is larger than the {per_rank} examples each of the "
            f"{world_size} process(es) gets per epoch; raise examples_per_epoch or lower data.batch_size"
        )
    return max(1, plan.iterations // b) * b


class IndexOnly(Dataset):
    """``dataset[(epoch, i)] -> (empty tensor, -1, i)``: the training loader of a planned epoch yields indices only
    (the views come from the engine's epoch cache, not from decoding the images again)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        return torch.empty(0, dtype=torch.uint8), -1, int(i)


class RoundSampler(Sampler):
    """Keys ``(epoch, index)`` of a planned epoch for this rank, pass after pass (``len`` = steps · B).

    ``start(epoch)`` says how many of the epoch's keys were already trained on (mid-epoch resume).
    """

    def __init__(
        self,
        n: int,
        plan: EpochPlan,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start: Optional[Callable[[int], int]] = None,
    ):
        self.n, self.plan, self.batch_size, self.seed = int(n), plan, int(batch_size), int(seed)
        self.rank, self.world_size, self.epoch, self.start = int(rank), int(world_size), int(epoch), start
        self.steps = steps_per_epoch(plan, self.batch_size, self.world_size)
        rank_examples(self.n, plan, 0, seed, rank, world_size)  # the divisibility check, early

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """This rank's dataset indices of ``epoch`` in training order, all passes concatenated."""
        mine = rank_examples(self.n, self.plan, epoch, self.seed, self.rank, self.world_size)
        b = len(mine) // self.batch_size
        passes = self.steps // b
        out: list[int] = []
        for p in range(passes):
            if self.plan.shuffle:
                g = torch.Generator().manual_seed(key_seed(self.seed, epoch, p, _STREAM_PASS))
                perm = torch.randperm(len(mine), generator=g).tolist()
            else:
                perm = list(range(len(mine)))
            out.extend(mine[j] for j in perm[: b * self.batch_size])
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.order(self.epoch)
        if self.start is not None:
            idx = idx[max(0, int(self.start(self.epoch))) :]
        return iter([(self.epoch, i) for i in idx])

    def __len__(self) -> int:
        return self.steps * self.batch_size
