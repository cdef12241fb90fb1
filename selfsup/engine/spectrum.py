r"""Embedding-spectrum monitor: effective rank, RankMe, alignment and uniformity during pretraining.

The seam: :meth:`Method.training_loss` may return ``"embeddings"``, a dict ``name -> detached tensor``
(e.g. ``{"backbone": h, "projector": z}``), each ``[B, V, D]`` (views sample-major), ``[B, D]`` (one view)
or a tuple of ``V`` tensors ``[B, D]`` (one per view, from methods that run a forward pass per view; they
are stacked only when the monitor computes). :class:`~selfsup.engine.module.SelfSupModule` pops the key
before logging and hands it to Lightning in the step output; nothing else is done with it, so a run with
the monitor off only holds references to tensors the step computed anyway.

Every ``every_n_steps`` optimiser steps (step 0 included) and at the last step, :class:`SpectrumMonitor`
takes the embeddings of **rank 0's local batch** (no gather: no communication, nothing for the other ranks
to wait on; under DDP the statistics describe ``B`` rows per device, not the global batch; with gradient
accumulation, the step's last micro-batch) and computes, for each name (:func:`spectrum_stats`):

* ``spectrum/<name>/effective_rank``: ``exp(H(s / Σs))`` of the singular values ``s`` of the L2-normalised,
  centred rows of view 0 (one row per image; :func:`selfsup.losses.spectrum.effective_rank`);
* ``spectrum/<name>/rankme``: RankMe of the raw rows of view 0;
* ``spectrum/<name>/alignment``: mean ``||ẑ_v − ẑ_w||²`` over pairs of views of an image (``V >= 2`` only);
* ``spectrum/<name>/uniformity``: ``log mean_{i≠j} exp(−2 ||ẑ_i − ẑ_j||²)`` over the images of view 0.

The scalars go to every logger of the trainer (CSV, TensorBoard, W&B) at the step of the batch, the same
step axis as the losses (independently of ``log_every_n_steps``). Each computation also appends one JSON
line to ``RUN_DIR/spectrum.jsonl``::

    {"step": 50, "epoch": 0, "time": 1.7e9, "metrics": {"spectrum/backbone/effective_rank": 31.2, ...},
     "singular_values": {"backbone": [s_1, ..., s_min(B, D)], "projector": [...]}}

which ``selfsup report`` reads for the spectra at several points of training (a resumed run may repeat a
step; the later line wins). Non-finite embeddings or a failed SVD skip that step with one warning instead of
stopping the run (the engine's own check stops on a non-finite loss).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import Tensor

from selfsup.losses.spectrum import alignment, effective_rank, rankme, singular_values, uniformity

__all__ = ["SPECTRUM_FILE", "SpectrumMonitor", "as_views", "spectrum_stats"]

#: File name of the spectrum log inside a run directory.
SPECTRUM_FILE = "spectrum.jsonl"

Embedding = Union[Tensor, tuple, list]


def as_views(emb: Embedding, name: str = "embeddings") -> Tensor:
    """One ``"embeddings"`` entry as a detached float tensor ``[B, V, D]``.

    ``[B, D]`` becomes ``[B, 1, D]``; a tuple / list of ``V`` tensors ``[B, D]`` is stacked along dim 1.
    """
    if isinstance(emb, (tuple, list)):
        if not emb or not all(torch.is_tensor(t) and t.dim() == 2 for t in emb):
            raise ValueError(f"embeddings '{name}': a tuple must hold one [B, D] tensor per view")
        emb = torch.stack([t.detach() for t in emb], dim=1)
    if not torch.is_tensor(emb):
        raise TypeError(f"embeddings '{name}' must be a tensor or a tuple of tensors, got {type(emb).__name__}")
    if emb.dim() == 2:
        emb = emb[:, None]
    if emb.dim() != 3:
        raise ValueError(f"embeddings '{name}' must be [B, V, D] or [B, D], got shape {tuple(emb.shape)}")
    return emb.detach().float()


def spectrum_stats(embeddings: Mapping[str, Embedding]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(scalars, singular values)`` of each named embedding (see the module docstring for the definitions).

    Scalars are keyed ``spectrum/<name>/<stat>``; singular values (descending, of the L2-normalised, centred
    rows of view 0) are keyed by name. An entry with fewer than 2 images is skipped.
    """
    scalars: dict[str, float] = {}
    spectra: dict[str, list[float]] = {}
    for name, emb in embeddings.items():
        z = as_views(emb, name)
        if z.shape[0] < 2:
            continue
        rows = z[:, 0]
        key = f"spectrum/{name}"
        scalars[f"{key}/effective_rank"] = effective_rank(rows).item()
        scalars[f"{key}/rankme"] = rankme(rows).item()
        if z.shape[1] >= 2:
            scalars[f"{key}/alignment"] = alignment(z).item()
        scalars[f"{key}/uniformity"] = uniformity(rows).item()
        spectra[name] = singular_values(rows).cpu().tolist()
    return scalars, spectra


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with one intra-op thread: the matrices are small (``B`` rows), and a threaded
    LAPACK SVD of them on a busy machine waits on its threads (measured: 20 ms with one thread, 1-2 s with two on a
    loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


class SpectrumMonitor(L.Callback):
    """Log the spectrum statistics of the step's ``"embeddings"`` every ``every_n_steps`` steps.

    Args:
        every_n_steps: period in optimiser steps (> 0); step 0 and the last step are always included.
        path: the JSON-lines file the singular values are appended to (``None``: loggers only).

    :attr:`calls` and :attr:`seconds` count the computations and the time they took (bench).
    """

    def __init__(self, every_n_steps: int = 50, path: Optional[Union[str, Path]] = None):
        if every_n_steps < 1:
            raise ValueError(f"spectrum_every_n_steps must be >= 1 (0 turns the monitor off), got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.path = Path(path) if path is not None else None
        self.calls, self.seconds = 0, 0.0
        self._warned = False

    def due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether the batch that just ended closes an optimiser step the monitor scores."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return False
        step = trainer.global_step - 1  # the step this batch trained
        last = trainer.global_step >= int(trainer.estimated_stepping_batches)
        return step % self.every_n_steps == 0 or last

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, Mapping) or not outputs.get("embeddings") or not trainer.is_global_zero:
            return
        if not self.due(trainer, batch_idx):
            return
        t0 = time.perf_counter()
        step = trainer.global_step - 1
        try:
            with _one_cpu_thread(pl_module.device):
                scalars, spectra = spectrum_stats(outputs["embeddings"])
        except (FloatingPointError, RuntimeError, ValueError, TypeError) as e:
            if not self._warned:
                warnings.warn(f"spectrum monitor: step {step} skipped ({type(e).__name__}: {e})", stacklevel=1)
                self._warned = True
            return
        if not scalars:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if self.path is not None:
            record = {
                "step": step,
                "epoch": trainer.current_epoch,
                "time": round(time.time(), 3),
                "metrics": {k: _round(v) for k, v in scalars.items()},
                "singular_values": {k: [_round(x) for x in v] for k, v in spectra.items()},
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.calls += 1
        self.seconds += time.perf_counter() - t0
