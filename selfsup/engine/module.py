"""One LightningModule for every method.

It owns what is generic: views (made by one call, :meth:`SelfSupModule.make_views`, that the method can
also call), the :class:`~selfsup.methods.base.Batch` the method receives, the method's keyed random
stream, optimiser parameter groups and the per-step schedule, the non-finite-loss check, logging, the
teachers' EMA step, and what a checkpoint carries beyond Lightning's own state (format version, backbone
spec and where each declared backbone lives in the state dict, RNG states). The method owns the model
and the loss.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor

from selfsup.data.keyed import key_seed
from selfsup.engine.checkpoint import CHECKPOINT_KEY, FORMAT, check_compatible, upgrade_checkpoint
from selfsup.engine.config import OptimConfig
from selfsup.engine.optim import build_optimizer, build_scheduler, method_param_groups, scaled_lr
from selfsup.methods.base import Batch, Method

# Independent random streams of one (step, rank, micro-batch).
STREAM_VIEWS, STREAM_METHOD = 0, 1


class SelfSupModule(L.LightningModule):
    """Trains ``method`` with ``optim``.

    Args:
        method: the method (a :class:`~selfsup.methods.base.Method`).
        optim: optimiser / schedule config.
        view_maker: ``fn(images, generator) -> [B, V, C, h, w]``: ``BatchedViews`` (views made on the
            device from uint8 batches, ``[B, 3, H, W]`` or loader-cropped ``[B, V, 3, h, w]``) or
            ``PerImageViews`` (per-image mode: the loader already made the training views; this serves
            :meth:`make_views` calls of the method).
        views_on_device: the loader yields images, not views; ``view_maker`` makes every batch's views.
        seed: run seed.
        channels_last: feed NHWC tensors.
        meta: JSON-able facts stored in every checkpoint under ``"selfsup"`` (config, dataset...).
    """

    def __init__(
        self,
        method: Method,
        optim: OptimConfig,
        view_maker: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
        views_on_device: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        meta: Optional[dict] = None,
    ):
        super().__init__()
        self.method = method
        self.optim_cfg = optim
        self.view_maker = view_maker
        self.views_on_device = views_on_device and view_maker is not None
        self.seed = seed
        self.channels_last = channels_last
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------------------ randomness
    def generator(self, stream: int, step: int, micro: int = 0, device: Optional[torch.device] = None) -> torch.Generator:
        """A generator keyed on ``(seed, step, rank, micro-batch, stream)``: the same numbers after a resume."""
        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(key_seed(self.seed, step, self.global_rank, micro, stream))
        return gen

    def make_views(self, images: Tensor, step: int, micro: int = 0) -> Tensor:
        """Views ``[B, V, C, h, w]`` of uint8 ``images`` for ``step``, exactly as the engine makes them."""
        if self.view_maker is None:
            raise RuntimeError("no view maker: this run got ready-made views from its dataset")
        with torch.autocast(images.device.type, enabled=False):
            return self.view_maker(images, self.generator(STREAM_VIEWS, step, micro, images.device))

    def on_fit_start(self) -> None:
        self.method.bind_view_maker(self.make_views if self.view_maker is not None else None)


    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """The loss, or ``{"loss", "embeddings"}`` when the method returned ``"embeddings"`` (detached, never
        logged; :class:`~selfsup.engine.spectrum.SpectrumMonitor` reads them from the step output)."""
        images, labels, indices = batch
        step, micro = self.global_step, batch_idx % self.trainer.accumulate_grad_batches
        views = self.make_views(images, step, micro) if self.views_on_device else images
        if self.channels_last:
            b, v = views.shape[:2]
            views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, v))
        max_steps = int(self.trainer.estimated_stepping_batches)
        inp = Batch(views=views, labels=torch.as_tensor(labels), indices=torch.as_tensor(indices), step=step,
                    max_steps=max_steps, epoch=self.current_epoch,
                    generator=self.generator(STREAM_METHOD, step, micro, views.device),
                    steps_per_epoch=self._steps_per_epoch())
        hint = ("lower the learning rate, use fp32 (--trainer.precision 32-true) or check the data; "
                "checkpoints already written are left untouched")
        try:
            out = self.method.training_loss(inp)
        except FloatingPointError as e:
            raise FloatingPointError(f"non-finite values at step {step}, epoch {self.current_epoch}: {e}; {hint}") from e
        embeddings = out.pop("embeddings", None)  # spectrum seam: name -> detached tensors, never a logged scalar
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {step}, epoch {self.current_epoch}; {hint}")
        logs = {f"train/{k}": v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        for group in self.optimizers().param_groups[:1]:
            logs["train/lr"] = torch.tensor(group["lr"] / group.get("lr_mult", 1.0))
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=views.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=views.shape[0])
        if embeddings:
            return {"loss": loss, "embeddings": embeddings}
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only after a real optimiser step (gradient accumulation). global_step already counts it, so the step just
        # taken is global_step - 1: the first EMA update uses tau(0), as the seeds do.
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.method.on_train_step_end(self.global_step - 1, int(self.trainer.estimated_stepping_batches))

    def _steps_per_epoch(self) -> int:
        t = self.trainer
        n = t.num_training_batches
        if not isinstance(n, int) or n <= 0:
            n = max(1, int(t.estimated_stepping_batches) // max(1, t.max_epochs or 1))
            return max(1, n)
        return max(1, n // t.accumulate_grad_batches)

    def global_batch_size(self, images_per_device: int) -> int:
        t = self.trainer
        return images_per_device * t.world_size * t.accumulate_grad_batches

    def configure_optimizers(self):
        cfg = self.optim_cfg
        lr = scaled_lr(cfg.lr, self.global_batch_size(int(self.meta.get("batch_size", 1))), rule=cfg.scale_lr)
        groups = method_param_groups(self.method, lr, cfg.weight_decay, cfg.exclude_1d or cfg.name == "lars")
        optimizer = build_optimizer(groups, cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    betas=tuple(cfg.betas), eta=cfg.eta)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(total, int(round(cfg.warmup_epochs * self._steps_per_epoch())))
        scheduler = build_scheduler(optimizer, total, warmup, cfg.final_lr_ratio, cfg.schedule)
        self.meta["peak_lr"] = lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict:
        """What evaluation needs without the method: backbone spec and where each backbone's weights live."""
        names = {id(m): n for n, m in self.method.named_modules()}
        backbones = {}
        for which in ["online", *self.method.teacher_names]:
            try:
                backbones[which] = f"method.{names[id(self.method.backbone_for(which))]}."
            except ValueError:  # a teacher without a backbone copy
                continue
        return {"format": FORMAT, "method": type(self.method).__name__, "backbone": dict(self.method.backbone_spec),
                "backbones": backbones, "num_features": int(self.method.num_features)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        np_state = np.random.get_state()
        checkpoint[CHECKPOINT_KEY] = {
            **_jsonable(self.meta),
            **_jsonable(self.checkpoint_meta()),
            "optim": _jsonable(asdict(self.optim_cfg)),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": _py_state_to_tensor(random.getstate()),
                "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                "numpy_pos": int(np_state[2]),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint)  # format 1 -> current, in place (keys of the teacher, backbone spec)
        check_compatible(checkpoint[CHECKPOINT_KEY], self.checkpoint_meta())
        rng = checkpoint[CHECKPOINT_KEY].get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(_py_state_from_tensor(rng["python"]))
            np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))


def _py_state_to_tensor(state: tuple) -> Tensor:
    version, internal, gauss = state
    return torch.tensor([version, *internal, -1 if gauss is None else 0], dtype=torch.int64)


def _py_state_from_tensor(t: Tensor) -> tuple:
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
