"""Optimisers (Adam / AdamW / SGD / LARS), learning-rate scaling and per-step schedules.

* :class:`LARS` is the Barlow-Twins form used by OFF-MMCR ImageNet: weight decay
  and the layer-wise trust ratio apply to >1-D parameters only; 1-D parameters
  (biases, BatchNorm affine) are plain momentum SGD.
* :func:`build_scheduler` returns a ``LambdaLR`` stepped **per optimiser step**,
  whose factor is a small picklable object so the scheduler ``state_dict``
  round-trips through ``torch.save`` / ``torch.load(weights_only=True)``.
  The warm-up never yields lr 0 on the first step (unlike MIN-MMCR).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "SCHEDULES",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "method_param_groups",
    "no_weight_decay_ids",
    "param_groups",
    "scaled_lr",
    "warmup_cosine",
]

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "lars")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
LR_RULES: tuple[str, ...] = ("linear", "sqrt", "none")


# --------------------------------------------------------------------------- LARS


class LARS(Optimizer):
    r"""Layer-wise Adaptive Rate Scaling, Barlow-Twins form.

    For each parameter ``p`` with gradient ``g``:

    * if ``p`` is adapted (not excluded)::

          g ← g + wd · p
          q = η · ||p|| / ||g||   if ||p|| > 0 and ||g|| > 0, else 1
          g ← q · g

    * then, for every parameter::

          μ ← momentum · μ + g
          p ← p − lr · μ

    A parameter is excluded (no weight decay, no trust ratio) when its group has
    ``lars_exclude=True``, or when the group leaves ``lars_exclude`` unset (None),
    ``exclude_1d`` is True and ``p.ndim <= 1`` (biases, BatchNorm weights).
    ``lars_exclude=False`` on a group forces adaptation for all its parameters.

    Why not ``timm.optim.Lars``: it expresses the exclusion (a group with ``weight_decay=0`` and
    ``always_adapt=False`` is neither decayed nor adapted), but its trust ratio is NVIDIA's LARC form
    ``η·||p|| / (||g|| + wd·||p|| + eps)``, not the Barlow-Twins form ``η·||p|| / ||g + wd·p||`` that OFF-MMCR
    ImageNet trains with (spec: "LARS (Barlow-Twins form)"). With ``wd > 0`` the two differ by the triangle
    inequality (``tests/test_optim.py::test_timm_lars_is_the_larc_form_not_the_seeds`` shows a step where they do);
    at ``wd = 0`` they agree up to timm's ``eps``.

    Args:
        params: parameters or parameter groups (groups may set any option).
        lr: learning rate.
        weight_decay: L2 coefficient added to the gradient of adapted parameters.
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        eta: trust coefficient η.
        exclude_1d: exclude ``ndim <= 1`` parameters unless the group says otherwise.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        exclude_1d: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum} (need 0 <= momentum < 1)")
        if eta <= 0:
            raise ValueError(f"invalid eta {eta} (need > 0)")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            exclude_1d=exclude_1d,
            lars_exclude=None,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _excluded(group: dict[str, Any], p: Tensor) -> bool:
        flag = group.get("lars_exclude")
        if flag is not None:
            return bool(flag)
        return bool(group["exclude_1d"]) and p.ndim <= 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step (see the class docstring for the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            momentum, eta = group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                if not self._excluded(group, p):
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    one = torch.ones_like(p_norm)
                    q = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm.clamp_min(1e-38), one)
                    g = g.mul(q)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.zeros_like(p)
                    state["momentum_buffer"] = buf
                buf.mul_(momentum).add_(g)
                p.add_(buf, alpha=-lr)
        return loss


# ------------------------------------------------------------------- param groups


