r"""Weighted k-nearest-neighbour classifier on frozen features (the MMCR kNN monitor).

The maths shared by both MMCR reference implementations (spec §5.1), done without their
pitfalls:

* bank features :math:`b_j` (train split, eval transform) and query features :math:`q_i` are
  L2-normalised, the similarity is the cosine :math:`s_{ij} = \hat q_i \cdot \hat b_j`;
* for each query keep its :math:`k` most similar bank entries (:math:`k` is clipped to the bank
  size), weight each by :math:`w_{ij} = \exp(s_{ij} / T)` and sum the weights per class:

  .. math:: \mathrm{score}_{ic} = \sum_{j \in \mathrm{top}_k(i)} \exp(s_{ij}/T)\,[y_j = c];

* the prediction is :math:`\arg\max_c \mathrm{score}_{ic}`; top-1 and top-5 are reported.

The score matrix always has exactly ``num_classes`` columns (never inferred from the labels that
happen to appear among the neighbours, spec §5.1 last bullet), and queries are processed in
chunks so that the ``[chunk, N_bank]`` similarity block is the only large temporary
(a 10k x 50k problem needs ~200 MB at ``chunk_size=1024``).

These functions are pure (tensors in, tensors out): no distributed code. To evaluate
across ranks, gather the bank and the queries first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_scores", "knn_accuracy", "topk_accuracy"]


def _check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-class kNN scores of each query against a labelled feature bank.

    Args:
        train_feats: bank features ``[N, F]`` (any scale; normalised here).
        train_labels: bank labels ``[N]``, integers in ``[0, num_classes)``.
        query_feats: query features ``[Nq, F]``.
        num_classes: number of columns of the result (always explicit).
        k: number of neighbours; clipped to ``N``.
        temperature: ``T`` in the weight ``exp(cos_sim / T)``.
        chunk_size: number of queries scored at once.

    Returns:
        ``float32 [Nq, num_classes]`` summed neighbour weights, on ``train_feats.device``.
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2:
        raise ValueError("knn_scores expects 2-D feature matrices [N, F]")
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"feature widths differ: bank {train_feats.shape[1]} vs query {query_feats.shape[1]}")
    train_labels = torch.as_tensor(train_labels)
    n_bank = train_feats.shape[0]
    if n_bank == 0:
        raise ValueError("knn_scores: empty feature bank")
    if train_labels.shape != (n_bank,):
        raise ValueError(f"train_labels must have shape [{n_bank}], got {tuple(train_labels.shape)}")
    if num_classes < 1 or k < 1 or chunk_size < 1:
        raise ValueError("num_classes, k and chunk_size must be >= 1")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")

    device = train_feats.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    _check_labels(train_labels, num_classes, "train_labels")

    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, n_bank)
    out = torch.zeros(query_feats.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].to(device).float(), dim=1)
        sim = q @ bank.T  # [c, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [c, k]
        weights = (top_sim / temperature).exp()
        out[start : start + q.shape[0]].scatter_add_(1, train_labels[top_idx], weights)
    return out


def topk_accuracy(scores: Tensor, labels: Tensor, k: int = 1) -> float:
    """Percentage of rows of ``scores [N, C]`` whose label is among the ``min(k, C)`` largest.

    Ties are broken by ``torch.topk`` (implementation-defined order). Returns ``nan`` for N = 0.
    """
    if scores.shape[0] == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    correct = (top == labels.to(top.device).view(-1, 1)).any(dim=1)
    return 100.0 * int(correct.sum().item()) / correct.numel()


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """kNN top-1 / top-5 accuracy (percent) of labelled queries against a bank.

    Same arguments as :func:`knn_scores` plus ``query_labels [Nq]``. Top-5 uses
    ``min(5, num_classes)`` candidates.

    Returns:
        ``{"top1": float, "top5": float}`` in percent.
    """
    query_labels = torch.as_tensor(query_labels, dtype=torch.long)
    if query_labels.shape != (query_feats.shape[0],):
        raise ValueError("query_labels must have one entry per query")
    _check_labels(query_labels, num_classes, "query_labels")
    scores = knn_scores(train_feats, train_labels, query_feats, num_classes, k, temperature, chunk_size)
    return {"top1": topk_accuracy(scores, query_labels, 1), "top5": topk_accuracy(scores, query_labels, 5)}
