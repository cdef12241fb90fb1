"""Lightning callback: held-out reconstruction loss of a masked-image model during pretraining (IMLE-SSL's
``pretrain/loss_te`` and its ``*_baseline``, spec §3.4).

For every held-out image a random mask (and, for a latent-code model, ``num_codes`` random codes, whose losses are
averaged: the expectation under the prior, not a minimum) gives the masked-mean loss; the logged value is the mean
over the images. Masks and codes come from a generator seeded once (``seed``), so every evaluation of a run, and
the baseline, score the same masks and codes: the curve moves only because the model does.

* ``val/recon_loss_baseline``: before the first step, codes ignored (with ``init_from`` the pretrained MAE, from
  scratch the freshly initialised model); logged once at step 0.
* ``val/recon_loss``: every ``every_n_epochs`` epochs and after the last.

The method must offer ``heldout_loss(imgs, generator, num_codes)`` (the MAE family; ``num_codes=0``: codes
ignored). Rank 0 evaluates; the others go on to their next collective.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ReconstructionMonitor"]


class ReconstructionMonitor(L.Callback):
    """Held-out masked reconstruction loss (see the module docstring).

    Args:
        images: labelled split under the eval transform (labels unused).
        every_n_epochs: period (0 = only the baseline and the end of training).
        num_codes: random codes averaged per image (latent-code models).
        seed: masks and codes.
        batch_size: images per pass.
    """

    def __init__(
        self, images: Dataset, every_n_epochs: int = 1, num_codes: int = 128, seed: int = 0, batch_size: int = 32
    ):
        if every_n_epochs < 0 or num_codes < 1:
            raise ValueError(f"every_n_epochs must be >= 0 and num_codes >= 1, got {every_n_epochs}, {num_codes}")
        self.images, self.every_n_epochs, self.num_codes = images, every_n_epochs, num_codes
        self.seed, self.batch_size = seed, batch_size
        self.history: list[dict] = []
        self._x: Optional[Tensor] = None

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def evaluate(self, method: torch.nn.Module, device: torch.device, num_codes: int) -> float:
        """Mean held-out loss of ``method`` (``num_codes=0``: codes ignored)."""
        if self._x is None:
            self._x = torch.cat([x for x, *_ in DataLoader(self.images, batch_size=256)])
        gen = torch.Generator(device=device).manual_seed(self.seed)
        was = method.training
        method.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                losses = method.heldout_loss(self._x.to(device), gen, num_codes, chunk=self.batch_size)
        finally:
            method.train(was)
        return float(losses.mean())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.global_step > 0 or any(h.get("baseline") for h in self.history):
            return
        loss = self.evaluate(pl_module.method, pl_module.device, 0)
        self.history.append({"epoch": 0, "step": 0, "loss": loss, "baseline": True})
        if trainer.logger:
            trainer.logger.log_metrics({"val/recon_loss_baseline": loss}, step=0)
        rank_zero_info(f"held-out reconstruction loss before training (codes ignored): {loss:.4f}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or 0) or (0 < trainer.max_steps <= trainer.global_step)
        if (not self.every_n_epochs or epoch % self.every_n_epochs) and not last:
            return
        if trainer.global_rank != 0:
            return
        loss = self.evaluate(pl_module.method, pl_module.device, self.num_codes)
        self.history.append({"epoch": epoch, "step": trainer.global_step, "loss": loss})
        pl_module.log("val/recon_loss", loss, rank_zero_only=True)
        rank_zero_info(f"epoch {epoch}: held-out reconstruction loss {loss:.4f}")
