"""What every method shares: a backbone built from a config, the view layout, an EMA teacher.

A method is an ``nn.Module`` with three duties:

* ``forward(x) -> [B, F]``: backbone features, what kNN, probes and export use;
* ``training_loss(views) -> dict``: ``views`` is ``[B, V, C, H, W]`` (sample-major); the dict has
  ``loss`` (a scalar to back-propagate) and any detached tensors worth logging;
* ``on_train_step_end(step, max_steps)``: called after each optimiser step (EMA updates).

Methods never touch optimisers, loaders or the trainer: the engine does.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn

from selfsup.models import build_backbone


@dataclass
class BackboneConfig:
    """Which backbone to build (see ``selfsup.models.available_backbones()``).

    Attributes:
        name: registry name, e.g. ``resnet18`` or ``resnet50``.
        cifar_stem: 3x3 stride-1 ``conv1`` and no max-pool (small images). Explicit, never inferred.
        width: first-stage channels of BasicBlock ResNets (64 = torchvision).
        zero_init_residual: zero-init the last BN of each residual branch.
    """

    name: str = "resnet18"
    cifar_stem: bool = False
    width: int = 64
    zero_init_residual: bool = False


class Method(nn.Module):
    """Base class: owns ``self.backbone`` and ``self.backbone_config`` (a plain dict)."""

    def __init__(self, backbone: BackboneConfig | dict | None = None):
        super().__init__()
        if backbone is None:
            backbone = BackboneConfig()
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        self.backbone_config: dict = asdict(backbone)
        self.backbone = build_backbone(**self.backbone_config)
        self.feature_dim: int = self.backbone.feature_dim
        # Set by the engine before every training_loss call, for per-step schedules (MEC's lambda warm-up).
        self.step: int = 0
        self.max_steps: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """Hook run after every optimiser step; default: nothing."""


def check_views(views: torch.Tensor, min_views: int = 1) -> tuple[int, int]:
    """Validate a ``[B, V, C, H, W]`` view batch and return ``(B, V)``."""
    if views.dim() != 5:
        raise ValueError(f"expected views of shape [B, V, C, H, W], got {tuple(views.shape)}")
    b, v = views.shape[:2]
    if v < min_views:
        raise ValueError(f"this method needs at least {min_views} views per image, got {v}")
    return b, v


class EMATeacher(nn.Module):
    """Frozen copies of some modules, updated as ``θ_t ← τ θ_t + (1 − τ) θ_online``.

    Parameters only, as in the seeds: the teacher's BatchNorm buffers evolve from its own
    train-mode forward passes. The copies are registered submodules, so they are saved in
    checkpoints and restored on resume, but they never receive gradients.
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(m) for m in modules)
        for p in self.copies.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: Iterable[nn.Module], tau: float) -> None:
        online = list(online)
        if len(online) != len(self.copies):
            raise ValueError(f"EMATeacher holds {len(self.copies)} modules, got {len(online)}")
        for teacher, student in zip(self.copies, online):
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.lerp_(ps.detach(), 1.0 - tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.copies:
            x = m(x)
        return x


def cosine_tau(step: int, max_steps: int, base: float, final: float = 1.0) -> float:
    """Half-cosine momentum schedule from ``base`` (step 0) to ``final`` (last step) (BYOL / MEC)."""
    if max_steps <= 1:
        return base
    import math

    return final - (final - base) * (1 + math.cos(math.pi * step / max_steps)) / 2
