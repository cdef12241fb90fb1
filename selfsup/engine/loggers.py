"""The run's logger: CSV (default), TensorBoard or W&B, and a CSV logger that continues a resumed run's file.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a resumed run lost every curve logged
before the resume (and ``selfsup report`` with it). :class:`ResumableCSVLogger` keeps the rows logged before the
checkpoint's step and drops the later ones: the resumed run logs those steps again.
"""

from __future__ import annotations

import csv
import os
from typing import Optional

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from selfsup.engine.config import TrainerConfig

__all__ = ["ResumableCSVLogger", "build_logger"]


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that, given ``resume_step``, keeps the rows of an existing ``metrics.csv`` whose ``step`` is below
    it (the header too), then appends as usual."""

    def __init__(self, *args, resume_step: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is not None or rank_zero_only.rank != 0 or self._resume_step is None:
            return super().experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        kept, keys = [], []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                kept = [r for r in reader if _step(r) is not None and _step(r) < self._resume_step]
        exp = super().experiment  # Lightning's writer: deletes metrics.csv
        if keys:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            exp.metrics_keys = sorted(keys)  # later rows append under this header (a new key rewrites it, rows kept)
        return exp


def _step(row: dict) -> Optional[int]:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def build_logger(cfg: TrainerConfig, resume_step: Optional[int] = None):
    """``trainer.logger``: ``none`` (False), ``csv`` (continues the file of a run resumed at ``resume_step``),
    ``tensorboard`` or ``wandb`` (both continue their own files)."""
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        # Flushed at every logging step (default: every 100), so a killed run keeps its curves for `selfsup report`.
        return ResumableCSVLogger(
            cfg.out_dir,
            name="logs",
            version="",
            resume_step=resume_step,
            flush_logs_every_n_steps=max(1, cfg.log_every_n_steps),
        )
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(cfg.out_dir, name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=cfg.out_dir)
