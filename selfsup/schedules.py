"""Schedules as pure functions of the optimiser step: the engine's weight-decay schedule and a method's own
hyper-parameters (DINO's teacher temperature, a momentum) read the same functions.

Each value depends only on ``step`` and the run's length, never on state, so a resumed run computes exactly the
values of the uninterrupted one. Steps are optimiser steps, 0-based; ``total`` is the run's number of steps.
"""

from __future__ import annotations

import math

__all__ = ["cosine", "linear_warmup"]


def cosine(base: float, final: float, step: int, total: int) -> float:
    """``final + (base − final)·(1 + cos(π·step/total))/2``: ``base`` at step 0, towards ``final`` at ``total``
    (DINO's ``utils.cosine_scheduler`` without warm-up: its last step ``total − 1`` is just short of ``final``).
    Steps past ``total`` stay at ``final``."""
    if total <= 0:
        return float(base)
    t = min(max(int(step), 0), int(total))
    return float(final + (base - final) * (1.0 + math.cos(math.pi * t / total)) / 2.0)


def linear_warmup(start: float, end: float, step: int, warmup_steps: int) -> float:
    """``np.linspace(start, end, warmup_steps)[step]`` for ``step < warmup_steps``, then ``end`` (DINO's teacher
    temperature warm-up: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs · iters_per_epoch)``)."""
    if step >= warmup_steps:
        return float(end)
    if warmup_steps == 1:
        return float(start)
    return float(start + (end - start) * max(int(step), 0) / (warmup_steps - 1))
