r"""SimCLR (Chen et al., 2020): backbone + MLP projector + NT-Xent over the global batch.

Both views go through one forward pass (SimCLR concatenates them into one batch), ``z = g(f(x))``. The
projections of view 1 and view 2 are gathered over ranks **with gradients** (every rank's rows are
negatives for every other rank's, and each rank's gradient reaches its own rows), then::

    loss = info_nce_loss(z1, z2, T)
         = (1 / 2N) Σ_i [ ℓ(i, i+N) + ℓ(i+N, i) ],   ℓ(a, b) = -log exp(s_ab / T) / Σ_{c ≠ a} exp(s_ac / T)

with ``s`` the cosine similarity over the 2N gathered rows (N images). Published values: projector
``F -> 2048 -> 128``, T 0.1 (ImageNet, large batches); solo-learn CIFAR: ``F -> 2048 -> 256``, T 0.2.
"""

from __future__ import annotations

from typing import Optional

import torch

from selfsup.losses import info_nce_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class SimCLR(Method):
    """SimCLR with a configurable projector and temperature.

    Args:
        backbone: backbone spec ``{name, kwargs}``.
        projector: widths after the backbone feature: ``[2048, 128]`` gives
            ``F -> 2048 (BN, ReLU) -> 128``.
        temperature: NT-Xent temperature ``T``.
        gather_distributed: negatives from every rank (recommended; off = per-rank negatives).
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8]}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        temperature: float = 0.1,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone)
        projector = [2048, 128] if projector is None else list(projector)
        self.projector = MLP([self.num_features, *projector])
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        b, _ = self.check_views(batch.views)
        h = self.backbone(batch.views.flatten(0, 1))
        z = self.projector(h).view(b, 2, -1)  # sample-major rows
        loss = info_nce_loss(self.gather(z[:, 0]), self.gather(z[:, 1]), temperature=self.temperature)
        return {"loss": loss, "embeddings": {"backbone": h.detach().reshape(b, 2, -1), "projector": z.detach()}}
