r"""VICReg: variance-invariance-covariance regularisation.

Follows facebookresearch/vicreg, ``main_vicreg.py``, ``VICReg.forward`` (with ``off_diagonal`` and
``FullGatherLayer`` of the same file).

For two ``[N, D]`` projections ``z1, z2`` (row ``i`` of each is a positive pair)::

    inv   = (1 / (N D)) Σ_{n,d} (z1_nd − z2_nd)²                    (MSE, on the raw rows)
    x     = z − mean_n(z)                                            (each branch centred per feature)
    std_d = sqrt(Var_n(x_·d) + eps),  Var unbiased: Σ_n x_nd² / (N − 1)
    var   = ½ mean_d relu(1 − std_d(z1)) + ½ mean_d relu(1 − std_d(z2))
    C(z)  = xᵀ x / (N − 1)                                           ([D, D] covariance)
    cov   = (1 / D) Σ_{i≠j} C(z1)_ij² + (1 / D) Σ_{i≠j} C(z2)_ij²    (summed over branches, not averaged)
    loss  = sim_coeff · inv + std_coeff · var + cov_coeff · cov

Hand cases: ``z1 = z2 = [[1, 1], [−1, −1]]`` has unbiased variance 2 per feature (``std > 1``: ``var = 0``),
``C = [[2, 2], [2, 2]]`` so each branch gives ``(2² + 2²) / 2 = 4`` and ``loss = cov_coeff · 8``; full
collapse (every row equal) gives ``std = sqrt(eps)`` and ``loss = std_coeff · (1 − sqrt(eps))``.

Distributed: a pure function of its (already gathered) inputs. The official code gathers ``x, y`` with
``FullGatherLayer`` (all-gather whose backward all-reduces (SUM) the gradient and keeps this rank's slice, as
:func:`selfsup.distributed.gather`) before the variance and covariance terms, and divides the covariance by
``args.batch_size − 1`` where ``--batch-size`` is the *global* batch (split evenly across GPUs): ``N − 1`` here,
``N`` the gathered rows (the two differ only on a short last batch, which the official loader does not drop).
Its invariance term is the MSE of the *local* rows, before the gather; with equal local batches DDP's averaging
of the per-rank MSEs gives the gradient of the global MSE, so computing ``inv`` on the gathered rows as here
gives the same gradient (only the logged per-rank value differs). float32 inside (float64 stays float64), autocast
off (the official code runs the loss under autocast).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import check_rows, compute_dtype, same_shapes

__all__ = ["vicreg_loss"]


def _off_diagonal_sq_sum(c: Tensor) -> Tensor:
    """``Σ_{i≠j} c_ij²`` of a square matrix (the diagonal masked out, not subtracted: no cancellation)."""
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return c.masked_fill(eye, 0.0).pow(2).sum()


def _std_and_cov(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``mean_d relu(1 − std_d)`` and ``Σ_{i≠j} C_ij² / D`` of one branch ``z [N, D]`` (centred here)."""
    n, d = z.shape
    x = z - z.mean(dim=0)
    std = torch.sqrt(x.var(dim=0, unbiased=True) + eps)
    cov = (x.mT @ x) / (n - 1)
    return F.relu(1.0 - std).mean(), _off_diagonal_sq_sum(cov) / d


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``sim_coeff · inv + std_coeff · var + cov_coeff · cov`` of two ``[N, D]`` projections (module docstring).

    Args:
        z1, z2: ``[N, D]`` projector outputs of views 1 and 2, any floating dtype; gathered across ranks first
            when training distributed (:func:`selfsup.distributed.gather`). ``N >= 2`` (unbiased variance).
        sim_coeff, std_coeff, cov_coeff: the weights λ, μ, ν of the invariance, variance and covariance terms
            (official defaults 25, 25, 1).
        eps: added to the variance under the square root (official 1e-4).
        return_parts: also return ``{"invariance": inv, "variance": var, "covariance": cov}``, the unweighted
            terms, detached 0-d tensors.

    Returns:
        A 0-d float32 tensor (float64 when an input is float64), or ``(loss, parts)``.

    Raises:
        ValueError: shapes differ or are not ``[N, D]``, ``N < 2``, ``eps < 0``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_rows(z1, "z1", "vicreg_loss")
    check_rows(z2, "z2", "vicreg_loss")
    same_shapes({"z1": z1, "z2": z2})
    if z1.shape[0] < 2:
        raise ValueError(
            f"vicreg_loss needs N >= 2 rows (unbiased variance over the batch); got shape {tuple(z1.shape)}"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    dtype = compute_dtype(z1, z2)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        x, y = z1.to(dtype), z2.to(dtype)
        inv = F.mse_loss(x, y)
        std_x, cov_x = _std_and_cov(x, eps)
        std_y, cov_y = _std_and_cov(y, eps)
        var = std_x / 2 + std_y / 2
        cov = cov_x + cov_y
        loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    if not return_parts:
        return loss
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
