r"""SimSiam's symmetrised negative cosine with a stop-gradient on the projections.

Follows facebookresearch/simsiam, ``main_simsiam.py``, ``train`` (the loss line, with
``criterion = nn.CosineSimilarity(dim=1)``) and ``simsiam/builder.py``, ``SimSiam.forward`` (which returns
``z1.detach(), z2.detach()``).

For predictions ``p1, p2`` and projections ``z1, z2`` (rows of ``[N, D]`` tensors, row ``i`` of each from
image ``i``)::

    loss = −½ ( mean_i cos(p1_i, z2_i) + mean_i cos(p2_i, z1_i) ),   cos(a, b) = <nrm a, nrm b>

with ``nrm(x) = x / max(||x||, 1e-12)``. ``z1, z2`` are detached inside (the stop-gradient), so gradients
reach ``p1, p2`` only. Range ``[−1, 1]``: aligned pairs give −1, orthogonal 0, opposite +1. (The official
``nn.CosineSimilarity`` uses ``eps = 1e-8`` on the norms: identical unless a row's norm is below 1e-8.)

Purely per-sample, so no gather is needed when distributed: with equal local batches DDP's gradient averaging
of the per-rank means is the single-process gradient of the global mean (the official code gathers nothing).
float32 inside (float64 stays float64), autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_rows, compute_dtype, same_shapes

__all__ = ["simsiam_loss"]


def _mean_cos(p: Tensor, z: Tensor) -> Tensor:
    return (F.normalize(p, dim=1, eps=NORM_EPS) * F.normalize(z, dim=1, eps=NORM_EPS)).sum(dim=1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """``−(mean_i cos(p1_i, z2_i) + mean_i cos(p2_i, z1_i)) / 2`` with ``z`` detached (module docstring).

    Args:
        p1, p2: ``[N, D]`` predictor outputs of views 1 and 2.
        z1, z2: ``[N, D]`` projector outputs of views 1 and 2 (the targets; detached here).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64).

    Raises:
        ValueError: shapes differ or are not ``[N, D]``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    for name, t in (("p1", p1), ("p2", p2), ("z1", z1), ("z2", z2)):
        check_rows(t, name, "simsiam_loss")
    same_shapes({"p1": p1, "p2": p2, "z1": z1, "z2": z2})
    dtype = compute_dtype(p1, p2, z1, z2)
    with torch.autocast(device_type=p1.device.type, enabled=False):
        a = _mean_cos(p1.to(dtype), z2.detach().to(dtype))
        b = _mean_cos(p2.to(dtype), z1.detach().to(dtype))
        return -(a + b) / 2
