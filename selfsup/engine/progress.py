"""Progress for logs: one line per logging interval when the output is not a terminal.

A tqdm bar redraws its line with carriage returns; written to a file (a SLURM log, ``> run.log``, a CI job) that is
one line of hundreds of kilobytes. ``trainer.progress_bar: auto`` (the default) shows the bar on a terminal and
:class:`LineProgress` otherwise; ``bar`` / ``true`` forces the bar, ``lines`` the lines, ``none`` / ``false``
neither. Each line is complete and flushed::

    epoch 2 step 540/1100 (49%)  loss -0.7012  lr 0.0012  1.16 steps/s  eta 8.0 min
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO, Union

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["LineProgress", "progress_mode"]


def progress_mode(setting: Union[bool, str], stream: Optional[TextIO] = None) -> str:
    """``bar``, ``lines`` or ``none`` for a ``trainer.progress_bar`` setting; ``auto`` asks whether ``stream``
    (default ``sys.stdout``) is a terminal."""
    if setting is True or setting == "bar":
        return "bar"
    if setting is False or setting == "none":
        return "none"
    if setting == "lines":
        return "lines"
    if setting == "auto":
        stream = sys.stdout if stream is None else stream
        return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    raise ValueError(f"trainer.progress_bar must be auto, bar, lines, none, true or false; got {setting!r}")


class LineProgress(Callback):
    """Every ``every_n_steps`` optimiser steps (and at the last one), on global rank 0: one line with the epoch,
    step, the logged ``train/loss`` and ``train/lr``, steps per second over the interval and the remaining time."""

    def __init__(self, every_n_steps: int, stream: Optional[TextIO] = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every, self.stream = int(every_n_steps), stream
        self._last: Optional[tuple[int, float]] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, total = (
            trainer.global_step,
            trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches,
        )
        if not trainer.is_global_zero or self._last is None or step == self._last[0]:
            return
        if step % self.every and step != total:
            return
        now = time.perf_counter()
        rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        line = f"epoch {trainer.current_epoch} step {step}"
        if total and total != float("inf"):
            line += f"/{int(total)} ({100 * step / total:.0f}%)"
        metrics = trainer.callback_metrics
        for key, name, fmt in (("train/loss", "loss", ".4f"), ("train/lr", "lr", ".3g")):
            if key in metrics:
                line += f"  {name} {float(metrics[key]):{fmt}}"
        line += f"  {rate:.2f} steps/s"
        if total and total != float("inf") and rate > 0:
            line += f"  eta {(total - step) / rate / 60:.1f} min"
        print(line, file=self.stream or sys.stdout, flush=True)
