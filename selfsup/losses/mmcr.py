r"""Maximum Manifold Capacity Representations (MMCR) losses.

Notation: ``B`` images per step, ``V`` views per image, ``D`` projector width,
``||A||_*`` the nuclear norm (sum of singular values) and
``nrm(x) = x / max(||x||_2, 1e-12)`` applied along the **feature** axis.

For projector outputs ``z[b, v] in R^D`` (sample-major ``[B, V, D]``):

1. each view is L2-normalised over its features: ``ẑ_{b,v} = nrm(z_{b,v})``;
2. the centroid of image ``b`` is the plain mean of its views,
   ``c_b = (1/V) Σ_v ẑ_{b,v}`` (**not** re-normalised, so ``||c_b|| <= 1``);
3. the global term is ``G = ||C||_*`` with ``C = [c_1; ...; c_B] in R^{B×D}``;
4. the optional local term is ``L = Σ_b ||Z_b||_*`` with ``Z_b = [ẑ_{b,1}; ...; ẑ_{b,V}]``;
5. ``loss = λ · L / B − G``.

Only the local term is averaged over the batch, so loss values scale with ``B``
and are not comparable across batch sizes. For ``B <= D`` the optimum of the
global term is ``G = B`` (loss ``-B`` at λ = 0), reached when all views of an
image coincide and the centroids are mutually orthogonal; full collapse (every
output the same vector) gives ``G = sqrt(B)`` (loss ``-sqrt(B)``). In general
``G <= sqrt(min(B, D)) · sqrt(B)``.

Both functions are pure functions of their (already gathered) inputs: a
distributed caller gathers with :func:`selfsup.distributed.gather` first. The
maths always runs in float32 (float64 inputs stay float64) with autocast
disabled, because SVD kernels have no half-precision implementation and the
nuclear norm is sensitive to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_floating, compute_dtype

__all__ = ["mmcr_loss", "mmcr_momentum_loss"]


def _local_nuclear(z_hat: Tensor) -> Tensor:
    """``Σ_b ||Z_b||_*`` for normalised views ``[B, V, D]`` (batched SVD)."""
    return torch.linalg.svdvals(z_hat).sum()


def _finish(
    loss: Tensor, global_nuc: Tensor, local_nuc: Tensor | None, return_parts: bool
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    if not return_parts:
        return loss
    if local_nuc is None:
        local_nuc = torch.zeros((), dtype=global_nuc.dtype, device=global_nuc.device)
    return loss, {"global_nuc": global_nuc.detach(), "local_nuc": local_nuc.detach()}


def mmcr_loss(z: Tensor, lmbda: float = 0.0, return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""MMCR loss ``λ · Σ_b ||Z_b||_* / B − ||C||_*`` of projector outputs ``z``.

    Args:
        z: ``[B, V, D]`` projector outputs, sample-major (``z[b, v]`` is view ``v``
            of image ``b``), any floating dtype. Already gathered across ranks
            when training distributed.
        lmbda: weight λ of the local (per-image) nuclear-norm term. The local
            SVDs are only computed when ``lmbda != 0``.
        return_parts: also return ``{"global_nuc": G, "local_nuc": L}`` (detached
            0-d tensors on ``z``'s device; ``local_nuc`` is zero when λ = 0).

    Returns:
        A 0-d float32 tensor (float64 for float64 input), or ``(loss, parts)``.

    Maths (see the module docstring): ``ẑ_{b,v} = z_{b,v} / max(||z_{b,v}||, 1e-12)``,
    ``c_b = mean_v ẑ_{b,v}``, ``G = ||C||_*``, ``L = Σ_b ||Z_b||_*``. Bounds for
    λ = 0 and ``B <= D``: ``-B <= loss <= 0``; mutually orthogonal images with
    identical views give ``-B``, full collapse gives ``-sqrt(B)``.

    Raises:
        ValueError: ``z`` is not 3-D (the message names the shape) or is empty.
        TypeError: ``z`` is not a floating-point tensor.
        FloatingPointError: ``z`` contains NaN or Inf.
    """
    check_floating(z, "z", "mmcr_loss", "[B, V, D]")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z_hat = F.normalize(z.to(compute_dtype(z)), dim=-1, eps=NORM_EPS)
        centroids = z_hat.mean(dim=1)  # [B, D], deliberately not re-normalised
        return _nuclear_objective(z_hat, centroids, lmbda, return_parts)


def mmcr_momentum_loss(
    z: Tensor, z_ema: Tensor, lmbda: float = 0.0, return_parts: bool = False
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""MMCR loss with a momentum (EMA) branch, as OFF-MMCR's ``MMCR_Momentum``.

    Both branches see the same views. Each view of each branch is normalised over
    its features, and the centroid mixes the two branch means equally::

        c_b  = ½ (mean_v ẑ^{online}_{b,v} + mean_v ẑ^{ema}_{b,v})
        loss = λ · Σ_b ||Z_b^{online}||_* / B − ||C||_*

    ``z_ema`` is detached here, so gradients reach ``z`` only (through half of
    each centroid). With ``z_ema == z`` the value equals :func:`mmcr_loss`.
    Non-finite values raise instead of being dropped.

    Args:
        z: online projector outputs ``[B, V, D]``.
        z_ema: momentum-branch outputs, same shape as ``z``.
        lmbda: weight of the local term (online views only).
        return_parts: as in :func:`mmcr_loss`.
    """
    check_floating(z, "z", "mmcr_loss", "[B, V, D]")
    check_floating(z_ema, "z_ema", "mmcr_momentum_loss", "[B, V, D]")
    if z.shape != z_ema.shape:
        raise ValueError(
            f"z and z_ema must have the same shape [B, V, D]; got {tuple(z.shape)} and {tuple(z_ema.shape)}"
        )
    with torch.autocast(device_type=z.device.type, enabled=False):
        z_hat = F.normalize(z.to(compute_dtype(z)), dim=-1, eps=NORM_EPS)
        ema_hat = F.normalize(z_ema.detach().to(compute_dtype(z_ema)), dim=-1, eps=NORM_EPS).to(z_hat.dtype)
        centroids = 0.5 * (z_hat.mean(dim=1) + ema_hat.mean(dim=1))
        return _nuclear_objective(z_hat, centroids, lmbda, return_parts)


def _nuclear_objective(
    z_hat: Tensor, centroids: Tensor, lmbda: float, return_parts: bool
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``λ · Σ_b ||Z_b||_* / B − ||C||_*`` from normalised views ``z_hat`` and centroids ``C`` (fp32, no autocast)."""
    global_nuc = torch.linalg.svdvals(centroids).sum()
    local_nuc: Tensor | None = None
    loss = -global_nuc
    if lmbda != 0:
        local_nuc = _local_nuclear(z_hat)
        loss = lmbda * local_nuc / z_hat.shape[0] - global_nuc
    return _finish(loss, global_nuc, local_nuc, return_parts)
