r"""BYOL's normalised-MSE loss.

For predictions ``p_i`` and targets ``z_i`` (rows of ``[N, D]`` tensors)::

    loss = mean_i || nrm(p_i) − nrm(z_i) ||² = mean_i (2 − 2 cos(p_i, z_i))

so identical directions give 0, orthogonal ones 2 and opposite ones 4. The
target is used as given: callers detach it (BYOL's target network runs under
``no_grad``). Purely per-sample, so no gather is needed when distributed: with
equal local batches DDP's gradient averaging of the per-rank means is the
single-process gradient of the global mean. float32 inside (float64 stays
float64), autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_rows, compute_dtype, same_shapes

__all__ = ["byol_loss"]


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_i (2 − 2 cos(p_i, z_i))`` of ``[N, D]`` predictions ``p`` and targets ``z``.

    Raises:
        ValueError: shapes differ or are not ``[N, D]``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_rows(p, "p", "byol_loss")
    check_rows(z, "z", "byol_loss")
    same_shapes({"p": p, "z": z})
    dtype = compute_dtype(p, z)
    with torch.autocast(device_type=p.device.type, enabled=False):
        ph = F.normalize(p.to(dtype), dim=1, eps=NORM_EPS)
        zh = F.normalize(z.to(dtype), dim=1, eps=NORM_EPS)
        return (2.0 - 2.0 * (ph * zh).sum(dim=1)).mean()
