r"""MAE reconstruction loss on masked patches (He et al. 2022; spec §2.3) and the masked patch MSE under it.

With ``t = patchify(imgs) [N, L, P]`` (``P = p² C``, see :func:`selfsup.models.masked_vit.patchify`), predictions
``ŷ [N, L, P]`` and the mask ``m [N, L]`` (1 = removed)::

    t̂_{n,l}      = (t_{n,l} − mean_d t_{n,l}) / sqrt(var_d t_{n,l} + 1e-6)     (norm_pix_loss; var unbiased, N−1)
    e_{n,l}      = mean_d (ŷ_{n,l,d} − t̂_{n,l,d})²                             (per-patch MSE)
    mae_loss     = Σ_{n,l} m_{n,l} e_{n,l} / Σ_{n,l} m_{n,l}                    (reduction "mean": all masked
                                                                                 patches of the batch)
    per sample   = Σ_l m_{n,l} e_{n,l} / Σ_l m_{n,l}                            (reduction "none": [N])

Visible patches contribute nothing. With the same number of masked patches in every sample (MAE masking),
the mean of the per-sample values equals the "mean" reduction. Hand case: one 2x2 single-channel patch
``[0, 1, 2, 3]`` predicted as zeros gives ``e = (5/4) / (5/3 + 1e-6) ≈ 0.75`` with norm-pix (unbiased
variance 5/3) and ``e = 14/4 = 3.5`` without.

fp32 inside (float64 stays float64), autocast off: mixed-precision predictions are upcast.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from selfsup.losses.checks import compute_dtype
from selfsup.models.masked_vit import patchify

__all__ = ["mae_loss", "masked_patch_mse", "norm_pix_targets"]

NORM_PIX_EPS = 1e-6


def norm_pix_targets(target: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """Patches ``[..., P]`` normalised by its own mean and **unbiased** variance: ``(t − μ) / sqrt(σ² + eps)``."""
    if target.shape[-1] < 2:
        raise ValueError(f"norm-pix targets need patches of >= 2 values (unbiased variance), got {target.shape[-1]}")
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_patch_mse(
    pred: Tensor, target: Tensor, weight: Tensor, reduction: Literal["mean", "none"] = "mean"
) -> Tensor:
    """``Σ w_{n,l} mean_d (pred − target)² / Σ w_{n,l}``: over the whole batch (``"mean"``, 0-d) or per sample
    (``"none"``, ``[N]``). ``pred, target [N, L, P]``, ``weight [N, L]`` (a 0/1 patch selection).

    Raises:
        ValueError: shapes disagree, an unknown reduction, or the selection is empty (for the batch, or for a
            sample with ``"none"``): a mean over no patch is undefined.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [N, L, P]")
    if weight.shape != pred.shape[:2]:
        raise ValueError(f"mask {tuple(weight.shape)} must be [N, L] = {tuple(pred.shape[:2])}")
    dtype = compute_dtype(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        w = weight.to(dtype)
        per_patch = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)  # [N, L]
        if reduction == "mean":
            total = w.sum()
            if not bool(total > 0):
                raise ValueError("the mask selects no patch: the loss over the selected patches is undefined")
            return (per_patch * w).sum() / total
        counts = w.sum(dim=1)
        if not bool((counts > 0).all()):
            raise ValueError("the mask selects no patch of some sample: its per-sample loss is undefined")
        return (per_patch * w).sum(dim=1) / counts


def mae_loss(
    imgs: Tensor,
    pred: Tensor,
    mask: Tensor,
    patch_size: int,
    norm_pix_loss: bool = True,
    reduction: Literal["mean", "none"] = "mean",
    eps: float = NORM_PIX_EPS,
) -> Tensor:
    """MAE's loss: per-patch MSE between ``pred`` and the (norm-pix) target patches, averaged over masked patches.

    Args:
        imgs: ``[N, C, H, W]`` the clean images the target is made from.
        pred: ``[N, L, p² C]`` predictions in patch order (row, column; inside: pixel row, pixel column, channel).
        mask: ``[N, L]`` with 1 for masked (removed) patches, 0 for visible ones.
        patch_size: ``p``.
        norm_pix_loss: normalise each target patch by its mean and unbiased variance (+ ``eps``).
        reduction: ``"mean"``: one value over every masked patch of the batch; ``"none"``: the per-sample masked
            mean ``[N]`` (what IMLE-SSL scores codes with).

    Returns:
        A 0-d tensor (``"mean"``) or ``[N]`` (``"none"``), float32 (float64 for float64 inputs).
    """
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
    n, c = imgs.shape[:2]
    expected = (n, (imgs.shape[2] // int(patch_size)) ** 2, int(patch_size) ** 2 * c)
    if tuple(pred.shape) != expected:
        raise ValueError(
            f"pred must be [N, L, p² C] = {list(expected)} for images {tuple(imgs.shape)} and "
            f"patch_size {patch_size}, got {tuple(pred.shape)}"
        )
    dtype = compute_dtype(imgs, pred)
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        target = patchify(imgs.to(dtype), patch_size)
        if norm_pix_loss:
            target = norm_pix_targets(target, eps)
        return masked_patch_mse(pred, target, mask, reduction)
