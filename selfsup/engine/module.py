"""One LightningModule for every method.

It owns what is generic: optimiser and per-step schedule, on-device view generation, the
non-finite-loss check, logging, EMA hooks and what a checkpoint carries beyond Lightning's own state
(RNG states, the backbone config evaluation needs). The method owns the model and the loss.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from selfsup.engine.config import OptimConfig
from selfsup.engine.optim import build_optimizer, build_scheduler, param_groups, scaled_lr
from selfsup.methods.base import Method

CHECKPOINT_KEY = "selfsup"


class SelfSupModule(L.LightningModule):
    """Trains ``method`` with ``optim``.

    Args:
        method: the method (an ``nn.Module`` with ``training_loss``).
        optim: optimiser / schedule config.
        view_generator: optional ``BatchedViews``; when set, a training batch of uint8 images
            ``[B, 3, H, W]`` is turned into ``[B, V, 3, h, w]`` views on the device, with an RNG keyed on
            ``(seed, global_step, rank)`` so that a resumed run draws exactly the same views.
        seed: run seed.
        channels_last: feed NHWC tensors.
        meta: JSON-able facts stored in every checkpoint under ``"selfsup"`` (config, dataset...).
    """

    def __init__(
        self,
        method: Method,
        optim: OptimConfig,
        view_generator: Optional[torch.nn.Module] = None,
        seed: int = 0,
        channels_last: bool = False,
        meta: Optional[dict] = None,
    ):
        super().__init__()
        self.method = method
        self.optim_cfg = optim
        self.view_generator = view_generator
        self.seed = seed
        self.channels_last = channels_last
        self.meta = dict(meta or {})

    # ----------------------------------------------------------------- data
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if self.view_generator is not None and images.dim() == 4:
            gen = torch.Generator(device=images.device)
            gen.manual_seed(_mix(self.seed, self.global_step, self.global_rank))
            images = self.view_generator(images, generator=gen)
        return images, labels

    # ------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        if self.channels_last:
            b, v = views.shape[:2]
            views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, v))
        hint = ("lower the learning rate, use fp32 (--trainer.precision 32-true) or check the data; "
                "checkpoints already written are left untouched")
        self.method.step, self.method.max_steps = self.global_step, int(self.trainer.estimated_stepping_batches)
        try:
            out = self.method.training_loss(views)
        except FloatingPointError as e:
            raise FloatingPointError(f"non-finite values at step {self.global_step}, epoch {self.current_epoch}: {e}; "
                                     f"{hint}") from e
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, epoch {self.current_epoch}; {hint}"
            )
        logs = {f"train/{k}": v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        logs["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=views.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=views.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only after a real optimiser step (gradient accumulation); global_step already counts it.
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.method.on_train_step_end(self.global_step, int(self.trainer.estimated_stepping_batches))

    def global_batch_size(self, images_per_device: int) -> int:
        t = self.trainer
        return images_per_device * t.world_size * t.accumulate_grad_batches

    def configure_optimizers(self):
        cfg = self.optim_cfg
        images_per_device = int(self.meta.get("batch_size", 1))
        lr = scaled_lr(cfg.lr, self.global_batch_size(images_per_device), rule=cfg.scale_lr)
        exclude_1d = cfg.exclude_1d or cfg.name == "lars"
        params = [p for p in self.method.parameters() if p.requires_grad]
        trainable = {id(p) for p in params}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) in trainable]}
            for g in param_groups(self.method, cfg.weight_decay, exclude_1d)
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = build_optimizer(
            groups, cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta,
            exclude_1d=exclude_1d,
        )
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = self.trainer.num_training_batches
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        steps_per_epoch = max(1, steps_per_epoch // self.trainer.accumulate_grad_batches)
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, total, warmup, cfg.final_lr_ratio, cfg.schedule)
        self.meta["peak_lr"] = lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        np_state = np.random.get_state()
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "backbone_config": dict(self.method.backbone_config),
            "method": type(self.method).__name__,
            "backbone_prefix": "method.backbone.",
            "feature_dim": int(self.method.feature_dim),
            "optim": asdict(self.optim_cfg),
            **_jsonable(self.meta),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": _py_state_to_tensor(random.getstate()),
                "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                "numpy_pos": int(np_state[2]),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError("this checkpoint was not written by selfsup (no 'selfsup' entry); cannot resume from it")
        if meta["backbone_config"] != self.method.backbone_config:
            raise ValueError(
                f"checkpoint backbone {meta['backbone_config']} differs from the configured "
                f"{self.method.backbone_config}; resume with the run's own config"
            )
        rng = meta.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(_py_state_from_tensor(rng["python"]))
            np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))


def _mix(*xs: int) -> int:
    """Deterministic 63-bit mix of a few integers (seed for a per-step generator)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def _py_state_to_tensor(state: tuple) -> torch.Tensor:
    version, internal, gauss = state
    return torch.tensor([version, *internal, -1 if gauss is None else 0], dtype=torch.int64)


def _py_state_from_tensor(t: torch.Tensor) -> tuple:
    vals = t.tolist()
    return (vals[0], tuple(vals[1:-1]), None)


def _jsonable(d: Any) -> Any:
    """Keep only plain data (so checkpoints load with ``weights_only=True``)."""
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    return str(d)
