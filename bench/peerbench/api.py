"""What a lightly-side builder is: :class:`Peer` (the modules, transform and step pieces of the plain loop), the
:class:`Ctx` it reads, the registry (``@register("name")``), :class:`Unsupported`, and the small parts every builder
uses (named parameters, momentum copies and schedules). Nothing here imports lightly at import time."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn


class Unsupported(Exception):
    """A recipe value lightly's components cannot express: the method is listed as skipped with this reason."""


@dataclass
class Peer:
    """One method written with lightly: the modules, the transform, and the step's pieces of the plain loop."""

    model: nn.Module  # every module (online, momentum copies, heads): its trainable parameters are optimised
    transform: Callable
    loss: Callable[[Any, int, int], Tensor]  # (batch, step, epoch) -> loss
    groups: list[dict]  # [{"name", "params": [(name, p)], "lr_mult", "fixed_lr"}]
    components: list[str]
    differences: list[str] = field(default_factory=list)
    collate_fn: Optional[Callable] = None
    before_step: Callable[[int], None] = lambda step: None  # the examples' momentum update before the forward
    after_backward: Callable[[int, int], None] = lambda step, epoch: None  # cancel last-layer gradients
    after_step: Callable[[int], None] = lambda step: None  # the examples' momentum update after the step


@dataclass
class Ctx:
    """What a builder reads: the recipe's method arguments, the backbone, the data config and its pipelines."""

    name: str
    args: dict
    backbone: nn.Module
    data: Any
    pipelines: list  # the recipe's Augment pipelines (one, or an asymmetric pair)
    local: Optional[list]  # the local views' pipelines (multi-crop) or None
    total_steps: int

    @property
    def feat(self) -> int:
        return int(self.backbone.num_features)


#: short method name -> builder (``@register``): the lightly side of ``bench/bench_peers.py``.
BUILDERS: dict[str, Callable[[Ctx], Peer]] = {}


def register(name: str) -> Callable[[Callable[[Ctx], Peer]], Callable[[Ctx], Peer]]:
    """Register a builder under the short name of the method's ``<name>-cpu-small`` recipe."""

    def add(builder: Callable[[Ctx], Peer]) -> Callable[[Ctx], Peer]:
        if name in BUILDERS:
            raise ValueError(f"a lightly-side builder for {name!r} is already registered")
        BUILDERS[name] = builder
        return builder

    return add


def equal_hidden(widths: Sequence[int], what: str) -> None:
    """:class:`Unsupported` unless every hidden layer of ``widths`` (the output last) has one width."""
    if len(set(widths[:-1])) > 1:
        raise Unsupported(f"{what} {list(widths)}: lightly's heads have one hidden width")


def named(*modules: tuple[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``(prefix.name, parameter)`` of each ``(prefix, module)``: an optimiser group's parameters."""
    return [(f"{prefix}.{n}", p) for prefix, m in modules for n, p in m.named_parameters()]


def frozen_copy(module: nn.Module, build: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """A momentum / teacher copy (``deactivate_requires_grad``): ``copy.deepcopy``, or for a module that cannot be
    deep-copied (lightly's DINO head uses the old ``nn.utils.weight_norm``) a fresh ``build()`` loaded with its state."""
    from lightly.models.utils import deactivate_requires_grad

    if build is None:
        copied = copy.deepcopy(module)
    else:
        copied = build()
        copied.load_state_dict(module.state_dict())
    deactivate_requires_grad(copied)
    return copied


def momentum_schedule(tau: float, final: Optional[float], total: int) -> Callable[[int], float]:
    """The EMA rate at a step: ``tau`` throughout, or lightly's ``cosine_schedule`` from ``tau`` to ``final``."""
    from lightly.utils.scheduler import cosine_schedule

    return lambda step: tau if final is None else cosine_schedule(step, total, tau, final)


def ema_hook(momentum: Callable[[int], float], *pairs: tuple[nn.Module, nn.Module]) -> Callable[[int], None]:
    """A loop hook (``Peer.before_step`` / ``after_step``): at step ``s``, lightly's ``update_momentum(online, copy,
    m=momentum(s))`` for each ``(online, copy)`` pair, as its examples update the momentum / teacher copies."""
    from lightly.models.utils import update_momentum

    def hook(step: int) -> None:
        m = momentum(step)
        for online, ema in pairs:
            update_momentum(online, ema, m=m)

    return hook
