r"""Barlow Twins: the cross-correlation of the two views' batch-normalised projections driven to the identity.

Follows facebookresearch/barlowtwins, ``main.py``, ``BarlowTwins.forward`` (with ``off_diagonal`` of the same
file and the ``nn.SyncBatchNorm.convert_sync_batchnorm`` call of ``main_worker``).

For two ``[N, D]`` projections ``z1, z2`` (row ``n`` of each is a positive pair)::

    bn(z)_nd = (z_nd − μ_d) / sqrt(σ²_d + eps),  μ_d = (1/N) Σ_n z_nd,  σ²_d = (1/N) Σ_n (z_nd − μ_d)²  (biased)
    c        = bn(z1)ᵀ bn(z2) / N                                                                  ([D, D])
    loss     = Σ_i (c_ii − 1)² + λ · Σ_{i≠j} c_ij²

``bn`` is what ``nn.BatchNorm1d(D, affine=False)`` computes in train mode (biased batch variance, ``eps``, no
scale or shift). With ``eps = 0``, ``c_ij`` is the Pearson correlation of feature ``i`` of ``z1`` with feature
``j`` of ``z2``: perfectly correlated, mutually decorrelated features (``c = I``) give 0; ``z2 = −z1`` with
decorrelated features gives ``c = −I`` and ``loss = 4D``. The loss is invariant to a per-feature affine map ``z → a z + b`` (``a > 0``) of
either branch (up to ``eps``).

Distributed: the caller gathers ``z1`` and ``z2`` first (``Method.gather``, i.e.
:func:`selfsup.distributed.gather`); the batch normalisation and ``c`` over the gathered batch are then what the
official code computes with SyncBatchNorm and an all-reduced ``c``. What the official code does with the batch
size: each rank divides its local ``bn(z1)ᵀ bn(z2)`` by ``args.batch_size``, the **global** batch (``--batch-size``,
2048 by default, split as ``batch_size // world_size`` per GPU), and ``torch.distributed.all_reduce`` sums the
ranks' matrices, so ``c = (1 / N_global) Σ_{all rows}``: ``N`` here is the number of gathered rows. (The official
divisor is the configured size even for the short last batch its loader does not drop; here it is the actual
row count.) Gradient scale: the official all-reduce of ``c`` carries no gradient, so each rank back-propagates
through its own share of ``c`` only; SyncBatchNorm's backward all-reduces its statistics, so rank ``r`` receives
``∂L/∂z_r`` and DDP's averaging yields ``1/W`` of the single-process gradient at the same global batch. With the
default ``gather`` (backward sums over ranks) the DDP gradient is the exact single-process gradient, ``W`` times
the official one; ``gather(..., grad="local")`` (``gather_grad="local"``) reproduces the official scale. float32
inside (float64 stays float64), autocast off (the official code runs under autocast).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfsup.losses.checks import check_rows, compute_dtype, same_shapes

__all__ = ["barlow_twins_loss"]


def _batch_norm(z: Tensor, eps: float) -> Tensor:
    """Per-feature standardisation over the rows with the biased variance: ``BatchNorm1d(affine=False)`` in train."""
    mu = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, *, lambd: float = 0.0051, eps: float = 1e-5, return_parts: bool = False
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``Σ_i (c_ii − 1)² + λ Σ_{i≠j} c_ij²`` with ``c = bn(z1)ᵀ bn(z2) / N`` (module docstring).

    Args:
        z1, z2: ``[N, D]`` projector outputs of views 1 and 2, any floating dtype; gathered across ranks first
            when training distributed. ``N >= 2`` (as ``BatchNorm1d`` in train mode).
        lambd: λ, the weight of the off-diagonal (redundancy reduction) term; official default 0.0051.
        eps: added to the batch variance (``BatchNorm1d``'s default 1e-5).
        return_parts: also return ``{"on_diag": Σ_i (c_ii − 1)², "off_diag": Σ_{i≠j} c_ij²}`` (unweighted,
            detached 0-d tensors).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64), or ``(loss, parts)``.

    Raises:
        ValueError: shapes differ or are not ``[N, D]``, ``N < 2``, ``eps < 0``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_rows(z1, "z1", "barlow_twins_loss")
    check_rows(z2, "z2", "barlow_twins_loss")
    same_shapes({"z1": z1, "z2": z2})
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"barlow_twins_loss needs N >= 2 rows (batch normalisation); got shape {tuple(z1.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    dtype = compute_dtype(z1, z2)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        c = _batch_norm(z1.to(dtype), eps).mT @ _batch_norm(z2.to(dtype), eps) / n
        eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        on_diag = (torch.diagonal(c) - 1.0).pow(2).sum()
        off_diag = c.masked_fill(eye, 0.0).pow(2).sum()
        loss = on_diag + lambd * off_diag
    if not return_parts:
        return loss
    return loss, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}
