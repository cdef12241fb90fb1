r"""I-JEPA's loss (Assran et al., CVPR 2023): smooth-L1 between predicted and layer-normed target features.

Follows ``facebookresearch/ijepa`` ``src/train.py`` (``forward_target``: ``F.layer_norm(h, (h.size(-1),))`` on the
target encoder's tokens; ``loss_fn``: ``F.smooth_l1_loss(z, h)``, the default mean reduction and ``beta = 1``).

For predictions ``p`` and raw target-encoder tokens ``t`` of the same shape ``[..., D]`` (I-JEPA: ``[M·B, K, D]``,
``M`` target blocks of ``K`` tokens for each of ``B`` images)::

    t̂_i   = (t_i − mean(t_i)) / sqrt(var(t_i) + 1e-5)          per token i, over its D features, biased variance,
                                                               no affine (F.layer_norm without weight / bias)
    ℓ(x)  = 0.5 x²        if |x| < 1                           (smooth-L1 / Huber with beta = 1)
            |x| − 0.5     otherwise
    loss  = mean over every element (i, d) of ℓ(p_{i,d} − t̂_{i,d})

The target carries no gradient in I-JEPA (the target encoder runs under ``no_grad``); this function does not detach it
(a caller that passes a target with gradient gets the gradient of the formula). Layer-normalising every token and then
selecting the target blocks' tokens (the official order) equals selecting first: the normalisation is per token.
Computed in float32 (float64 stays float64) with autocast off. The mean over all elements is per process: under DDP
each rank's mean over its own (equal-sized) tokens, averaged by DDP's gradient averaging, is the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import check_floating, compute_dtype, same_shapes

__all__ = ["IJEPA_LN_EPS", "ijepa_loss"]

#: eps of the target's layer normalisation (``F.layer_norm``'s default, as the official code).
IJEPA_LN_EPS = 1e-5


def ijepa_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``mean(smooth_l1(pred, layer_norm(target)))`` over all elements, both ``[..., D]`` of the same shape (see the
    module docstring for the formula). Returns a 0-d tensor."""
    layout = "[" + ", ".join([f"n{i}" for i in range(pred.dim() - 1)] + ["D"]) + "]"  # the rank of pred, >= 1
    for name, x in (("pred", pred), ("target", target)):
        check_floating(x, name, "ijepa_loss", layout)
    same_shapes({"pred": pred, "target": target})
    dtype = compute_dtype(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, t = pred.to(dtype), target.to(dtype)
        t = F.layer_norm(t, (t.shape[-1],), eps=IJEPA_LN_EPS)
        return F.smooth_l1_loss(p, t, reduction="mean", beta=1.0)
