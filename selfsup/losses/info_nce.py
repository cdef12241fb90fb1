r"""InfoNCE / NT-Xent loss (SimCLR).

For ``B`` positive pairs ``(z1_i, z2_i)`` let ``u = [nrm(z1); nrm(z2)] in R^{2B×D}``
(rows L2-normalised, ``nrm(x) = x / max(||x||, 1e-12)``) and ``s_ab = <u_a, u_b> / τ``.
Anchor ``a`` has its positive ``a⁺`` (``i ↔ i + B``) and competes against the other
``2B − 1`` rows (itself excluded)::

    loss = (1 / 2B) Σ_a −log( exp(s_{a a⁺}) / Σ_{b ≠ a} exp(s_ab) )

Hand case: ``B = 2``, ``z1 = z2 = [e1; e2]`` gives ``log(1 + 2 e^{−1/τ})`` for every anchor.
The value depends on the cosines only through ``cos/τ``, is symmetric in
``(z1, z2)`` and invariant to rescaling rows.

A pure function of its (already gathered) inputs: distributed callers gather
``z1`` and ``z2`` with :func:`selfsup.distributed.gather` first, so every anchor sees
the negatives of the whole global batch. float32 inside (float64 stays float64),
autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_positive, check_rows, compute_dtype, same_shapes

__all__ = ["info_nce_loss"]


def info_nce_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Mean over the ``2B`` anchors of ``−log softmax`` of the positive among the other ``2B − 1`` rows.

    Args:
        z1, z2: ``[B, D]`` projections of views 1 and 2; row ``i`` of each is a positive pair.
        temperature: ``τ > 0``, the cosine similarities are divided by it.

    Returns:
        A 0-d float32 tensor (float64 when an input is float64).

    Raises:
        ValueError: shapes differ or are not ``[B, D]``, ``temperature <= 0``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_positive(temperature, "temperature")
    check_rows(z1, "z1", "info_nce_loss")
    check_rows(z2, "z2", "info_nce_loss")
    same_shapes({"z1": z1, "z2": z2})
    b = z1.shape[0]
    dtype = compute_dtype(z1, z2)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        u = F.normalize(torch.cat([z1, z2], dim=0).to(dtype), dim=1, eps=NORM_EPS)
        logits = (u @ u.mT) / temperature
        self_mask = torch.eye(2 * b, dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        idx = torch.arange(b, device=u.device)
        targets = torch.cat([idx + b, idx])
        return F.cross_entropy(logits, targets)
