"""One LightningModule for every method.

It owns what is generic: views (made by one call, :meth:`SelfSupModule.make_views`, that the method can
also call), the :class:`~selfsup.methods.base.Batch` the method receives, the method's keyed random
stream, optimiser parameter groups and the per-step schedule, the non-finite-loss check, logging, the
teachers' EMA step, and what a checkpoint carries beyond Lightning's own state (format version, backbone
spec and where each declared backbone lives in the state dict, RNG states), and the compiled training step
(``trainer.compile``: :func:`compile_trainable_modules`). The method owns the model and the loss.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from selfsup.data.keyed import key_seed
from selfsup.data.multicrop import ViewGroups, split_views
from selfsup.engine.checkpoint import CHECKPOINT_KEY, FORMAT, check_compatible, upgrade_checkpoint
from selfsup.engine.compile import TrainingCompiled, check_compile_available, compile_mode, compile_trainable_modules
from selfsup.engine.config import OptimConfig
from selfsup.engine.optim import build_scheduler, optimizer_from_config
from selfsup.methods.base import Batch, EpochExamples, Method
from selfsup.schedules import cosine

# Independent random streams of one (step, rank, micro-batch).
STREAM_VIEWS, STREAM_METHOD = 0, 1
# Micro-batch keys of a planned epoch's one-off draws (its fixed views, chunk c at EPOCH_MICRO + c; the method's).
EPOCH_MICRO = 1 << 20
RANK_STATE_KEY = "selfsup_rank_state"


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
        compile: ``trainer.compile``: ``False``, ``True`` or a ``torch.compile`` mode. The method's trainable modules
            are compiled in place when the fit starts, on every process (:func:`compile_trainable_modules`).
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
        compile: Union[bool, str] = False,
    ):
        super().__init__()
        self.compile_mode = compile_mode(compile)  # None: eager
        self.compiled_modules: list[str] = []  # names of the method's children compiled (set when the fit starts)
        self._compile_checked = False
        self.method = method
        self.optim_cfg = optim
        self.view_maker = view_maker
        self.views_on_device = views_on_device and view_maker is not None
        self.seed = seed
        self.channels_last = channels_last
        self.meta = dict(meta or {})
        self._epoch_cache: Optional[dict[str, Any]] = None  # a planned epoch's views and index -> row map
        self._pending_rank_state: Optional[dict] = None  # from a checkpoint, for the resumed epoch

    # ------------------------------------------------------------------------------ randomness
    def generator(
        self, stream: int, step: int, micro: int = 0, device: Optional[torch.device] = None
    ) -> torch.Generator:
        """A generator keyed on ``(seed, step, rank, micro-batch, stream)``: the same numbers after a resume."""
        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(key_seed(self.seed, step, self.global_rank, micro, stream))
        return gen

    def make_views(self, images: Tensor, step: int, micro: int = 0) -> ViewGroups:
        """Views ``[B, V, C, h, w]`` of uint8 ``images`` for ``step``, exactly as the engine makes them (with
        multi-crop the pair ``(global, local)``)."""
        if self.view_maker is None:
            raise RuntimeError("no view maker: this run got ready-made views from its dataset")
        with torch.autocast(images.device.type, enabled=False):
            return self.view_maker(images, self.generator(STREAM_VIEWS, step, micro, images.device))

    def on_fit_start(self) -> None:
        self.method.bind_view_maker(self.make_views if self.view_maker is not None else None)
        if self.compile_mode is not None:
            # Here, on every process, after the strategy moved the model, converted SyncBatchNorm and wrapped it in
            # DDP (a module compiled before a spawn would lose it: nn.Module pickles without its compiled call).
            # The graphs are captured at the first training step, inside DDP's forward, where dynamo sees the DDP
            # module (its DDP optimiser, torch._dynamo.config.optimize_ddp, splits graphs at the gradient buckets).
            check_compile_available(self.device)
            self.compiled_modules = compile_trainable_modules(self.method, self.compile_mode)
            self._compile_checked = False
            rank_zero_info(
                f"trainer.compile: compiling {', '.join(self.compiled_modules) or 'nothing'} of "
                f"{type(self.method).__name__} (mode {self.compile_mode}); the first training step compiles them"
            )

    # ------------------------------------------------------------------------------ planned epochs
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Not on_train_epoch_start: Lightning skips that hook when a run resumes in the middle of an epoch.
        if self._planned and (self._epoch_cache is None or self._epoch_cache["epoch"] != self.current_epoch):
            self.prepare_planned_epoch()

    @property
    def _planned(self) -> bool:
        return self.method.epoch_plan() is not None

    def prepare_planned_epoch(self) -> None:
        """A planned epoch (``method.epoch_plan()``): load this rank's examples, make their views once (keyed on the
        epoch's first step, so a resumed run makes the same ones), and let the method prepare the epoch."""
        dm, epoch = self.trainer.datamodule, self.current_epoch
        first = epoch * self._steps_per_epoch()
        t0 = time.perf_counter()
        indices = dm.epoch_examples(epoch)
        items, labels = dm.load_examples(indices, epoch)
        items = items.to(self.device, non_blocking=True)
        if self.views_on_device:
            bs = int(self.meta.get("batch_size", 256))
            views = torch.cat(
                [
                    self.make_views(items[c : c + bs], first, EPOCH_MICRO + j)
                    for j, c in enumerate(range(0, items.shape[0], bs))
                ]
            )
        else:
            views = items
        if views.dim() == 4:  # one view per example
            views = views[:, None]
        idx = torch.as_tensor(indices, dtype=torch.long)
        self._epoch_cache = {"epoch": epoch, "views": views, "rows": {int(i): r for r, i in enumerate(indices)}}
        pending, self._pending_rank_state = self._pending_rank_state, None
        if pending is not None and int(pending.get("epoch", -1)) == epoch:
            self.method.load_rank_state(pending)
        t1 = time.perf_counter()
        logs = self.method.prepare_epoch(
            EpochExamples(
                views=views,
                labels=labels,
                indices=idx.to(self.device),
                epoch=epoch,
                step=first,
                generator=self.generator(STREAM_METHOD, first, EPOCH_MICRO, self.device),
            )
        )
        logs = {f"epoch/{k}": torch.tensor(float(v)) for k, v in (logs or {}).items()}
        logs["epoch/views_s"] = torch.tensor(t1 - t0)
        logs["epoch/prepare_s"] = torch.tensor(time.perf_counter() - t1)
        # Epoch-level values, logged with the epoch's last step and averaged over ranks (each searched its own share).
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(indices))

    def _cached_views(self, indices: Tensor) -> Tensor:
        cache = self._epoch_cache
        if cache is None or cache["epoch"] != self.current_epoch:
            raise RuntimeError("a planned epoch's step ran before its examples were prepared (on_train_batch_start)")
        try:
            rows = torch.tensor([cache["rows"][int(i)] for i in indices.tolist()], device=cache["views"].device)
        except KeyError as e:
            raise RuntimeError(f"example {e} is not one of epoch {self.current_epoch}'s examples") from None
        return cache["views"][rows]

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """The loss, or ``{"loss", "embeddings"}`` when the method returned ``"embeddings"`` (detached, never
        logged; :class:`~selfsup.engine.spectrum.SpectrumMonitor` reads them from the step output)."""
        images, labels, indices = batch
        step, micro = self.global_step, batch_idx % self.trainer.accumulate_grad_batches
        if self._planned:  # a planned epoch: the loader gave indices, the views are cached
            views = self._cached_views(torch.as_tensor(indices))
        else:
            views = self.make_views(images, step, micro) if self.views_on_device else images
        views, local_views = split_views(views)  # multi-crop: (global, local)
        if self.channels_last:
            views, local_views = _channels_last(views), _channels_last(local_views)
        max_steps = int(self.trainer.estimated_stepping_batches)
        inp = Batch(
            views=views,
            labels=torch.as_tensor(labels),
            indices=torch.as_tensor(indices),
            step=step,
            max_steps=max_steps,
            epoch=self.current_epoch,
            generator=self.generator(STREAM_METHOD, step, micro, views.device),
            steps_per_epoch=self._steps_per_epoch(),
            local_views=local_views,
        )
        hint = (
            "lower the learning rate, use fp32 (--trainer.precision 32-true) or check the data; "
            "checkpoints already written are left untouched"
        )
        try:
            out = self.method.training_loss(inp)
        except FloatingPointError as e:
            raise FloatingPointError(
                f"non-finite values at step {step}, epoch {self.current_epoch}: {e}; {hint}"
            ) from e
        if self.compiled_modules and not self._compile_checked:
            self._compile_checked = True
            self._warn_uncalled_compiled_modules()
        embeddings = out.pop("embeddings", None)  # spectrum seam: name -> detached tensors, never a logged scalar
        loss, logs = training_logs(out, type(self.method).__name__)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {step}, epoch {self.current_epoch}; {hint}"
            )
        for group in self.optimizers().param_groups[:1]:
            logs["train/lr"] = torch.tensor(group["lr"] / group.get("lr_mult", 1.0))
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=views.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=views.shape[0])
        if embeddings:
            return {"loss": loss, "embeddings": embeddings}
        return loss

    def _warn_uncalled_compiled_modules(self) -> None:
        idle = []
        for name in self.compiled_modules:
            call = getattr(self.method.get_submodule(name), "_compiled_call_impl", None)
            if isinstance(call, TrainingCompiled) and call.calls == 0:
                idle.append(name)
        if idle:
            rank_zero_warn(
                f"trainer.compile: the training step of {type(self.method).__name__} calls only submodules of "
                f"{', '.join(idle)}, never the whole module, so that part runs eagerly (no speed-up from compiling it)"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the backward pass, before the step (gradients unscaled): clip (``optim.clip_grad``), drop the
        gradients of what the method freezes at this step (``Method.frozen``), set the scheduled weight decay
        (``optim.weight_decay_end``). Pure functions of the step: a resumed run does the same."""
        cfg, step = self.optim_cfg, self.global_step
        if cfg.clip_grad is not None:
            clip_gradients(self.method.parameters(), cfg.clip_grad, cfg.clip_grad_per_param)
        for p in self.method.frozen(step, self.current_epoch):
            p.grad = None
        if cfg.weight_decay_end is not None:
            total = int(self.trainer.estimated_stepping_batches)
            for group in optimizer.param_groups:
                base = group.get("base_weight_decay", 0.0)
                if base > 0:
                    group["weight_decay"] = cosine(base, base * cfg.weight_decay_end / cfg.weight_decay, step, total)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the method's end-of-step work (its teachers' EMA step) for the step just taken
        (``global_step`` before it: the first EMA update uses tau(0), as the seeds do). Here, not in
        ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (where a step checkpoint is
        saved) before the module's, so a checkpoint of step k would miss step k's EMA update and a resume from it
        would not equal the uninterrupted run. Called once per real step (after gradient accumulation)."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.method.on_train_step_end(step, int(self.trainer.estimated_stepping_batches))

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
        batch = self.global_batch_size(int(self.meta.get("batch_size", 1)))
        optimizer, lr = optimizer_from_config(self.method, cfg, batch)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(total, round(cfg.warmup_epochs * self._steps_per_epoch()))
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
        return {
            "format": FORMAT,
            "method": type(self.method).__name__,
            "backbone": dict(self.method.backbone_spec),
            "backbones": backbones,
            "num_features": int(self.method.num_features),
            "signature": dict(self.method.checkpoint_signature()),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self.method.rank_state()
        if state is not None:  # every rank's (this hook runs on all of them; rank 0 writes the file)
            state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                states = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(states, state)
            else:
                states = [state]
            checkpoint[RANK_STATE_KEY] = states
        np_state = np.random.get_state()
        py_gauss = random.getstate()[2]
        checkpoint[CHECKPOINT_KEY] = {
            **_jsonable(self.meta),
            **_jsonable(self.checkpoint_meta()),
            "optim": _jsonable(asdict(self.optim_cfg)),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": _py_state_to_tensor(random.getstate()),
                "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                "numpy_pos": int(np_state[2]),
                # the cached second normal of random.gauss / numpy's legacy normal (NaN: none cached)
                "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss, dtype=torch.float64),
                "numpy_gauss": torch.tensor(np_state[4] if np_state[3] else float("nan"), dtype=torch.float64),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint)  # format 1 -> current, in place (keys of the teacher, backbone spec)
        check_compatible(checkpoint[CHECKPOINT_KEY], self.checkpoint_meta())
        _resume_inside_the_epoch(checkpoint)
        states = checkpoint.get(RANK_STATE_KEY)
        if states:
            if len(states) != self.trainer.world_size:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"the checkpoint holds the per-process state of {len(states)} process(es), this run has "
                    f"{self.trainer.world_size}: it starts afresh (a planned epoch is prepared again, a queue refills)"
                )
            elif self._planned:  # delivered with the resumed epoch's preparation (prepare_planned_epoch)
                self._pending_rank_state = states[self.global_rank]
            else:  # e.g. SwAV's queue: this rank's own, now
                self.method.load_rank_state(states[self.global_rank])
        rng = checkpoint[CHECKPOINT_KEY].get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            py_gauss = float(rng.get("python_gauss", float("nan")))  # absent in checkpoints before format 3
            version, internal, _ = _py_state_from_tensor(rng["python"])
            random.setstate((version, internal, None if math.isnan(py_gauss) else py_gauss))
            np_gauss = float(rng.get("numpy_gauss", float("nan")))
            has_gauss = 0 if math.isnan(np_gauss) else 1
            np_state = (
                "MT19937",
                rng["numpy"].numpy().astype(np.uint32),
                rng["numpy_pos"],
                has_gauss,
                np_gauss * has_gauss,
            )
            np.random.set_state(np_state)


def _channels_last(views: Optional[Tensor]) -> Optional[Tensor]:
    """``[B, V, C, H, W]`` views with each ``[C, H, W]`` image in channels-last memory order."""
    if views is None:
        return None
    b, v = views.shape[:2]
    return views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, v))


def clip_gradients(params, max_norm: float, per_param: bool = False) -> None:
    """Clip gradients in place: their global L2 norm to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``), or with
    ``per_param`` each parameter's own (DINO / iBOT: ``g ← g · min(1, max_norm / (||g|| + 1e-6))``)."""
    with_grad = [p for p in params if p.grad is not None]
    if not per_param:
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return
    for p in with_grad:
        coef = max_norm / (float(p.grad.detach().norm(2)) + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)