def _params_of(model: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    params = model.parameters() if isinstance(model, nn.Module) else model
    seen: set[int] = set()
    out: list[Tensor] = []
    for p in params:
        if isinstance(p, dict):
            raise TypeError("param_groups expects a module or an iterable of tensors, not groups")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_groups(
    model: nn.Module | Iterable[Tensor], weight_decay: float, exclude_1d_from_wd: bool
) -> list[dict[str, Any]]:
    """Split trainable parameters into a weight-decay group and a 1-D no-decay group.

    With ``exclude_1d_from_wd`` the result is ``[{params: >1-D, weight_decay},
    {params: <=1-D, weight_decay: 0.0, lars_exclude: True}]`` (empty groups are
    dropped); otherwise a single group with ``weight_decay`` for every parameter.
    Frozen parameters (``requires_grad=False``) are skipped.
    """
    params = _params_of(model)
    if not exclude_1d_from_wd:
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that some submodule's ``no_weight_decay()`` names (timm convention).

    Names are relative to the module that lists them (a ViT's ``pos_embed``, ``cls_token``); names of
    absent parameters (timm lists ``dist_token`` for every ViT) are ignored.
    """
    ids: set[int] = set()
    for m in model.modules():
        fn = getattr(m, "no_weight_decay", None)
        if not callable(fn):
            continue
        for name in fn():
            try:
                ids.add(id(m.get_parameter(name)))
            except AttributeError:
                continue
    return ids


def method_param_groups(method: nn.Module, lr: float, weight_decay: float, exclude: bool) -> list[dict[str, Any]]:
    """Optimiser groups from ``method.param_groups()``: each group's ``lr_mult`` and ``weight_decay``, split
    so that (with ``exclude``) 1-D parameters and what ``no_weight_decay()`` names get no weight decay and,
    for LARS, no trust ratio.

    Every returned group carries ``name``, ``lr = lr * lr_mult`` (the scheduler scales it per step),
    ``lr_mult``, ``weight_decay`` and ``fixed_lr`` (a group of ``param_groups()`` with ``"fixed_lr": True`` keeps
    its peak lr at every step: SimSiam's ``fix_pred_lr``). Frozen parameters are skipped; a trainable parameter that no group
    lists, or that two groups list, is an error naming it.
    """
    names = {id(p): n for n, p in method.named_parameters()}
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    nwd = no_weight_decay_ids(method) if exclude else set()
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    for g in method.param_groups():
        name, mult = str(g.get("name", f"group{len(out)}")), float(g.get("lr_mult", 1.0))
        wd = float(g.get("weight_decay", weight_decay))
        params = [p for p in g["params"] if p.requires_grad]
        twice = [names.get(id(p), "?") for p in params if id(p) in seen]
        if twice:
            raise ValueError(f"parameter group '{name}' repeats parameters of an earlier group: {twice[:5]}")
        seen.update(id(p) for p in params)
        plain = [p for p in params if not (exclude and (p.ndim <= 1 or id(p) in nwd))]
        no_decay = [p for p in params if exclude and (p.ndim <= 1 or id(p) in nwd)]
        common = {"lr": lr * mult, "lr_mult": mult, "fixed_lr": bool(g.get("fixed_lr", False))}
        if plain:
            out.append({"name": name, "params": plain, "weight_decay": wd, **common})
        if no_decay:
            out.append(
                {"name": f"{name}/no_decay", "params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **common}
            )
    missing = [names.get(i, "?") for i in trainable - seen]
    if missing:
        raise ValueError(f"trainable parameters in no parameter group: {sorted(missing)[:5]}")
    if not out:
        raise ValueError("the method has no trainable parameters")
    return out


def build_optimizer(
    params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eta: float = 0.001,
    exclude_1d: bool | None = None,
) -> Optimizer:
    """Build an optimiser by name: ``"adam" | "adamw" | "sgd" | "lars"``.

    ``exclude_1d`` (default: True for LARS, False otherwise) puts the 1-D
    parameters (biases, norms) in a group without weight decay and, for LARS,
    without the trust ratio. Pre-built parameter groups (a list of dicts) are
    passed through unchanged. ``adam`` uses coupled L2 weight decay (as the
    reference MMCR recipes), ``adamw`` decoupled decay.
    """
    key = name.lower().strip()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if exclude_1d is None:
        exclude_1d = key == "lars"
    if isinstance(params_or_model, nn.Module):
        groups: list[Any] = param_groups(params_or_model, weight_decay, exclude_1d)
    else:
        items = list(params_or_model)
        if items and isinstance(items[0], dict):
            groups = items
        else:
            groups = param_groups(items, weight_decay, exclude_1d)
    if not groups:
        raise ValueError("build_optimizer got no trainable parameters")
    if key == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, exclude_1d=exclude_1d)


# ------------------------------------------------------------------ lr and schedules


def optimizer_from_config(method: nn.Module, cfg: Any, global_batch: int) -> tuple[Optimizer, float]:
    """The optimiser a run with ``cfg`` (an :class:`~selfsup.engine.config.OptimConfig`) builds for ``method`` at
    ``global_batch`` images per step, and its peak lr: ``cfg.lr`` scaled by ``cfg.scale_lr``, the method's parameter
    groups (1-D parameters without weight decay when ``exclude_1d`` or LARS), ``base_weight_decay`` recorded in each
    group for the weight-decay schedule. The engine and the benches build it here, so they cannot drift apart."""
    lr = scaled_lr(cfg.lr, global_batch, rule=cfg.scale_lr)
    groups = method_param_groups(method, lr, cfg.weight_decay, cfg.exclude_1d or cfg.name == "lars")
    opt = build_optimizer(
        groups,
        cfg.name,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        betas=tuple(cfg.betas),
        eta=cfg.eta,
    )
    for group in opt.param_groups:  # the weight-decay schedule (optim.weight_decay_end) scales from these
        group["base_weight_decay"] = group["weight_decay"]
    return opt, lr


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256, rule: str = "linear") -> float:
    """Learning rate scaled with the global batch size.

    ``linear``: ``base_lr · B / reference`` (e.g. 0.6 × 2048/256 = 4.8);
    ``sqrt``: ``base_lr · sqrt(B / reference)``; ``none``: ``base_lr``.
    """
    if global_batch <= 0 or reference <= 0:
        raise ValueError(f"global_batch and reference must be positive, got {global_batch}, {reference}")
    if rule == "linear":
        return base_lr * global_batch / reference
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference)
    if rule == "none":
        return float(base_lr)
    raise ValueError(f"unknown lr scaling rule {rule!r}; valid: {', '.join(LR_RULES)}")


def _check_schedule_args(total_steps: int, warmup_steps: int, final_lr_ratio: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    if final_lr_ratio < 0:
        raise ValueError(f"final_lr_ratio must be >= 0, got {final_lr_ratio}")


def _factor(step: int, total_steps: int, warmup_steps: int, final_lr_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at 0-based optimiser ``step``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # Half-cosine from 1 (first step after warm-up) to final_lr_ratio (last step, total_steps - 1).
    span = total_steps - 1 - warmup_steps
    t = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr_ratio: float = 0.0) -> float:
    """Learning rate at 0-based optimiser ``step``: linear warm-up, then half-cosine.

    * ``step < warmup_steps``: ``peak_lr · (step + 1) / warmup_steps`` (never 0;
      the last warm-up step reaches ``peak_lr``);
    * then ``peak_lr · (r + (1 - r) · ½(1 + cos(π t)))`` with
      ``t = (step - warmup_steps) / (total_steps - 1 - warmup_steps)``, so the lr is
      ``peak_lr`` right after warm-up and exactly ``r · peak_lr`` at the last step
      ``total_steps - 1`` (and after it), ``r = final_lr_ratio``.
    """
    _check_schedule_args(total_steps, warmup_steps, final_lr_ratio)
    return peak_lr * _factor(step, total_steps, warmup_steps, final_lr_ratio, "cosine")


class WarmupSchedule:
    """Picklable ``LambdaLR`` factor: warm-up then cosine or constant.

    Holds only plain numbers and a string, so ``LambdaLR.state_dict()`` (which stores
    ``__dict__`` of non-function lambdas) loads with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        final_lr_ratio: float = 0.0,
        schedule: str = "cosine",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        _check_schedule_args(total_steps, warmup_steps, final_lr_ratio)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_lr_ratio = float(final_lr_ratio)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return _factor(step, self.total_steps, self.warmup_steps, self.final_lr_ratio, self.schedule)

    def __repr__(self) -> str:
        return (
            f"WarmupSchedule(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
            f"final_lr_ratio={self.final_lr_ratio}, schedule={self.schedule!r})"
        )


class FixedSchedule:
    """Picklable ``LambdaLR`` factor 1 at every step: a group that keeps its peak lr (``fixed_lr``)."""

    def __call__(self, step: int) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "FixedSchedule()"


def build_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    final_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> LambdaLR:
    """Per-step ``LambdaLR``: the group's lr (its peak) times :class:`WarmupSchedule`, or constant for a group marked
    ``fixed_lr`` (SimSiam's predictor, ``fix_pred_lr``: neither warm-up nor decay, as the official code).

    Call ``scheduler.step()`` after every optimiser step (Lightning: ``interval="step"``).
    """
    warm = WarmupSchedule(total_steps, warmup_steps, final_lr_ratio, schedule)
    lambdas = [FixedSchedule() if g.get("fixed_lr") else warm for g in optimizer.param_groups]
    return LambdaLR(optimizer, lr_lambda=lambdas)
