"""MMCR: maximum manifold capacity representations (Yerxa et al.), spec §1.1-1.3.

All ``B x V`` views go through one forward pass (sample-major), the projector outputs are reshaped
to ``[B, V, D]``, gathered over ranks with the autograd-aware ``selfsup.distributed.gather`` (so the
nuclear norm is taken over the global batch and the DDP gradient equals the single-process one),
and scored by ``mmcr_loss``. With ``momentum_tau`` set, the official ImageNet variant: a frozen EMA
copy of backbone + projector sees the same views and the centroid averages both branches.
"""

from __future__ import annotations

import torch

from selfsup import distributed
from selfsup.losses import mmcr_loss, mmcr_momentum_loss
from selfsup.methods.base import BackboneConfig, EMATeacher, Method, check_views
from selfsup.models import MLP


class MMCR(Method):
    """MMCR with optional local term (``lmbda``) and optional momentum branch (``momentum_tau``).

    Args:
        backbone: backbone config.
        projector: widths after the backbone feature, e.g. ``[512, 128]`` gives
            ``F -> 512 (BN, ReLU) -> 128`` (OFF-MMCR CIFAR); ``[8192, 8192, 512]`` the ImageNet one.
        projector_last_bias: bias on the projector's last layer (MIN-MMCR has one).
        lmbda: weight of the local nuclear-norm term (0 in every seed recipe).
        momentum_tau: EMA rate of the momentum branch (0.99 in the ImageNet recipe); ``None`` = plain MMCR.
        gather_distributed: take the nuclear norm over the global batch under DDP (recommended).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        projector: list[int] | None = None,
        projector_last_bias: bool = False,
        lmbda: float = 0.0,
        momentum_tau: float | None = None,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone)
        projector = [512, 128] if projector is None else list(projector)
        self.projector = MLP([self.feature_dim, *projector], last_bias=projector_last_bias)
        self.lmbda = float(lmbda)
        if momentum_tau is not None and not 0.0 <= momentum_tau < 1.0:
            raise ValueError(f"momentum_tau must be in [0, 1), got {momentum_tau}")
        self.momentum_tau = momentum_tau
        self.gather_distributed = gather_distributed
        self.momentum = EMATeacher(self.backbone, self.projector) if momentum_tau is not None else None

    def training_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        b, v = check_views(views, min_views=2)  # one view per image has no manifold to compress
        x = views.flatten(0, 1)  # sample-major: row b*V + v is view v of image b
        z = self.projector(self.backbone(x)).view(b, v, -1)
        gather = distributed.gather if self.gather_distributed else (lambda t: t)
        if self.momentum is None:
            loss, parts = mmcr_loss(gather(z), self.lmbda, return_parts=True)
        else:
            with torch.no_grad():
                z_ema = self.momentum(x).view(b, v, -1)
            loss, parts = mmcr_momentum_loss(gather(z), gather(z_ema), self.lmbda, return_parts=True)
        return {"loss": loss, **parts}

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        if self.momentum is not None:
            self.momentum.update([self.backbone, self.projector], self.momentum_tau)
