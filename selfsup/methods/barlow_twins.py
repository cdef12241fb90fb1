r"""Barlow Twins (Zbontar et al., 2021): backbone + projector, cross-correlation of the two views driven to identity.

Follows facebookresearch/barlowtwins ``main.py`` at HEAD (8e8d284): ``BarlowTwins.__init__`` / ``forward``,
``main_worker`` (SyncBN, the two parameter groups, LARS), ``adjust_learning_rate`` and ``Transform``.

For views ``y1, y2`` (separate forward passes, as the official ``self.backbone(y1)``, ``self.backbone(y2)``: train-
mode BatchNorm statistics per view), ``z_i = g(f(y_i))`` and, over the ``N`` rows gathered from every rank::

    c    = bn(z1)ᵀ bn(z2) / N            bn = BatchNorm1d(D, affine=False) in train mode (biased batch variance)
    loss = scale_loss · [ Σ_i (c_ii − 1)² + λ Σ_{i≠j} c_ij² ]          (barlow_twins_loss; λ = 0.0051)

Projector as the official ``--projector 8192-8192-8192``: ``Linear(F, 8192, bias=False) BN ReLU Linear(8192, 8192,
bias=False) BN ReLU Linear(8192, 8192, bias=False)`` = ``MLP([F, 8192, 8192, 8192])``. ``scale_loss`` is 1 as at
HEAD (the ``--scale-loss 1/32`` of the first release was removed in 046eec3, "replace --scale-loss with
--learning-rate-biases"); solo-learn's CIFAR recipe uses 0.1. Parameter groups as the official: 2-D weights at the
base lr, 1-D parameters (biases, BatchNorm) at ``bias_lr_mult`` × it (``--learning-rate-biases 0.0048`` over
``--learning-rate-weights 0.2`` = 0.024); the engine keeps 1-D parameters out of weight decay and of the LARS trust
ratio (``optim.exclude_1d``), as the official ``LARS(weight_decay_filter=True, lars_adaptation_filter=True)``.

Departures:

* Distributed: the official converts every BatchNorm to SyncBN, divides each rank's ``bn(z1)ᵀ bn(z2)`` by the global
  batch and all-reduces ``c`` without gradient, so rank ``r`` back-propagates ``∂L/∂z_r`` and DDP's averaging gives
  ``1/W`` of the single-process gradient at the same global batch. Here ``z1, z2`` are gathered (``self.gather``) and
  the loss's batch normalisation and ``c`` run over the gathered rows (the same value); the default
  ``gather_grad="all"`` gives the **exact** gradient, ``W`` times the official one. ``gather_grad="local"`` is the
  parity flag: the official ``1/W`` scale (with LARS the weights' step barely depends on it, the 1-D parameters'
  step does). With one process both are the same.
* ``N`` is the number of gathered rows, the official divides by the configured ``--batch-size`` even on the short
  last batch its loader keeps. The loss runs in fp32 with autocast off (the official: under autocast).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from selfsup.losses import barlow_twins_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class BarlowTwins(Method):
    """Barlow Twins.

    Args:
        backbone: backbone spec ``{name, kwargs}`` (official: ResNet-50, ``zero_init_residual``).
        projector: widths after the backbone feature, no biases (official ``[8192, 8192, 8192]``; solo-learn CIFAR
            ``[2048, 2048, 2048]``).
        lambd: λ, weight of the off-diagonal term (official 0.0051, also solo-learn's at D = 2048).
        scale_loss: factor on the whole loss (official HEAD: 1; solo-learn CIFAR: 0.1).
        bias_lr_mult: lr multiplier of the 1-D parameters (biases, BatchNorm): official 0.0048 / 0.2 = 0.024;
            1.0 = one lr for all (solo-learn).
        gather_distributed: the loss over the global batch under DDP (the official's SyncBN + all-reduced ``c``).
        gather_grad: ``"all"`` (default): the exact DDP gradient of the global loss; ``"local"``: **official
            parity**, its gradient-free all-reduce of ``c`` (``1/W`` of the exact gradient; same loss value).
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8]}
    tiny_variants = {"seed_gather": {"gather_grad": "local"}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        lambd: float = 0.0051,
        scale_loss: float = 1.0,
        bias_lr_mult: float = 0.024,
        gather_distributed: bool = True,
        gather_grad: Literal["all", "local"] = "all",
    ):
        super().__init__(backbone)
        projector = [8192, 8192, 8192] if projector is None else list(projector)
        self.projector = MLP([self.num_features, *projector])
        for name, value in (("lambd", lambd), ("bias_lr_mult", bias_lr_mult)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not scale_loss > 0:
            raise ValueError(f"scale_loss must be > 0, got {scale_loss}")
        if gather_grad not in ("all", "local"):
            raise ValueError(f"gather_grad must be 'all' or 'local', got {gather_grad!r}")
        self.lambd, self.scale_loss, self.bias_lr_mult = float(lambd), float(scale_loss), float(bias_lr_mult)
        self.gather_distributed, self.gather_grad = bool(gather_distributed), gather_grad

    def param_groups(self) -> list[dict]:
        """The official two groups: ``weights`` (ndim > 1) and ``biases`` (biases and BatchNorm, at ``bias_lr_mult``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"name": "weights", "params": [p for p in params if p.ndim > 1]},
            {"name": "biases", "params": [p for p in params if p.ndim <= 1], "lr_mult": self.bias_lr_mult},
        ]

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.check_views(batch.views)
        h1, h2 = self.backbone(batch.views[:, 0]), self.backbone(batch.views[:, 1])  # per-view BN statistics
        z1, z2 = self.projector(h1), self.projector(h2)
        loss, parts = barlow_twins_loss(self.gather(z1), self.gather(z2), lambd=self.lambd, return_parts=True)
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (z1.detach(), z2.detach())}
        return {"loss": self.scale_loss * loss, **parts, "embeddings": embeddings}
