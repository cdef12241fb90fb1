"""Lightning callback: few-shot accuracy of the backbone during pretraining (IMLE-SSL's fast probe, spec §3.4).

Every ``every_n_epochs`` epochs (and after the last) rank 0 runs :func:`selfsup.eval.fewshot.few_shot_eval`
on the monitored backbone (``online`` or a declared teacher) and logs ``fewshot/acc`` and ``fewshot/ci95``
(percent). The other ranks do nothing and wait at their next collective; the evaluation uses no collective
itself. The backbone runs frozen in eval mode and its train/eval flags are restored.

The seed's fast probe is ``FewShotConfig(n_way=-1, n_shot=50, n_query=-1, episodes=1, classifier="linear")`` over
the IMLE training subset (support) and the matching validation subset (query), see
:func:`selfsup.data.subsets.matching_subset`.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from selfsup.engine.callbacks import monitored_backbone
from selfsup.eval.fewshot import FewShotConfig, few_shot_eval

__all__ = ["FewShotMonitor"]


class FewShotMonitor(L.Callback):
    """Few-shot accuracy logged as ``fewshot/acc`` with its interval ``fewshot/ci95``.

    Each evaluation appends ``{"epoch", "step", "acc", "ci95", "episodes"}`` to :attr:`history` (saved in
    checkpoints).

    Args:
        support, query: labelled splits under the eval transform (``query is support``: one split, disjoint).
        config: the evaluation (:class:`selfsup.eval.fewshot.FewShotConfig`).
        every_n_epochs: period (0 = off); the last epoch is always scored.
        support_augmented: support images under the training augmentation (``config.augs_per_image > 0``).
        batch_size, num_workers: feature extraction.
        which: ``online`` or a teacher the method declares.
    """

    def __init__(
        self,
        support: Dataset,
        query: Dataset,
        config: Optional[FewShotConfig] = None,
        every_n_epochs: int = 1,
        support_augmented: Optional[Dataset] = None,
        batch_size: int = 256,
        num_workers: int = 0,
        which: str = "online",
    ):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.support, self.query, self.support_augmented = support, query, support_augmented
        self.config = config or FewShotConfig()
        self.every_n_epochs, self.which = every_n_epochs, which
        self.batch_size, self.num_workers = batch_size, num_workers
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or 0) or (0 < trainer.max_steps <= trainer.global_step)
        if not self.every_n_epochs or (epoch % self.every_n_epochs and not last):
            return
        if trainer.global_rank != 0:
            return
        backbone = monitored_backbone(pl_module.method, self.which)
        res = few_shot_eval(
            backbone,
            self.support,
            self.query,
            self.config,
            support_augmented=self.support_augmented,
            device=pl_module.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        self.history.append(
            {
                "epoch": epoch,
                "step": trainer.global_step,
                "acc": res.accuracy,
                "ci95": res.ci95,
                "episodes": res.episodes,
            }
        )
        metrics = {"fewshot/acc": res.accuracy}
        if math.isfinite(res.ci95):  # one episode has no interval
            metrics["fewshot/ci95"] = res.ci95
        pl_module.log_dict(metrics, rank_zero_only=True)
        rank_zero_info(f"epoch {epoch}: few-shot {res.summary}")
