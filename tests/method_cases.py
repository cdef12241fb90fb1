"""Test cases derived from the method registry: every registered method, in its ``tiny`` configuration and each of
its ``tiny_variants``, with a batch of the views it takes. The smoke, DDP-gradient, spectrum and teacher tests
parametrize over :func:`method_cases`, so a new ``@register_method`` class is covered without editing them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from selfsup.losses import mmcr_loss
from selfsup.methods import MMCR, Batch, Method, available_methods, get_method
from selfsup.methods.base import EpochExamples


@dataclass(frozen=True)
class MethodCase:
    """One tiny configuration of a registered method: ``cls(**kwargs)``."""

    id: str
    cls: type[Method]
    kwargs: dict[str, Any]

    def build(self, seed: int = 0) -> Method:
        torch.manual_seed(seed)
        return self.cls(**self.kwargs)


def method_cases() -> list[MethodCase]:
    """Every registered method's ``tiny`` configuration and its ``tiny_variants`` (ids ``MMCR``, ``MMCR-momentum``)."""
    cases = []
    for name in available_methods():
        cls = get_method(name)
        cases.append(MethodCase(name, cls, dict(cls.tiny)))
        for variant, overrides in cls.tiny_variants.items():
            cases.append(MethodCase(f"{name}-{variant}", cls, {**cls.tiny, **overrides}))
    return cases


def views_per_image(cls: type[Method]) -> int:
    """The views a method takes: ``num_views``, else ``max(min_views, 2)``."""
    return cls.num_views if cls.num_views is not None else max(cls.min_views, 2)


def random_views(cls: type[Method], b: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``[b, V, 3, size, size]`` standard-normal views (normalised-image units)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, views_per_image(cls), 3, size, size, generator=g)


def make_batch(
    views: torch.Tensor, step: int = 0, max_steps: int = 10, seed: int | None = None, steps_per_epoch: int = 5
) -> Batch:
    """The engine's ``Batch`` of ``views [B, V, C, H, W]`` at ``step`` (epoch ``step // steps_per_epoch``); the
    method's generator is seeded with ``seed`` (default: the step)."""
    b = views.shape[0]
    return Batch(
        views=views,
        labels=torch.full((b,), -1),
        indices=torch.arange(b),
        step=step,
        max_steps=max_steps,
        epoch=step // steps_per_epoch,
        generator=torch.Generator().manual_seed(step if seed is None else seed),
        steps_per_epoch=steps_per_epoch,
    )


def step_outputs(method: Method, batch: Batch) -> dict[str, Any]:
    """``method.training_loss(batch)``; a method that trains in planned epochs (``epoch_plan()``) first gets the
    batch's images as its epoch (``prepare_epoch``), as the engine would hand them."""
    if method.epoch_plan() is not None:
        method.prepare_epoch(
            EpochExamples(
                views=batch.views,
                labels=batch.labels,
                indices=batch.indices,
                epoch=batch.epoch,
                step=batch.step,
                generator=torch.Generator().manual_seed(1000 + batch.step),
            )
        )
    return method.training_loss(batch)


class LocalViewsMMCR(MMCR):
    """MMCR over the global and the local views of multi-crop (the backbone pools any size; the projector's outputs
    of both groups join on the view axis). Records the view shapes it saw (``seen``). Test-only: not registered."""

    def training_loss(self, batch: Batch) -> dict[str, Any]:
        local = batch.local_views
        self.seen = (tuple(batch.views.shape), None if local is None else tuple(local.shape))
        b, v = self.check_views(batch.views)
        z = self.projector(self.backbone(batch.views.flatten(0, 1))).view(b, v, -1)
        if local is not None:
            z_local = self.projector(self.backbone(local.flatten(0, 1))).view(b, local.shape[1], -1)
            z = torch.cat([z, z_local], dim=1)
        return {"loss": mmcr_loss(self.gather(z)), "embeddings": {"projector": z.detach()}}


class QueueMMCR(MMCR):
    """MMCR keeping per-rank state outside the state dict (as SwAV's queue), carried through checkpoints by
    ``rank_state``: the running sum of every projection it made, so its final value depends on the whole run.
    Test-only: not registered."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.total = torch.zeros(())

    def training_loss(self, batch: Batch) -> dict[str, Any]:
        out = super().training_loss(batch)
        self.total = self.total + out["embeddings"]["projector"].sum(dim=(0, 1))  # [D]
        return out

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {"total": self.total}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        self.total = state["total"]
