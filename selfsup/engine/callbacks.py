"""Lightning callbacks: the online kNN monitor.

The monitor follows both MMCR seeds (backbone features, L2-normalised, cosine similarity, top-k vote
weighted by ``exp(sim / T)``, top-1 and top-5) but fixes the official ImageNet code's per-rank
partial banks: each rank embeds its shard of the bank and of the queries, the bank is gathered so
every rank holds the **whole** bank, each rank scores its own queries, and the hit counts are summed.
The class count comes from the dataset.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from selfsup import distributed
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_scores


def knn_counts(bank_f, bank_y, query_f, query_y, num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """``[top1 hits, top5 hits, n]`` for the queries against the bank."""
    if query_f.shape[0] == 0:
        return torch.zeros(3, dtype=torch.float64)
    scores = knn_scores(bank_f, bank_y, query_f, num_classes, k=k, temperature=temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == query_y[:, None]
    return torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), query_y.numel()], dtype=torch.float64)


class KNNMonitor(L.Callback):
    """Online kNN accuracy of the backbone, logged as ``knn/top1`` and ``knn/top5`` (percent).

    Args:
        bank: labelled dataset under the eval transform (the train split).
        test: labelled dataset under the eval transform.
        num_classes: from the dataset.
        every_n_epochs: period; the last epoch is always scored.
        k, temperature: kNN parameters (200 and 0.5 in the seeds).
        batch_size, num_workers: feature-extraction loaders.
    """

    def __init__(self, bank: Dataset, test: Dataset, num_classes: int, every_n_epochs: int = 1, k: int = 200,
                 temperature: float = 0.5, batch_size: int = 512, num_workers: int = 0):
        self.bank, self.test, self.num_classes = bank, test, num_classes
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def _loader(self, ds: Dataset, rank: int, world: int) -> DataLoader:
        shard = Subset(ds, list(range(rank, len(ds), world)))
        return DataLoader(shard, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module, device: torch.device, rank: int = 0, world: int = 1) -> dict:
        bank_f, bank_y = extract_features(backbone, self._loader(self.bank, rank, world), device=device)
        query_f, query_y = extract_features(backbone, self._loader(self.test, rank, world), device=device)
        bank_f = distributed.all_gather_variable(bank_f.to(device))
        bank_y = distributed.all_gather_variable(bank_y.to(device))
        counts = knn_counts(bank_f, bank_y, query_f.to(device), query_y.to(device), self.num_classes, self.k,
                            self.temperature).to(device)
        if distributed.is_dist():
            torch.distributed.all_reduce(counts)
        n = max(counts[2].item(), 1.0)
        return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n,
                "n_bank": int(bank_y.numel()), "n_test": int(counts[2].item())}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or 0) or (0 < trainer.max_steps <= trainer.global_step)
        if not self.every_n_epochs or (epoch % self.every_n_epochs and not last):
            return
        res = self.evaluate(pl_module.method.backbone, pl_module.device, trainer.global_rank, trainer.world_size)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **res})
        pl_module.log_dict({"knn/top1": res["top1"], "knn/top5": res["top5"]}, rank_zero_only=True)
        rank_zero_info(f"epoch {epoch}: kNN top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")

