"""The lightly side's plain training loop, as lightly's examples write it (a ``DataLoader`` with worker processes,
``torch.optim``, lightly's schedules), with the recipe's optimiser rules; and the step clock both sides share."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .api import BUILDERS, Ctx, Unsupported
from .transforms import PILImages

BATCHED_NOTE = (
    "views: selfsup makes them as one batched op on uint8 tensors in the training step (crop boxes not rounded to "
    "whole pixels, no antialiasing, jitter in the fixed order brightness, contrast, saturation, hue); lightly per "
    "image with torchvision / PIL in the DataLoader workers (jitter in a random order)"
)


def plain(ns: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts / lists."""
    if hasattr(ns, "__dict__") and not isinstance(ns, (str, bytes, type)):
        return {k: plain(v) for k, v in vars(ns).items()}
    if isinstance(ns, (list, tuple)):
        return type(ns)(plain(v) for v in ns)
    return ns


class StepClock:
    """Wall-clock time at the end of every optimiser step (after the device's queued work: ``sync``); the seconds per
    step after the warm-up steps."""

    def __init__(self, sync: bool = False) -> None:
        self.ends: list[float] = []
        self.sync = sync

    def tick(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> tuple[float, int]:
        """``(s/step, timed steps)``: from the end of step ``warmup`` to the end of the last step (at least one step
        timed: ``warmup`` is cut to ``steps - 1``)."""
        n = len(self.ends)
        if n < 2:
            return float("nan"), 0
        w = max(1, min(warmup, n - 1))
        return (self.ends[-1] - self.ends[w - 1]) / (n - w), n - w


TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token")


def recipe_param_groups(groups: Sequence[dict], optim_cfg, batch_size: int, no_decay_ids: set[int]) -> list[dict]:
    """Optimiser groups with the recipe's rules (``selfsup.engine.optim.method_param_groups``): each group's lr is the
    recipe's (``scale_lr`` applied) times its ``lr_mult``; with ``optim.exclude_1d`` (always for LARS) 1-D parameters,
    what a ``no_weight_decay()`` names (``no_decay_ids``) and the ViT tokens / position tables get no weight decay.

    ``groups``: ``[{"name", "params": [(name, parameter)], optional "lr_mult", optional "fixed_lr"}]``; parameters
    that do not require gradients (teachers, frozen gains) are left out. Each returned group carries ``peak_lr``,
    ``fixed_lr`` and ``base_weight_decay`` for the per-step schedules.
    """
    from selfsup.engine.optim import scaled_lr

    lr = scaled_lr(optim_cfg.lr, batch_size, rule=optim_cfg.scale_lr)
    exclude = bool(optim_cfg.exclude_1d) or optim_cfg.name == "lars"
    out = []
    for g in groups:
        decay, no_decay = [], []
        for name, p in g["params"]:
            if not p.requires_grad:
                continue
            skip = exclude and (p.ndim <= 1 or id(p) in no_decay_ids or name.rsplit(".", 1)[-1] in TOKEN_NAMES)
            (no_decay if skip else decay).append(p)
        peak = lr * float(g.get("lr_mult", 1.0))
        common = {"lr": peak, "peak_lr": peak, "fixed_lr": bool(g.get("fixed_lr", False))}
        for params, wd, suffix in ((decay, optim_cfg.weight_decay, ""), (no_decay, 0.0, "/no_decay")):
            if params:
                out.append({"name": g["name"] + suffix, "params": params, "weight_decay": wd, **common})
    for g in out:
        g["base_weight_decay"] = g["weight_decay"]
    return out


def torch_optimizer(groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    """The recipe's optimiser as a lightly user builds it: ``torch.optim`` Adam (coupled L2, as selfsup's ``adam``),
    AdamW or SGD; LARS is lightly's (``lightly.utils.lars.LARS``)."""
    name, lr = optim_cfg.name, optim_cfg.lr
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.eta)
    raise Unsupported(f"optimiser {name!r}")


def clip_gradients(params, max_norm: float, per_param: bool) -> None:
    """The recipe's clipping: the global norm (``clip_grad_norm_``) or each parameter's own (DINO's ``clip_gradients``)."""
    grads = [p for p in params if p.grad is not None]
    if not per_param:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return
    for p in grads:
        coef = max_norm / (float(p.grad.detach().norm(2)) + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)


def to_device(batch: Any, device: str) -> Any:
    """A loader batch (tensors in nested lists / tuples) on ``device``."""
    if device == "cpu":
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def len_train(data_cfg) -> int:
    from selfsup.data.build import open_source

    source = open_source(data_cfg)
    return len(source.decoded(data_cfg.train_split) if source.in_memory else source.raw(data_cfg.train_split))


def make_ctx(name: str, cfg, backbone: nn.Module, total: int) -> Ctx:
    from selfsup.data.build import local_pipelines, train_pipelines

    data = cfg.data
    return Ctx(name, plain(cfg.method.init_args), backbone, data, train_pipelines(data), local_pipelines(data), total)


def check_peer(name: str, cfg, backbone: nn.Module) -> None:
    """Build lightly's side on a copy (random state untouched): :class:`Unsupported` if lightly cannot express it."""
    with torch.random.fork_rng():
        BUILDERS[name](make_ctx(name, cfg, copy.deepcopy(backbone), 1))


def train_peer(
    name: str,
    cfg,
    backbone: nn.Module,
    steps: int,
    warmup: int,
    workers: int,
    bf16: bool,
    device: str = "cpu",
    log_every: int = 50,
) -> tuple[nn.Module, dict]:
    """lightly's implementation of ``name`` with the recipe ``cfg``'s settings, trained for ``steps`` steps in a plain
    loop; returns the trained backbone and the record (s/step, components, differences)."""
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

    from selfsup.engine.optim import no_weight_decay_ids

    data, optim = cfg.data, cfg.optim
    per_epoch = max(1, len_train(data) // int(data.batch_size))
    total = min(steps, int(cfg.trainer.max_epochs) * per_epoch) if cfg.trainer.max_epochs else steps
    seed = int(cfg.trainer.seed)
    torch.manual_seed(seed)  # heads, shuffling, masks: lightly draws from torch's, Python's and NumPy's global RNGs
    random.seed(seed)
    np.random.seed(seed)
    peer = BUILDERS[name](make_ctx(name, cfg, backbone, total))
    dataset = PILImages(data, peer.transform)
    loader = DataLoader(
        dataset,
        batch_size=int(data.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=peer.collate_fn,
    )
    groups = recipe_param_groups(peer.groups, optim, int(data.batch_size), no_weight_decay_ids(peer.model))
    optimizer = torch_optimizer(groups, optim)
    warmup_lr = min(total, round(optim.warmup_epochs * per_epoch))
    params = [p for g in groups for p in g["params"]]
    peer.model.to(device)
    clock, t0, it, step = StepClock(sync=device == "cuda"), time.perf_counter(), iter(loader), 0
    while step < total:
        try:
            batch = to_device(next(it), device)
        except StopIteration:  # the next epoch (the examples' `for epoch ...: for batch in dataloader`)
            it = iter(loader)
            continue
        epoch = step // per_epoch
        factor = (
            cosine_warmup_schedule(step, total, 1.0, optim.final_lr_ratio, warmup_lr, 0.0)
            if optim.schedule == "cosine"
            else min(1.0, (step + 1) / max(1, warmup_lr))
        )
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * (1.0 if g["fixed_lr"] else factor)
            if optim.weight_decay_end is not None and g["base_weight_decay"] > 0:
                end = g["base_weight_decay"] * optim.weight_decay_end / optim.weight_decay
                g["weight_decay"] = cosine_schedule(step, total + 1, g["base_weight_decay"], end)
        peer.before_step(step)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = peer.loss(batch, step, epoch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"lightly {name}: non-finite loss {float(loss)} at step {step}")
        loss.backward()
        if optim.clip_grad is not None:
            clip_gradients(params, optim.clip_grad, optim.clip_grad_per_param)
        peer.after_backward(step, epoch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peer.after_step(step)
        clock.tick()
        step += 1
        if log_every and (step % log_every == 0 or step == total):
            print(f"  lightly {name}: step {step}/{total} loss {float(loss.detach()):.4f}", flush=True)
    del it, loader
    sps, timed = clock.seconds_per_step(warmup)
    return backbone, {
        "steps": step,
        "seconds_per_step": sps,
        "timed_steps": timed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "precision": "bf16-mixed" if bf16 else "32-true",
        "workers": workers,
        "components": peer.components,
        "differences": [*peer.differences, BATCHED_NOTE],
    }
