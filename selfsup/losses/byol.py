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

from selfsup.losses.mec import _compute_dtype, _same_shapes, _validate_rows

__all__ = ["byol_loss"]

_NORM_EPS = 1e-12


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_i (2 − 2 cos(p_i, z_i))`` of ``[N, D]`` predictions ``p`` and targets ``z``.

    Raises:
        ValueError: shapes differ or are not ``[N, D]``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    _validate_rows(p, "p", "byol_loss")
    _validate_rows(z, "z", "byol_loss")
    _same_shapes({"p": p, "z": z})
    dtype = _compute_dtype(p, z)
    with torch.autocast(device_type=p.device.type, enabled=False):
        ph = F.normalize(p.to(dtype), dim=1, eps=_NORM_EPS)
        zh = F.normalize(z.to(dtype), dim=1, eps=_NORM_EPS)
        return (2.0 - 2.0 * (ph * zh).sum(dim=1)).mean()
