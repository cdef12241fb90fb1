r"""BYOL (Grill et al., 2020): online backbone + projector + predictor, EMA target of backbone + projector.

For views ``x1, x2`` (separate forward passes, BatchNorm statistics per view as the original), online
predictions ``p_i = q(g(f(x_i)))`` and target projections ``z_i = g_ξ(f_ξ(x_i))`` computed under no-grad::

    loss = byol_loss(p1, z2) + byol_loss(p2, z1),    byol_loss(p, z) = mean_i (2 - 2 cos(p_i, z_i))

The target ``ξ`` is declared as the teacher ``teacher`` (``--which teacher`` evaluates / exports it) and
follows ``ξ <- τ ξ + (1 - τ) θ`` after every step with τ on a half-cosine from ``tau`` to 1 (BYOL: 0.996;
solo-learn CIFAR: 0.99). Heads as the original: ``F -> 4096 (BN, ReLU) -> 256`` for the projector and
``256 -> 4096 (BN, ReLU) -> 256`` for the predictor, output layers with a bias. The loss is per sample, so
no gather is needed: DDP's gradient averaging gives the global-batch mean. All parameters in one group.
"""

from __future__ import annotations

from typing import Optional

import torch

from selfsup.losses import byol_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class BYOL(Method):
    """BYOL.

    Args:
        backbone: backbone spec ``{name, kwargs}``.
        projector: widths after the backbone feature (BYOL: ``[4096, 256]``).
        predictor_hidden: hidden width of the predictor (BYOL: 4096); its output width is the projector's.
        tau, final_tau: target EMA rate, half-cosine from ``tau`` to ``final_tau`` over the run.
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8], "predictor_hidden": 16}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        predictor_hidden: int = 4096,
        tau: float = 0.996,
        final_tau: float = 1.0,
    ):
        super().__init__(backbone)
        projector = [4096, 256] if projector is None else list(projector)
        self.projector = MLP([self.num_features, *projector], last_bias=True)
        self.predictor = MLP([projector[-1], predictor_hidden, projector[-1]], last_bias=True)
        target = EMATeacher(tau, final_tau=final_tau, backbone=self.backbone, projector=self.projector)
        self.add_teacher("teacher", target)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.check_views(batch.views)
        x1, x2 = batch.views[:, 0], batch.views[:, 1]
        h1, h2 = self.backbone(x1), self.backbone(x2)
        y1, y2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(y1), self.predictor(y2)
        with torch.no_grad():
            z1, z2 = self.teacher(x1), self.teacher(x2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (y1.detach(), y2.detach())}
        return {"loss": loss, "embeddings": embeddings}
