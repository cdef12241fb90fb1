"""MMCR: maximum manifold capacity representations (Yerxa et al.), spec §1.1-1.3.

All ``B x V`` views go through one forward pass (sample-major), the projector outputs are reshaped
to ``[B, V, D]``, gathered over ranks with the autograd-aware ``selfsup.distributed.gather`` (so the
nuclear norm is taken over the global batch and the DDP gradient equals the single-process one),
and scored by ``mmcr_loss``. With ``momentum_tau`` set, the official ImageNet variant: a frozen EMA
teacher (backbone + projector, declared as ``teacher``) sees the same views and the centroid averages
both branches.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from selfsup.losses import mmcr_loss, mmcr_momentum_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class MMCR(Method):
    """MMCR with optional local term (``lmbda``) and optional momentum teacher (``momentum_tau``).

    Args:
        backbone: backbone spec ``{name, kwargs}``.
        projector: widths after the backbone feature, e.g. ``[512, 128]`` gives
            ``F -> 512 (BN, ReLU) -> 128`` (OFF-MMCR CIFAR); ``[8192, 8192, 512]`` the ImageNet one.
        projector_last_bias: bias on the projector's last layer (MIN-MMCR has one).
        lmbda: weight of the local nuclear-norm term (0 in every seed recipe).
        momentum_tau: EMA rate of the teacher (0.99 in the ImageNet recipe); ``None`` = plain MMCR.
        gather_distributed: take the nuclear norm over the global batch under DDP (recommended).
        gather_grad: ``"all"`` (default): the exact DDP gradient of the global loss; ``"local"``: **OFF-MMCR parity**,
            the official code's gradient-free all-gather (each rank back-propagates through its own rows only, so
            the DDP gradient is ``1/W`` of the exact one; the loss value is the same). Changes results only with
            more than one rank; use it to reproduce the official multi-GPU numbers.
    """

    min_views = 2  # one view per image has no manifold to compress
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8]}
    tiny_variants = {"momentum": {"momentum_tau": 0.9}, "seed_gather": {"gather_grad": "local"}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        projector_last_bias: bool = False,
        lmbda: float = 0.0,
        momentum_tau: Optional[float] = None,
        gather_distributed: bool = True,
        gather_grad: Literal["all", "local"] = "all",
    ):
        super().__init__(backbone)
        projector = [512, 128] if projector is None else list(projector)
        self.projector = MLP([self.num_features, *projector], last_bias=projector_last_bias)
        self.lmbda = float(lmbda)
        if momentum_tau is not None and not 0.0 <= momentum_tau < 1.0:
            raise ValueError(f"momentum_tau must be in [0, 1), got {momentum_tau}")
        if gather_grad not in ("all", "local"):
            raise ValueError(f"gather_grad must be 'all' or 'local', got {gather_grad!r}")
        self.gather_distributed, self.gather_grad = bool(gather_distributed), gather_grad
        if momentum_tau is not None:
            self.add_teacher("teacher", EMATeacher(momentum_tau, backbone=self.backbone, projector=self.projector))

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        b, v = self.check_views(batch.views)
        x = batch.views.flatten(0, 1)  # sample-major: row b*V + v is view v of image b
        h = self.backbone(x)
        z = self.projector(h).view(b, v, -1)
        if not self.teacher_names:
            loss, parts = mmcr_loss(self.gather(z), self.lmbda, return_parts=True)
        else:
            with torch.no_grad():
                z_ema = self.teacher(x).view(b, v, -1)
            loss, parts = mmcr_momentum_loss(self.gather(z), self.gather(z_ema), self.lmbda, return_parts=True)
        embeddings = {"backbone": h.detach().reshape(b, v, -1), "projector": z.detach()}  # local rows, for the monitor
        return {"loss": loss, **parts, "embeddings": embeddings}