def training_logs(out: dict, method: str = "the method") -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, {"train/<name>": value})`` from what ``training_loss`` returned (``"embeddings"`` already taken out).

    ``loss`` must be a one-element floating tensor; every other entry is logged as ``train/<name>`` and must be a
    one-element tensor or a Python number. Anything else (a vector, a string) is an error naming the entry: return it
    under ``"embeddings"`` (tensors for the spectrum monitor) or reduce it to a scalar; nothing is dropped silently.
    """
    if "loss" not in out:
        raise ValueError(f"{method}.training_loss returned no 'loss' (keys: {sorted(out)})")
    loss = out["loss"]
    if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.is_floating_point()):
        raise ValueError(f"{method}.training_loss: 'loss' must be a one-element float tensor, got {_describe(loss)}")
    logs = {}
    for k, v in out.items():
        if torch.is_tensor(v) and v.numel() == 1:
            logs[f"train/{k}"] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            logs[f"train/{k}"] = torch.tensor(float(v))
        else:
            raise ValueError(
                f"{method}.training_loss returned '{k}' = {_describe(v)}: only scalars are logged; reduce it to one "
                "number, or return tensors for the spectrum monitor under 'embeddings'"
            )
    return loss, logs


def _describe(v: Any) -> str:
    return f"a tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else f"a {type(v).__name__}"


def _resume_inside_the_epoch(checkpoint: dict) -> None:
    """A run stopped by ``max_steps`` inside an epoch leaves Lightning's epoch "processed" but not completed, and
    Lightning would resume at the next epoch, skipping the rest of this one (and a planned epoch's prepared examples
    would no longer match the loader). The data module's state says how many of the epoch's batches were trained on:
    when some remain, mark the epoch as not processed, so Lightning resumes inside it, as after a step checkpoint."""
    data = next((v for k, v in checkpoint.items() if k.endswith("SelfSupData") and isinstance(v, dict)), None)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if not data or not progress or int(data.get("consumed_batches", 0)) == 0:
        return
    for part in ("total", "current"):
        p = progress[part]
        if p["processed"] == p["completed"] + 1 and p["started"] == p["processed"]:
            p["processed"] = p["completed"]


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
