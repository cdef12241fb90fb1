"""Assemble and run a pretraining job: data module + SelfSupModule + callbacks + Lightning Trainer."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from torch.utils.data import DataLoader

from selfsup.data.build import build_eval_dataset, build_train_views, num_classes, view_makers
from selfsup.data.keyed import KeyedDataset, PerImageViews
from selfsup.data.rounds import EpochPlan, IndexOnly, RoundSampler, rank_examples, steps_per_epoch
from selfsup.data.sampler import ShardedEpochSampler
from selfsup.engine.callbacks import KNNMonitor
from selfsup.engine.checkpoint import AtomicCheckpointIO, check_compatible, resolve_resume
from selfsup.engine.compile import check_compile_available, compile_mode
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.loggers import build_logger
from selfsup.engine.module import SelfSupModule
from selfsup.engine.progress import LineProgress, progress_mode
from selfsup.engine.spectrum import SPECTRUM_FILE, SpectrumMonitor
from selfsup.methods.base import Method
from selfsup.precision import native_bf16


class SelfSupData(L.LightningDataModule):
    """Training loader: ``(images or views, label, index)`` of ``data.train_split``, seeded order, sharded by
    rank, full batches, per-sample augmentation keyed on (seed, epoch, index), and a mid-epoch resume that
    starts after the batches the checkpoint had already consumed."""

    def __init__(self, cfg: DataConfig, seed: int, dataset=None, plan: Optional[EpochPlan] = None):
        super().__init__()
        self.cfg, self.seed, self.dataset, self.plan = cfg, seed, dataset, plan
        self._resume: tuple[int, int] = (0, 0)  # (epoch, batches of it already trained), from a checkpoint

    def _world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _batches_per_epoch(self) -> int:
        world = self._world()[1]
        if self.plan is not None:
            return steps_per_epoch(self.plan, self.cfg.batch_size, world)
        return (len(self.dataset) // world) // self.cfg.batch_size

    def epoch_examples(self, epoch: int) -> list[int]:
        """A planned epoch (:class:`~selfsup.data.rounds.EpochPlan`): this rank's example indices, in order."""
        rank, world = self._world()
        return rank_examples(len(self.dataset), self.plan, epoch, self.seed, rank, world)

    def load_examples(self, indices: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(samples stacked [E, ...], labels [E])`` of ``indices``, exactly as the training loader of ``epoch``
        would give them (per-image views keyed on (seed, epoch, index); uint8 images in batched mode)."""
        keyed = KeyedDataset(self.dataset, self.seed)
        workers = self.cfg.num_workers if len(indices) > 4 * self.cfg.batch_size else 0
        loader = DataLoader(
            keyed, batch_size=self.cfg.batch_size, sampler=[(epoch, i) for i in indices], num_workers=workers
        )
        items, labels = [], []
        for x, y, _ in loader:
            items.append(x)
            labels.append(torch.as_tensor(y))
        return torch.cat(items), torch.cat(labels)

    def state_dict(self) -> dict:
        """Where the data stream stands: the epoch and how many of its batches were trained on.

        A checkpoint is written at an optimiser-step boundary, so the run has consumed ``global_step *
        accumulate`` batches, ``epoch * batches_per_epoch`` of them in earlier epochs. A finished epoch
        is stored as the start of the next.
        """
        t, per_epoch = self.trainer, self._batches_per_epoch()
        done = t.global_step * t.accumulate_grad_batches - t.current_epoch * per_epoch
        if done >= per_epoch:
            return {"epoch": t.current_epoch + 1, "consumed_batches": 0}
        return {"epoch": t.current_epoch, "consumed_batches": max(0, done)}

    def load_state_dict(self, state: dict) -> None:
        # Restored before the trainer builds the loader (which it may iterate before calling set_epoch).
        self._resume = (int(state["epoch"]), int(state["consumed_batches"]))

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        n = len(self.dataset)
        if n // world < self.cfg.batch_size:
            raise ValueError(
                f"data.batch_size={self.cfg.batch_size} per device is larger than the {n // world} training images "
                f"each of the {world} process(es) gets; lower data.batch_size"
            )
        epoch, consumed = self._resume
        skip = consumed * self.cfg.batch_size
        if self.plan is not None:  # views come from the engine's epoch cache: the loader yields indices only
            sampler = RoundSampler(
                n,
                self.plan,
                self.cfg.batch_size,
                seed=self.seed,
                rank=rank,
                world_size=world,
                epoch=epoch,
                start=lambda e: skip if e == epoch else 0,
            )
            return DataLoader(IndexOnly(n), batch_size=self.cfg.batch_size, sampler=sampler, drop_last=True)
        sampler = ShardedEpochSampler(
            n,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            keyed=True,
            epoch=epoch,
            start=lambda e: skip if e == epoch else 0,
        )
        workers = self.cfg.num_workers
        return DataLoader(
            KeyedDataset(self.dataset, self.seed),
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


class SharedLastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``last.ckpt`` is shared with the run's other checkpointer (epochs and steps): the
    newest state, whichever of them saved it. Lightning's version counter made the second one write its own
    ``last-v1.ckpt``, so ``last.ckpt`` (what ``--trainer.resume true`` reads) could lag behind it. Only ``last.ckpt``
    is written over; epoch and step files keep the counter, so a run resumed from an older file never overwrites a
    newer one (it writes ``epoch0003-v1.ckpt``)."""

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        counter, self._enable_version_counter = self._enable_version_counter, False
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = counter


class FinalCheckpoint(L.Callback):
    """``last.ckpt`` always holds the final step: training that stops between periodic saves (``max_steps``,
    ``max_time``, ``max_epochs`` not a multiple of the period) writes it once more at the end."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved = None
        if self.path.is_file() and trainer.is_global_zero:
            saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        saved = trainer.strategy.broadcast(saved)
        if saved != trainer.global_step:
            trainer.save_checkpoint(self.path)


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> ``bf16-mixed`` when the device has native bf16 compute, else ``32-true``."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"


def _checkpoint_step(ckpt_path: Optional[str]) -> Optional[int]:
    if ckpt_path is None:
        return None
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def _check_resumable(ckpt_path: str, module: SelfSupModule) -> None:
    """Fail before any work when the checkpoint cannot continue this run (the same check as on load)."""
    from selfsup.eval.load import checkpoint_meta

    meta = checkpoint_meta(ckpt_path)
    if not meta:
        raise ValueError(
            f"'{ckpt_path}' was not written by selfsup pretrain (no 'selfsup' entry); cannot resume from it"
        )
    check_compatible(meta, module.checkpoint_meta(), path=f"'{ckpt_path}'")


def pretrain(
    method: Method,
    data: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    monitor: MonitorConfig,
    config: Optional[dict] = None,
    extra_callbacks: Sequence[L.Callback] = (),
    train_dataset=None,
) -> dict[str, Any]:
    """Pretrain ``method``; returns ``{"run_dir", "last_checkpoint", "knn": [...]}``.

    The run directory gets ``config.yaml``-equivalent ``config.json``, ``checkpoints/``, ``logs/`` and, with the
    spectrum monitor on, ``spectrum.jsonl``.

    With ``trainer.compile`` the method's trainable modules are compiled in place when the fit starts, on every
    process, after the strategy has wrapped the model (DDP); the graphs are captured at the first training step
    (:func:`selfsup.engine.compile.compile_trainable_modules`). Where compilation is unavailable the run fails before
    training starts.
    """
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings(
        "ignore", message=".*when logging on epoch level in distributed.*"
    )  # kNN is reduced already
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")  # SelfSupData resumes it
    compile_mode(trainer.compile)  # a misspelt mode fails before any work
    out = Path(trainer.out_dir)
    ckpt_path = resolve_resume(out, trainer.resume)  # fails before any work when the run dir is taken
    L.seed_everything(trainer.seed, workers=True, verbose=False)
    if data.local_views and method.epoch_plan() is not None:
        raise ValueError(
            f"{type(method).__name__} trains in planned epochs, which make one view group: data.local_views must be 0"
        )
    if train_dataset is None:
        train_ds, view_gen = build_train_views(data, seed=trainer.seed)
    else:  # a ready dataset (Python API): uint8 images for batched views, else [V, C, H, W] view stacks
        train_ds = train_dataset
        view_gen = view_makers(data, geometry=False)[1] if data.view_mode == "batched" else None
    views_on_device = view_gen is not None
    if view_gen is None:  # per-image views come from the loader; this one serves the method's make_views calls
        view_gen = PerImageViews(view_makers(data, geometry=False)[0])
    meta = {
        "config": config or {},
        "batch_size": data.batch_size,
        "augment": data.augment,
        "dataset": data.dataset,
        "root": data.root,
        "views": data.views,
    }
    module = SelfSupModule(
        method,
        optim,
        view_maker=view_gen,
        views_on_device=views_on_device,
        seed=trainer.seed,
        channels_last=trainer.channels_last,
        meta=meta,
        compile=trainer.compile,
    )
    if ckpt_path is not None:
        _check_resumable(ckpt_path, module)
    if monitor.every_n_epochs:
        method.backbone_for(monitor.which)  # an unknown name fails now, not after the first epoch
    if trainer.channels_last:
        module = module.to(memory_format=torch.channels_last)

    callbacks: list[L.Callback] = [
        SharedLastCheckpoint(
            dirpath=out / "checkpoints",
            filename="epoch{epoch:04d}",
            auto_insert_metric_name=False,
            every_n_epochs=trainer.save_every_n_epochs,
            save_top_k=-1,
            save_last=True,
        ),
    ]
    callbacks.append(FinalCheckpoint(out / "checkpoints" / "last.ckpt"))
    if trainer.save_every_n_steps:
        callbacks.append(
            SharedLastCheckpoint(
                dirpath=out / "checkpoints",
                filename="step{step:08d}",
                auto_insert_metric_name=False,
                every_n_train_steps=trainer.save_every_n_steps,
                save_top_k=-1,
                save_last=True,
            )
        )
    knn = None
    if monitor.every_n_epochs:
        bank = build_eval_dataset(data, data.bank_split, limit=monitor.bank_size)
        test = build_eval_dataset(data, data.test_split, limit=monitor.test_size)
        knn = KNNMonitor(
            bank,
            test,
            num_classes(bank),
            every_n_epochs=monitor.every_n_epochs,
            k=monitor.k,
            temperature=monitor.temperature,
            batch_size=monitor.batch_size,
            num_workers=0 if data.in_memory else data.num_workers,
            which=monitor.which,
        )
        callbacks.append(knn)
    if monitor.recon_every_n_epochs:
        if not hasattr(method, "heldout_loss"):
            raise ValueError(
                f"monitor.recon_every_n_epochs: {type(method).__name__} is not a masked-image model "
                "(MAE, CAN, IMLE); set it to 0"
            )
        from selfsup.engine.recon_monitor import ReconstructionMonitor

        held_out = build_eval_dataset(data, data.test_split, limit=monitor.recon_examples)
        callbacks.append(
            ReconstructionMonitor(held_out, monitor.recon_every_n_epochs, monitor.recon_codes, seed=trainer.seed)
        )
    if monitor.fewshot_every_n_epochs:
        import dataclasses

        from selfsup.engine.fewshot_callback import FewShotMonitor
        from selfsup.eval.fewshot import FewShotConfig

        unknown = sorted(set(monitor.fewshot or {}) - {f.name for f in dataclasses.fields(FewShotConfig)})
        if unknown:
            raise ValueError(
                f"monitor.fewshot: unknown field(s) {unknown}; valid: "
                f"{[f.name for f in dataclasses.fields(FewShotConfig)]}"
            )
        fs = FewShotConfig(**(monitor.fewshot or {}))
        support = build_eval_dataset(data, data.bank_split)
        query = support if data.test_split == data.bank_split else build_eval_dataset(data, data.test_split)
        augmented = None
        if fs.augs_per_image > 0:
            from selfsup.data.build import train_augmented_dataset

            augmented = train_augmented_dataset(data, data.bank_split)
        callbacks.append(
            FewShotMonitor(
                support,
                query,
                fs,
                monitor.fewshot_every_n_epochs,
                augmented,
                num_workers=0 if data.in_memory else data.num_workers,
                which=monitor.which,
            )
        )
    if monitor.spectrum_every_n_steps:
        callbacks.append(SpectrumMonitor(monitor.spectrum_every_n_steps, out / SPECTRUM_FILE))
    progress = progress_mode(trainer.progress_bar)
    if progress == "bar":
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, trainer.log_every_n_steps // 4)))
    elif progress == "lines":
        callbacks.append(LineProgress(trainer.log_every_n_steps))
    callbacks.extend(extra_callbacks)

    pl_trainer = L.Trainer(
        default_root_dir=str(out),
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
        max_time=trainer.max_time,
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        precision=resolve_precision(trainer.precision, trainer.accelerator),
        sync_batchnorm=trainer.sync_batchnorm,
        logger=build_logger(trainer, _checkpoint_step(ckpt_path)),
        callbacks=callbacks,
        log_every_n_steps=trainer.log_every_n_steps,
        enable_progress_bar=progress == "bar",
        enable_model_summary=False,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
    )
    if module.compile_mode is not None:  # fail before anything is written (checked again on every process)
        check_compile_available(pl_trainer.strategy.root_device)
    if pl_trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        name = "config.json" if ckpt_path is None else time.strftime("config-resume-%Y%m%d-%H%M%S.json")
        (out / name).write_text(
            json.dumps(
                config
                or {
                    "data": asdict(data),
                    "optim": asdict(optim),
                    "trainer": asdict(trainer),
                    "monitor": asdict(monitor),
                },
                indent=2,
                default=str,
            )
        )
    plan = method.epoch_plan()
    if plan is not None and trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"{type(method).__name__} trains in planned epochs (a fixed example set per epoch); "
            "trainer.accumulate_grad_batches must be 1"
        )
    pl_trainer.fit(module, datamodule=SelfSupData(data, trainer.seed, train_ds, plan), ckpt_path=ckpt_path)
    last = out / "checkpoints" / "last.ckpt"
    return {
        "run_dir": str(out),
        "last_checkpoint": str(last) if last.exists() else None,
        "knn": knn.history if knn else [],
        "module": module,
    }
