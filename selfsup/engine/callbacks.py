"""Lightning callbacks: the online kNN monitor.

The monitor follows both MMCR seeds (backbone features, L2-normalised, cosine similarity, top-k vote
weighted by ``exp(sim / T)``, top-1 and top-5) but fixes the official ImageNet code's per-rank
partial banks (spec §5.1, §8.11): every query is scored against the **whole** bank and the hit
counts of all ranks are summed. The class count comes from the dataset.

The bank is never gathered in one place (1.28M x 2048 fp32 is 10 GB on ImageNet). Each rank embeds
its shard of the bank and of the queries; then for ``r = 0 .. W-1`` rank ``r`` broadcasts its bank
shard (features and labels, sizes may differ), every rank scores its own queries against it
(:func:`selfsup.eval.knn.knn_topk`) and merges the neighbours with those kept so far
(:func:`selfsup.eval.knn.merge_topk`). After the loop each rank votes (:func:`selfsup.eval.knn.vote`)
and the hit counts are all-reduced. Peak memory per rank: its own shard, one received shard and
the ``[n_queries, k]`` neighbours. Merging in rank order gives exactly the result of one kNN over the
rank-ordered concatenation of the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from selfsup import distributed
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_topk, merge_topk, vote


def knn_counts(scores: Tensor, query_y: Tensor) -> Tensor:
    """``float64 [top-1 hits, top-5 hits, n]`` of class scores ``[Nq, C]`` (top-5 over ``min(5, C)``)."""
    if scores.shape[0] == 0:
        return torch.zeros(3, dtype=torch.float64)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit = top == query_y.to(top.device)[:, None]
    return torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), query_y.numel()], dtype=torch.float64)


def monitored_backbone(method: torch.nn.Module, which: str = "online") -> torch.nn.Module:
    """The module mapping images to pooled features that the monitor scores.

    ``method.backbone_for(which)`` (``online`` or a declared teacher name); a method without
    ``backbone_for`` offers only its ``backbone`` (``which="online"``).
    """
    backbone_for = getattr(method, "backbone_for", None)
    if backbone_for is not None:
        return backbone_for(which)
    if which != "online":
        raise ValueError(
            f"cannot monitor the {which!r} backbone: {type(method).__name__} has no backbone_for(), only which='online'"
        )
    return method.backbone


@contextlib.contextmanager
def rank0_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Under DDP, give ``module`` rank 0's buffers (BatchNorm running statistics) for the block, then restore.

    Without SyncBN each rank's last training forward updates its own running statistics, so the ranks
    would embed their shards with slightly different models; rank 0's is the one checkpointed, and the
    one DDP broadcasts at the next forward anyway.
    """
    if not distributed.is_dist():
        yield
        return
    buffers = list(module.buffers())
    saved = [b.detach().clone() for b in buffers]
    for b in buffers:
        torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        for b, s in zip(buffers, saved):
            b.copy_(s)


class KNNMonitor(L.Callback):
    """Online kNN accuracy of a backbone, logged as ``knn/top1`` and ``knn/top5`` (percent).

    Each evaluation appends ``{"epoch", "step", "top1", "top5", "n_bank", "n_test"}`` to
    :attr:`history` (saved in checkpoints).

    Args:
        bank: labelled dataset under the eval transform (the train split).
        test: labelled dataset under the eval transform.
        num_classes: from the dataset.
        every_n_epochs: period; the last epoch is always scored.
        k, temperature: kNN parameters (200 and 0.5 in the seeds).
        batch_size, num_workers: feature-extraction loaders.
        which: the backbone scored: ``online`` or a teacher name the method declares (e.g. ``teacher``).
    """

    def __init__(
        self,
        bank: Dataset,
        test: Dataset,
        num_classes: int,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.5,
        batch_size: int = 512,
        num_workers: int = 0,
        which: str = "online",
    ):
        self.bank, self.test, self.num_classes = bank, test, num_classes
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.batch_size, self.num_workers, self.which = batch_size, num_workers, which
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def _embed(
        self, backbone: torch.nn.Module, ds: Dataset, device: torch.device, rank: int, world: int
    ) -> tuple[Tensor, Tensor]:
        """Features (on ``device``) and labels of this rank's shard ``ds[rank::world]``; ``[0, 0]`` if empty."""
        shard = Subset(ds, list(range(rank, len(ds), world)))
        if len(shard) == 0:
            return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        loader = DataLoader(shard, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        f, y = extract_features(backbone, loader, device=device)
        return f.to(device), y.to(device)

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module, device: torch.device, rank: int = 0, world: int = 1) -> dict:
        """Score this rank's queries against every rank's bank shard; returns the reduced accuracies."""
        with rank0_buffers(backbone):
            bank_f, bank_y = self._embed(backbone, self.bank, device, rank, world)
            query_f, query_y = self._embed(backbone, self.test, device, rank, world)
        shape = torch.tensor([bank_f.shape[0], max(bank_f.shape[1], query_f.shape[1])], device=device)
        if distributed.is_dist():
            shapes = [torch.zeros_like(shape) for _ in range(world)]
            torch.distributed.all_gather(shapes, shape)
        else:
            shapes = [shape]
        sizes = [int(s[0]) for s in shapes]
        width = max(int(s[1]) for s in shapes)
        top_s = torch.zeros(query_f.shape[0], 0, device=device)
        top_y = torch.zeros(query_f.shape[0], 0, dtype=torch.long, device=device)
        if query_f.shape[0] == 0:
            query_f = torch.zeros(0, width, device=device)
        for r, n in enumerate(sizes):
            if n == 0:
                continue
            if r == rank:
                shard_f, shard_y = bank_f.float().contiguous(), bank_y.contiguous()
            else:
                shard_f = torch.empty(n, width, device=device)
                shard_y = torch.empty(n, dtype=torch.long, device=device)
            if len(sizes) > 1:
                torch.distributed.broadcast(shard_f, src=r)
                torch.distributed.broadcast(shard_y, src=r)
            s, y = knn_topk(shard_f, shard_y, query_f, self.k)
            top_s, top_y = merge_topk(top_s, top_y, s, y, self.k)
            del shard_f, shard_y
        scores = vote(top_s, top_y, self.num_classes, self.temperature)
        counts = knn_counts(scores, query_y).to(device)
        if distributed.is_dist():
            torch.distributed.all_reduce(counts)
        n = max(counts[2].item(), 1.0)
        return {
            "top1": 100.0 * counts[0].item() / n,
            "top5": 100.0 * counts[1].item() / n,
            "n_bank": sum(sizes),
            "n_test": int(counts[2].item()),
        }

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or 0) or (0 < trainer.max_steps <= trainer.global_step)
        if not self.every_n_epochs or (epoch % self.every_n_epochs and not last):
            return
        backbone = monitored_backbone(pl_module.method, self.which)
        res = self.evaluate(backbone, pl_module.device, trainer.global_rank, trainer.world_size)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **res})
        pl_module.log_dict({"knn/top1": res["top1"], "knn/top5": res["top5"]}, rank_zero_only=True)
        rank_zero_info(f"epoch {epoch}: kNN top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
