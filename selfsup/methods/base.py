"""What every method shares: the ``Batch`` it receives, a backbone built from a spec, declared
teachers, parameter groups, and access to the engine's view maker.

A method is an ``nn.Module`` with these duties:

* ``forward(x) -> [B, F]``: the online backbone's pooled features (what kNN, probes and export use);
* ``training_loss(batch: Batch) -> dict``: the dict has ``loss`` (a scalar to back-propagate) and any
  detached scalars worth logging. ``batch.views`` is ``[B, V, C, H, W]`` (sample-major); randomness the
  method owns (masks, noise, latent codes) is drawn from ``batch.generator``, which the engine keys on
  (seed, step, rank, micro-batch) so that a resumed run draws the same numbers;
* ``on_train_step_end(step, max_steps)``: after each optimiser step; by default every declared teacher
  takes its EMA step;
* optionally ``param_groups()``: parameter groups with their own ``lr_mult`` / ``weight_decay``;
* class attributes: ``num_views`` / ``min_views`` (the views per image it trains on, checked by
  :meth:`Method.check_views`) and ``tiny`` / ``tiny_variants`` (its smallest configurations, which the test suite's
  smoke, DDP-gradient, spectrum and teacher tests build for every registered method);
* optionally ``epoch_plan()``: a fixed example set per epoch (:class:`~selfsup.data.rounds.EpochPlan`). The
  engine then makes each example's views once per epoch, hands them to ``prepare_epoch`` before the epoch's
  first step (IMLE-SSL searches its latent codes there), and feeds the epoch's steps from that cache;
  ``rank_state`` / ``load_rank_state`` carry per-rank epoch state (the codes) through a mid-epoch checkpoint.

Methods never touch optimisers, loaders or the trainer: the engine does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from selfsup import distributed
from selfsup.models import BackboneSpec, backbone_spec, build_backbone

__all__ = ["Batch", "EMATeacher", "EpochExamples", "Method", "check_views", "cosine_tau"]


@dataclass
class Batch:
    """One (micro-)batch as the engine hands it to :meth:`Method.training_loss`.

    Attributes:
        views: ``[B, V, C, H, W]``, sample-major: ``views[b, v]`` is view ``v`` of image ``b``.
        labels: ``[B]`` dataset labels (``-1`` where unknown); self-supervised losses never use them.
        indices: ``[B]`` dataset indices of the images (per-sample state: IMLE codes, memory banks).
        step: optimiser step (0-based); every micro-batch of one step sees the same value.
        max_steps: optimiser steps of the whole run (per-step schedules).
        epoch: training epoch (0-based).
        steps_per_epoch: optimiser steps per epoch (schedules given in epochs, e.g. MEC's 10-epoch warm-up).
        generator: the method's own random stream, on the views' device, keyed on
            (seed, step, rank, micro-batch); never the global RNG.
        local_views: multi-crop (``data.local_views > 0``): ``[B, Vl, C, h, w]`` smaller local views of the same
            images (sample-major, their own size and augmentation, :mod:`selfsup.data.multicrop`); ``None`` otherwise.
    """

    views: Tensor
    labels: Tensor
    indices: Tensor
    step: int
    max_steps: int
    epoch: int
    generator: torch.Generator
    steps_per_epoch: int = 1
    local_views: Optional[Tensor] = None

    @property
    def size(self) -> int:
        return int(self.views.shape[0])


@dataclass
class EpochExamples:
    """A planned epoch's examples on this rank, as the engine hands them to :meth:`Method.prepare_epoch`.

    Attributes:
        views: ``[E, V, C, H, W]`` one fixed set of views per example for the whole epoch.
        labels: ``[E]`` dataset labels (``-1`` where unknown; never used by self-supervised losses).
        indices: ``[E]`` dataset indices; training batches name their examples by them (``Batch.indices``).
        epoch: the epoch (0-based).
        step: the optimiser step the epoch starts at.
        generator: the method's random stream for the epoch (masks, codes), keyed on (seed, epoch start, rank):
            the same numbers when a resumed run prepares the epoch again.
    """

    views: Tensor
    labels: Tensor
    indices: Tensor
    epoch: int
    step: int
    generator: torch.Generator


class EMATeacher(nn.Module):
    """Frozen copies of named modules, updated as ``θ_t ← τ θ_t + (1 − τ) θ_online``.

    ``EMATeacher(tau=0.99, backbone=method.backbone, projector=method.projector)`` holds deep copies as
    submodules of the same names (``teacher.backbone``, ``teacher.projector``), so state-dict keys read
    ``<teacher name>.backbone.*`` and :meth:`Method.backbone_for` finds the teacher's backbone by name.
    Parameters only, as in the seeds: the copies' BatchNorm buffers evolve from their own train-mode
    passes. Copies never receive gradients; ``forward`` chains them in declaration order.

    Args:
        tau: EMA rate at step 0.
        final_tau: with a value, τ follows a half-cosine from ``tau`` to ``final_tau`` over the run
            (BYOL / MEC: 0.996 -> 1); ``None`` keeps τ constant (OFF-MMCR ImageNet: 0.99).
        **modules: the online modules to copy, by name.
    """

    def __init__(self, tau: float, final_tau: Optional[float] = None, **modules: nn.Module):
        super().__init__()
        if not modules:
            raise ValueError("EMATeacher needs at least one module to copy")
        for name, t in (("tau", tau), ("final_tau", final_tau)):
            if t is not None and not 0.0 <= t <= 1.0:
                raise ValueError(f"EMATeacher {name} must be in [0, 1], got {t}")
        self.tau, self.final_tau = float(tau), final_tau
        self.names = list(modules)
        for name, module in modules.items():
            self.add_module(name, copy.deepcopy(module))
        for p in self.parameters():
            p.requires_grad_(False)

    def tau_at(self, step: int, max_steps: int) -> float:
        if self.final_tau is None:
            return self.tau
        return cosine_tau(step, max_steps, self.tau, self.final_tau)

    @torch.no_grad()
    def update(self, online: nn.Module | Mapping[str, nn.Module], tau: float) -> None:
        """EMA step towards ``online``'s modules of the same names (a module holding them, or a mapping)."""
        for name in self.names:
            student = online[name] if isinstance(online, Mapping) else getattr(online, name)
            for pt, ps in zip(getattr(self, name).parameters(), student.parameters()):
                pt.lerp_(ps.detach(), 1.0 - tau)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class Method(nn.Module):
    """Base class: owns ``self.backbone`` built from ``backbone`` (a registry spec) and the teachers it declares.

    Args:
        backbone: ``{name, kwargs}`` (or the flat ``{name, cifar_stem: true}``; see
            ``selfsup.models.backbone_spec``), e.g. ``{name: vit_tiny, kwargs: {img_size: 32, patch_size: 4}}``.

    Class attributes a method sets:
        num_views: views per image it takes, exactly (``None``: any number ``>= min_views``).
        min_views: the fewest views per image it takes when ``num_views`` is ``None``.
        tiny: ``init_args`` of its smallest configuration that still runs every code path (tiny backbone from
            ``selfsup.models.TINY_RESNET`` / ``TINY_VIT``, narrow heads). The test suite builds it for every
            registered method (smoke run of each cpu-small recipe, DDP gradient, spectrum seam, teachers).
        tiny_variants: named overrides of ``tiny`` for code paths the default does not reach (MMCR:
            ``{"momentum": {"momentum_tau": 0.9}}``); each is tested like ``tiny``.

    Instance attributes the engine and :meth:`gather` read:
        gather_distributed: under DDP, :meth:`gather` concatenates every rank's rows (default ``True``);
            ``False``: each rank's loss sees its own rows only (per-GPU negatives / statistics).
        gather_grad: ``"all"`` (default): the gather's backward hands each rank the gradient of its rows from every
            rank's loss, so the DDP gradient equals the single-process one at the global batch; ``"local"``: other
            ranks' rows are constants, as in official codes whose all-gather carries no gradient (1/W of it under
            DDP's averaging).
    """

    num_views: ClassVar[Optional[int]] = None
    min_views: ClassVar[int] = 1
    tiny: ClassVar[dict[str, Any]] = {}
    tiny_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    gather_distributed: bool = True
    gather_grad: Literal["all", "local"] = "all"

    def __init__(self, backbone: Optional[BackboneSpec] = None):
        super().__init__()
        self.backbone_spec: dict[str, Any] = backbone_spec(backbone)
        self.backbone = build_backbone(self.backbone_spec)
        self.num_features: int = int(self.backbone.num_features)
        self._teacher_names: list[str] = []
        self._view_maker: Optional[Callable[..., Tensor]] = None

    # ----------------------------------------------------------------------------------- duties
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        """``{"loss": scalar, <name>: scalar to log, ...}``; optionally ``"embeddings"``: a dict ``name -> detached
        tensor`` (``[B, V, D]`` sample-major, ``[B, D]``, or a tuple of per-view ``[B, D]``), e.g. ``{"backbone": h,
        "projector": z}``, read by the spectrum monitor (:mod:`selfsup.engine.spectrum`) and never logged."""
        raise NotImplementedError

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """After every optimiser step: each declared teacher takes its EMA step."""
        for name in self._teacher_names:
            teacher = getattr(self, name)
            teacher.update(self, teacher.tau_at(step, max_steps))

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: ``{"name", "params", optional "lr_mult", optional "weight_decay"}``.

        Default: one group of every trainable parameter. The engine splits each group further so that
        1-D parameters and whatever a module's ``no_weight_decay()`` names get no weight decay.
        """
        return [{"name": "all", "params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------------------------ planned epochs
    def epoch_plan(self):
        """``None`` (default: every epoch is a pass over the dataset) or an
        :class:`~selfsup.data.rounds.EpochPlan` (a fixed example set per epoch, see :meth:`prepare_epoch`)."""
        return None

    def prepare_epoch(self, examples: EpochExamples) -> dict[str, float]:
        """Before a planned epoch's first step (and again when a run resumes inside it): per-epoch work on the
        epoch's examples. Returns scalars to log."""
        return {}

    def rank_state(self) -> Optional[dict[str, Tensor]]:
        """This rank's own state to carry through a checkpoint (tensors; ``None``: nothing): a planned epoch's codes
        (IMLE-SSL), a queue of past embeddings (SwAV). Every rank's is saved; a resumed run with the same number of
        processes gives each rank its own back (:meth:`load_rank_state`)."""
        return None

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`rank_state` returned: when the checkpoint is loaded, or, in planned epochs, before
        :meth:`prepare_epoch` of the resumed epoch."""

    def frozen(self, step: int, epoch: int) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped at this optimiser step (``grad = None``: no update, no weight
        decay, no optimiser-state change), e.g. DINO's last layer in the first epoch, SwAV's prototypes in the first
        iterations. A pure function of ``step`` / ``epoch``, so a resumed run freezes the same steps. Default: none."""
        return []

    def checkpoint_signature(self) -> dict[str, Any]:
        """What the weights compute with that the state dict does not hold (e.g. IMLE's equalised-lr gain): stored
        in every checkpoint, and a resume whose method differs in one of these values is refused by name."""
        return {}

    # --------------------------------------------------------------------------------- teachers
    def add_teacher(self, name: str, teacher: EMATeacher) -> EMATeacher:
        """Declare ``teacher`` under ``name`` (``export --which NAME`` and the kNN monitor find it)."""
        if name == "online" or hasattr(self, name):
            raise ValueError(f"cannot declare a teacher named '{name}': the name is taken")
        setattr(self, name, teacher)
        self._teacher_names.append(name)
        return teacher

    @property
    def teacher_names(self) -> list[str]:
        return list(self._teacher_names)

    def backbone_for(self, which: str = "online") -> nn.Module:
        """The backbone that maps images to pooled features: ``online`` or a declared teacher's copy."""
        if which == "online":
            return self.backbone
        if which in self._teacher_names:
            teacher = getattr(self, which)
            if "backbone" not in teacher.names:
                raise ValueError(f"teacher '{which}' holds no backbone copy ({teacher.names})")
            return teacher.backbone
        raise ValueError(
            f"unknown backbone '{which}'; this {type(self).__name__} has: online"
            + "".join(f", {n}" for n in self._teacher_names)
        )

    # ------------------------------------------------------------------------------ shared steps
    def check_views(self, views: Tensor) -> tuple[int, int]:
        """``(B, V)`` of a ``[B, V, C, H, W]`` view batch, checked against ``num_views`` / ``min_views``."""
        return check_views(views, min_views=self.min_views, exact=self.num_views, method=type(self).__name__)

    def gather(self, t: Tensor) -> Tensor:
        """``t`` (rows first) concatenated over ranks as ``gather_distributed`` / ``gather_grad`` say
        (:func:`selfsup.distributed.gather`); ``t`` itself when not distributed or ``gather_distributed`` is off."""
        if not self.gather_distributed:
            return t
        return distributed.gather(t, grad=self.gather_grad)

    # ------------------------------------------------------------------------------------ views
    def bind_view_maker(self, fn: Optional[Callable[..., Tensor]]) -> None:
        """Called by the engine: ``fn(images, step)`` is what :meth:`make_views` runs."""
        self._view_maker = fn

    def make_views(self, images: Tensor, step: int) -> Tensor:
        """The engine's views of ``images`` (uint8 ``[B, 3, H, W]``) for ``step``, ``[B, V, C, h, w]``.

        The same call the engine makes for every training batch, keyed the same way (seed, step, rank); a planned
        epoch's fixed views (:meth:`prepare_epoch`) are made by it too, in the engine.
        """
        if self._view_maker is None:
            raise RuntimeError("make_views is available once the engine has bound its view maker (during fit)")
        return self._view_maker(images, step)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_view_maker"] = None  # a bound engine method: not part of the model
        return state


def check_views(
    views: Tensor, min_views: int = 1, exact: Optional[int] = None, method: str = "this method"
) -> tuple[int, int]:
    """Validate a ``[B, V, C, H, W]`` view batch and return ``(B, V)``: ``V == exact`` when given, else
    ``V >= min_views``; ``method`` names the method in the error."""
    if views.dim() != 5:
        raise ValueError(f"expected views of shape [B, V, C, H, W], got {tuple(views.shape)}")
    b, v = views.shape[:2]
    if exact is not None and v != exact:
        raise ValueError(f"{method} takes exactly {exact} view{'s' * (exact != 1)} per image, got {v} (data.views)")
    if v < min_views:
        raise ValueError(f"{method} needs at least {min_views} views per image, got {v} (data.views)")
    return b, v


def cosine_tau(step: int, max_steps: int, base: float, final: float = 1.0) -> float:
    """Half-cosine momentum schedule from ``base`` (step 0) to ``final`` (last step) (BYOL / MEC)."""
    if max_steps <= 1:
        return base
    return final - (final - base) * (1 + math.cos(math.pi * min(step, max_steps) / max_steps)) / 2
