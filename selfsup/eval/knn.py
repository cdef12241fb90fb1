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

The classifier is split into three pure pieces so that a bank never has to sit whole in one
place (the distributed monitor in :mod:`selfsup.engine.callbacks` streams it shard by shard):

* :func:`knn_topk`: the ``k`` nearest entries of one bank (or bank shard) per query;
* :func:`merge_topk`: merge the running neighbours with those of the next shard;
* :func:`vote`: the weighted per-class vote.

Neighbours are ordered by **(similarity descending, bank position ascending)**: a tie at the
``k``-th place goes to the entry that comes first in the bank. This order is total, so scoring
the shards of a bank one after the other (in bank order) and merging gives bit-for-bit the
scores of :func:`knn_scores` on the concatenated bank, whatever the shard sizes and ``k``.

These functions are pure (tensors in, tensors out): no distributed code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.features import check_labels

__all__ = ["KNN_PROTOCOLS", "knn_accuracy", "knn_scores", "knn_topk", "merge_topk", "topk_accuracy", "vote"]

#: kNN settings the papers report: ``selfsup`` (k 200, T 0.5: the monitor's and the cpu-small bench's), ``dino``
#: (DINO eval_knn.py as its README reports: weighted 20-NN, T 0.07, on the teacher's backbone).
KNN_PROTOCOLS: dict[str, dict[str, float]] = {
    "selfsup": {"k": 200, "temperature": 0.5},
    "dino": {"k": 20, "temperature": 0.07},
}


def _first_topk(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row with ties broken by the lower column.

    Returns ``(values, columns)``, each ``[rows, k]``, sorted by (value descending, column ascending).
    ``torch.topk`` leaves the choice among equal values to the implementation, so its selection is
    re-ordered by column, and a row where the ``k``-th value also occurs outside the selection is
    redone with a stable full sort (rare with real features).
    """
    val, col = sim.topk(k, dim=1)
    col, order = col.sort(dim=1)
    val = val.gather(1, order)
    val, order = val.sort(dim=1, descending=True, stable=True)
    col = col.gather(1, order)
    kth = val[:, -1:]
    ambiguous = (sim == kth).sum(1) > (val == kth).sum(1)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().flatten()
        v, c = sim[rows].sort(dim=1, descending=True, stable=True)
        val[rows], col[rows] = v[:, :k], c[:, :k]
    return val, col


def knn_topk(
    bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, k: int, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Cosine similarities and labels of each query's ``min(k, N)`` nearest bank entries.

    Args:
        bank_feats: ``[N, F]`` bank (or bank shard) features, any scale (normalised here).
        bank_labels: ``[N]`` integer labels.
        query_feats: ``[Nq, F]``.
        k: neighbours per query; clipped to ``N``.
        chunk_size: queries scored at once (the ``[chunk, N]`` block is the only large temporary).

    Returns:
        ``(sims float32 [Nq, min(k, N)], labels int64 [Nq, min(k, N)])`` on ``bank_feats.device``,
        each row ordered by (similarity descending, bank position ascending). An empty bank gives
        ``[Nq, 0]`` tensors.
    """
    if bank_feats.ndim != 2 or query_feats.ndim != 2:
        raise ValueError("knn expects 2-D feature matrices [N, F]")
    n_bank = bank_feats.shape[0]
    if n_bank and bank_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"feature widths differ: bank {bank_feats.shape[1]} vs query {query_feats.shape[1]}")
    bank_labels = torch.as_tensor(bank_labels)
    if bank_labels.shape != (n_bank,):
        raise ValueError(f"bank labels must have shape [{n_bank}], got {tuple(bank_labels.shape)}")
    if k < 1 or chunk_size < 1:
        raise ValueError("k and chunk_size must be >= 1")
    device = bank_feats.device
    bank_labels = bank_labels.to(device=device, dtype=torch.long)
    k = min(k, n_bank)
    n_q = query_feats.shape[0]
    sims = torch.empty(n_q, k, dtype=torch.float32, device=device)
    labels = torch.empty(n_q, k, dtype=torch.long, device=device)
    if k == 0:
        return sims, labels
    bank = F.normalize(bank_feats.float(), dim=1)
    for start in range(0, n_q, chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].to(device).float(), dim=1)
        val, col = _first_topk(q @ bank.T, k)
        sims[start : start + q.shape[0]] = val
        labels[start : start + q.shape[0]] = bank_labels[col]
    return sims, labels


def merge_topk(sims: Tensor, labels: Tensor, new_sims: Tensor, new_labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge running neighbours with those of the next bank shard; keep the best ``k``.

    ``(sims, labels)`` hold the neighbours found in the earlier shards and ``(new_sims,
    new_labels)`` those of the next one (from :func:`knn_topk`), both ``[Nq, *]`` and ordered by
    (similarity descending, bank position ascending). A stable sort of their concatenation keeps
    that order (earlier shards win ties), so merging shard by shard in bank order selects exactly
    the neighbours of the whole bank. Returns ``[Nq, min(k, k_old + k_new)]`` tensors.
    """
    all_sims = torch.cat([sims, new_sims.to(sims.device)], dim=1)
    all_labels = torch.cat([labels, new_labels.to(labels.device)], dim=1)
    all_sims, order = all_sims.sort(dim=1, descending=True, stable=True)
    keep = min(k, all_sims.shape[1])
    return all_sims[:, :keep], all_labels.gather(1, order[:, :keep])


def vote(sims: Tensor, labels: Tensor, num_classes: int, temperature: float = 0.5) -> Tensor:
    """Per-class sums of the neighbour weights ``exp(sim / T)``: ``float32 [Nq, num_classes]``.

    ``labels`` must lie in ``[0, num_classes)`` (checked); the result always has ``num_classes``
    columns.
    """
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    check_labels(labels, num_classes, "neighbour labels")
    out = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return out.scatter_add_(1, labels.to(sims.device), (sims.float() / temperature).exp())


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
        Equal to :func:`vote` of :func:`knn_topk`.
    """
    if train_feats.ndim == 2 and train_feats.shape[0] == 0:
        raise ValueError("knn_scores: empty feature bank")
    if num_classes < 1 or temperature <= 0:
        raise ValueError("num_classes must be >= 1 and temperature > 0")
    train_labels = torch.as_tensor(train_labels)
    if train_labels.ndim == 1:  # the shape itself is checked by knn_topk
        check_labels(train_labels, num_classes, "train_labels")
    sims, labels = knn_topk(train_feats, train_labels, query_feats, k, chunk_size)
    return vote(sims, labels, num_classes, temperature)


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
    check_labels(query_labels, num_classes, "query_labels")
    scores = knn_scores(train_feats, train_labels, query_feats, num_classes, k, temperature, chunk_size)
    return {"top1": topk_accuracy(scores, query_labels, 1), "top5": topk_accuracy(scores, query_labels, 5)}
