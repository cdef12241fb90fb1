"""End-to-end fine-tuning: a pretrained backbone plus a new linear head, trained together.

The protocol is MAE's ``main_finetune`` (spec-can-mae-imle §2.6), made to work for every backbone of
the registry (timm ViTs and torchvision ResNets), plus MIN-MMCR's ``backbone+linear`` fine-tune
(spec-mmcr-mec §5.2) as a preset; the named presets live in :mod:`selfsup.eval.finetune_protocols`.
Everything a run trains with is one :class:`FinetuneConfig`; :func:`finetune` runs it on datasets
and returns a :class:`FinetuneResult`. Reading a checkpoint and building the datasets is
:mod:`selfsup.eval.finetune_data`.

* **Layer-wise lr decay** (BEiT / MAE): parameter ``p`` in layer ``id(p)`` gets
  ``lr = peak x ld^(L - id(p))``. ViT (MAE's ``lrd.param_groups_lrd``): ``id = 0`` for
  ``patch_embed``, ``cls_token``, ``pos_embed``; ``i + 1`` for ``blocks.i``; ``L = depth + 1`` for
  everything after the blocks (``norm`` / ``fc_norm`` and the head). ResNet, by stage: ``0`` for the
  stem (``conv1``, ``bn1``), ``k`` for ``layer{k}``, ``L = 5`` for the head. timm's
  ``param_groups_layer_decay`` agrees with this for an ``avg``-pooled ViT but, for a ``token``-pooled
  one, puts the final ``norm`` into the last block's group and so uses ``L = depth`` (every scale
  one factor ``ld`` larger than MAE's); the spec's (MAE's) convention is used for both.
* **Weight decay** on every parameter except the 1-D ones (biases, norms) and those the backbone's
  ``no_weight_decay()`` names (position embedding, class token).
* **Optimiser and schedule**: AdamW (default betas, MAE), or Adam / SGD; peak ``lr x B / 256``
  (``scale_lr``); per-step linear warm-up (first step already non-zero) then half-cosine down to
  ``min_lr`` (scaled by each layer's factor, as MAE).
* **Regularisation**: timm's ``Mixup`` (mixup / cutmix, switch probability, label smoothing folded
  into the soft targets, trained with ``SoftTargetCrossEntropy``); without mixup, timm's
  ``LabelSmoothingCrossEntropy``; drop path and RandAugment are set where the backbone and the
  datasets are built (:mod:`selfsup.eval.finetune_data`).
* **Selection on held-out data**: a stratified, seeded part of the *train* split
  (:func:`~selfsup.eval.linear.split_train_val`) is never trained on; the epoch with the best
  validation top-1 is kept (earliest on ties). The test split is scored once at the end, with the
  last-epoch model and with the selected one; both numbers are reported and neither chooses anything.

Randomness (shuffling, augmentation, mixup's numpy draws, drop path) is seeded by ``cfg.seed`` inside a
scope that restores the global torch / numpy / ``random`` states on exit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from selfsup.engine.optim import build_optimizer, build_scheduler, no_weight_decay_ids, scaled_lr
from selfsup.eval.features import _autocast, check_labels, eval_mode, split_batch
from selfsup.eval.knn import topk_accuracy
from selfsup.eval.linear import dataset_selection_split
from selfsup.eval.pool import POOLS, current_pool, is_vit, set_global_pool

__all__ = [
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "build_criterion",
    "build_mixup",
    "evaluate_model",
    "finetune",
    "finetune_param_groups",
    "layer_ids",
    "lr_scales",
]

#: ViT parameters that sit before the blocks (layer id 0).
_VIT_STEM = ("patch_embed", "cls_token", "pos_embed", "reg_token", "norm_pre")
#: ResNet stem parameters (layer id 0); ``layer{k}`` is stage ``k``.
_RESNET_STEM = ("conv1", "bn1")


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    t = tuple(float(v) for v in value)
    if len(t) != 2:
        raise ValueError(f"{name} must be two numbers, got {value!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tune trains with and selects on (defaults: MAE ViT-B, spec §2.6).

    Optimisation:
        epochs: training epochs.
        batch_size: images per optimiser step (MAE: effective batch 1024). Incomplete last batches are
            dropped, so the held-out train split must hold at least one batch.
        lr: base learning rate (MAE's ``blr``); the peak is ``lr`` scaled by ``batch_size / 256`` per
            ``scale_lr`` (``linear``, ``sqrt`` or ``none``).
        optimizer: ``adamw`` (decoupled decay), ``adam`` (coupled L2, as MIN-MMCR) or ``sgd``.
        betas: Adam(W) betas (MAE fine-tune: torch's default (0.9, 0.999)).
        momentum: SGD momentum.
        weight_decay: applied to every parameter except 1-D ones and the backbone's ``no_weight_decay()``.
        layer_decay: lr factor per layer below the top (:func:`lr_scales`); 1.0 disables it.
        warmup_epochs: linear warm-up length (counted in steps; the first step already has a non-zero lr).
        min_lr: end of the cosine, before the layer factors (MAE: 1e-6); at most the peak lr.
        clip_grad: clip the global gradient norm to this (``None``: no clipping, MAE's default).
    Model:
        drop_path: stochastic-depth rate of the last ViT block (timm's ``drop_path_rate``, linear in depth);
            applied where the backbone is built; a ResNet has none (recorded as 0 in the result).
        pool: ViT pooling at fine-tune time (``token`` / ``avg``, :func:`selfsup.eval.pool.set_global_pool`);
            ``None`` keeps the backbone's own. A ResNet always averages.
        head_init_std: the new ``Linear`` head's weight ~ truncated normal with this std, bias 0 (MAE: 2e-5);
            ``None`` keeps PyTorch's default ``Linear`` init (MIN-MMCR).
    Loss and mixing:
        label_smoothing: smoothing of the targets (folded into mixup's soft targets when mixing).
        mixup, cutmix: Beta-distribution alphas of timm's ``Mixup`` (0 disables each; both 0: no mixing).
        mixup_prob: probability of mixing a batch; mixup_switch_prob: of cutmix rather than mixup when both
            are on; mixup_mode: ``batch``, ``pair`` or ``elem`` (timm's modes; all need an even batch).
    Training images (used by :mod:`selfsup.eval.finetune_data`, not by :func:`finetune`):
        augment: ``randaugment`` (timm ``create_transform``: RandomResizedCrop, flip, RandAugment, random
            erasing), ``ssl`` (one view of the checkpoint's pretraining augmentation, MIN-MMCR), ``crop_flip``
            (RandomResizedCrop + flip) or ``none`` (the eval transform).
        randaugment: timm RandAugment spec (MAE: ``rand-m9-mstd0.5-inc1``).
        reprob: random-erasing probability (``randaugment`` only; MAE: 0.25, pixel mode, one box).
        crop_scale: RandomResizedCrop area range; interpolation: its interpolation.
    Selection:
        val_fraction: stratified part of the train split held out for selection (0: best = last epoch).
        seed: split, head init, shuffling, augmentation, mixup and drop-path randomness.
    """

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 5e-4
    scale_lr: Literal["none", "linear", "sqrt"] = "linear"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    clip_grad: Optional[float] = None
    drop_path: float = 0.1
    pool: Optional[Literal["token", "avg"]] = None
    head_init_std: Optional[float] = 2e-5
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    augment: Literal["randaugment", "ssl", "crop_flip", "none"] = "randaugment"
    randaugment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _pair(self.betas, "betas"))
        object.__setattr__(self, "crop_scale", _pair(self.crop_scale, "crop_scale"))

        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"FinetuneConfig.{name} must be {need}, got {getattr(self, name)!r}")

        if self.epochs < 1:
            raise bad("epochs", ">= 1")
        if self.batch_size < 1:
            raise bad("batch_size", ">= 1")
        if not self.lr > 0:
            raise bad("lr", "> 0")
        scaled_lr(1.0, self.batch_size, rule=self.scale_lr)  # validates the rule
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise bad("optimizer", "'adamw', 'adam' or 'sgd'")
        if not 0.0 < self.layer_decay <= 1.0:
            raise bad("layer_decay", "in (0, 1]")
        for name in ("weight_decay", "warmup_epochs", "min_lr", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "in [0, 1]")
        if not 0.0 <= self.drop_path < 1.0:
            raise bad("drop_path", "in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "in [0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "in [0, 1)")
        if self.pool is not None and self.pool not in POOLS:
            raise bad("pool", "'token', 'avg' or None")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise bad("head_init_std", "> 0 or None")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise bad("clip_grad", "> 0 or None")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise bad("mixup_mode", "'batch', 'pair' or 'elem'")
        if self.augment not in ("randaugment", "ssl", "crop_flip", "none"):
            raise bad("augment", "'randaugment', 'ssl', 'crop_flip' or 'none'")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise bad("interpolation", "'bilinear' or 'bicubic'")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise bad("crop_scale", "0 < low <= high <= 1")
        if self.mixup_active and self.batch_size % 2:
            raise ValueError(
                f"FinetuneConfig.batch_size must be even when mixup / cutmix is on (timm's Mixup "
                f"pairs each image with another of the batch), got {self.batch_size}"
            )

    @property
    def mixup_active(self) -> bool:
        """Whether batches are mixed (mixup or cutmix alpha > 0 and a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def peak_lr(self) -> float:
        """``lr`` scaled by ``batch_size / 256`` per ``scale_lr``."""
        return scaled_lr(self.lr, self.batch_size, rule=self.scale_lr)


# --------------------------------------------------------------------------------------------
# model and parameter groups
# --------------------------------------------------------------------------------------------


class FinetuneModel(nn.Module):
    """``head(backbone(x))``: the backbone's pooled features through a new ``Linear(F, C)``."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head_init_std: Optional[float] = 2e-5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_classes)
        if head_init_std is not None:
            with torch.no_grad():
                nn.init.trunc_normal_(
                    self.head.weight, std=head_init_std, a=-2 * head_init_std, b=2 * head_init_std, generator=generator
                )
                self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).flatten(1))


def _is_resnet(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, a) for a in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))


def layer_ids(model: FinetuneModel, layer_decay: float = 0.65) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, L)`` of ``model`` (see the module docstring for the convention).

    A backbone that is neither a timm ViT nor a ResNet has a single layer (``L = 0``), which is only
    allowed with ``layer_decay == 1``.
    """
    backbone = model.backbone
    if is_vit(backbone):
        top = len(backbone.blocks) + 1

        def vit_id(rel: str) -> int:
            if rel.split(".")[0] in _VIT_STEM:
                return 0
            if rel.startswith("blocks."):
                return int(rel.split(".")[1]) + 1
            return top

        ids = {f"backbone.{n}": vit_id(n) for n, _ in backbone.named_parameters()}
    elif _is_resnet(backbone):
        top = 5

        def resnet_id(rel: str) -> int:
            head = rel.split(".")[0]
            if head in _RESNET_STEM:
                return 0
            if head.startswith("layer") and head[5:].isdigit():
                return int(head[5:])
            return top

        ids = {f"backbone.{n}": resnet_id(n) for n, _ in backbone.named_parameters()}
    else:
        if layer_decay != 1.0:
            raise ValueError(
                f"layer_decay {layer_decay}: layer ids are defined for timm ViTs and ResNets, not for "
                f"{type(backbone).__name__}; set layer_decay 1.0"
            )
        top = 0
        ids = {f"backbone.{n}": 0 for n, _ in backbone.named_parameters()}
    ids.update({f"head.{n}": top for n, _ in model.head.named_parameters()})
    return ids, top


def lr_scales(model: FinetuneModel, layer_decay: float) -> dict[str, float]:
    """``{parameter name: layer_decay ** (L - layer id)}`` for every parameter of ``model``."""
    ids, top = layer_ids(model, layer_decay)
    return {name: layer_decay ** (top - i) for name, i in ids.items()}


def finetune_param_groups(model: FinetuneModel, cfg: FinetuneConfig, peak_lr: float) -> list[dict[str, Any]]:
    """Optimiser groups, one per (layer, decay / no decay): ``name``, ``params``, ``weight_decay``,
    ``lr_scale`` and ``lr = peak_lr x lr_scale`` (the scheduler multiplies that per step).

    No weight decay for 1-D parameters and what ``no_weight_decay()`` names (timm: ``pos_embed``,
    ``cls_token``); frozen parameters are left out.
    """
    ids, top = layer_ids(model, cfg.layer_decay)
    nwd = no_weight_decay_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and id(p) not in nwd
        layer = ids[name]
        key = (layer, decay)
        if key not in groups:
            scale = cfg.layer_decay ** (top - layer)
            groups[key] = {
                "name": f"layer{layer}/{'decay' if decay else 'no_decay'}",
                "params": [],
                "param_names": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": scale,
                "lr": peak_lr * scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------
# loss and mixing
# --------------------------------------------------------------------------------------------


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's ``Mixup`` for ``cfg`` (label smoothing folded into its soft targets), or ``None`` when off.

    Its draws come from numpy's global RNG (:func:`finetune` seeds and restores it).
    """
    if not cfg.mixup_active:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    """``SoftTargetCrossEntropy`` with mixing; else ``LabelSmoothingCrossEntropy`` (timm) or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


# --------------------------------------------------------------------------------------------
# evaluation and the loop
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    name: str = "labels",
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of ``model`` in eval mode over ``loader``; flags restored afterwards."""
    logits, labels = [], []
    with eval_mode(model):
        for batch in loader:
            x, y = split_batch(batch)
            with _autocast(device, amp_dtype):
                out = model(x.to(device, non_blocking=True))
            logits.append(out.float().cpu())
            labels.append(y.reshape(-1))
    if not logits:
        return {"top1": float("nan"), "top5": float("nan")}
    y = check_labels(torch.cat(labels), num_classes, name)
    out = torch.cat(logits)
    return {"top1": topk_accuracy(out, y, 1), "top5": topk_accuracy(out, y, 5)}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for the block; restore their previous states afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _drop_path_in_effect(backbone: nn.Module) -> float:
    """The last ViT block's stochastic-depth rate (timm's ``drop_path_rate``), 0 for other backbones."""
    if not is_vit(backbone) or len(backbone.blocks) == 0:
        return 0.0
    return round(float(getattr(backbone.blocks[-1].drop_path1, "drop_prob", 0.0)), 6)


@dataclass
class FinetuneResult:
    """Outcome of a fine-tune. Accuracies are percentages.

    ``best_val_epoch`` (1-based) has the highest validation top-1 (``best_val_top1``; earliest on ties;
    the last epoch without validation data); ``test_top1_at_best_val`` / ``test_top5_at_best_val`` are
    that epoch's model on the test split, ``test_top1_last`` / ``test_top5_last`` the last epoch's.
    ``val_top1`` and ``train_loss`` are per-epoch curves (``val_top1`` is ``nan`` without validation).
    ``layer_scales`` lists ``layer_decay ** (L - id)`` for ids ``0..L``; ``drop_path`` and ``pool`` are
    what the model actually used; ``config`` is the :class:`FinetuneConfig` as a dict. The selected
    model is kept on ``model`` and left out of :meth:`to_dict`.
    """

    best_val_epoch: int
    best_val_top1: float
    test_top1_at_best_val: float
    test_top5_at_best_val: float
    test_top1_last: float
    test_top5_last: float
    epochs: int
    steps: int
    peak_lr: float
    val_top1: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    layer_scales: list[float] = field(default_factory=list)
    drop_path: float = 0.0
    pool: str = "avg"
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict of every field except the model."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}


def finetune(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Optional[Dataset],
    test_dataset: Dataset,
    num_classes: int,
    cfg: Optional[FinetuneConfig] = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    *,
    eval_batch_size: int = 512,
    amp_dtype: Optional[torch.dtype] = None,
    train_labels: Optional[Sequence[int] | Tensor] = None,
    pin_memory: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``backbone`` + a new linear head on ``train_dataset``, selecting on held-out train.

    Args:
        backbone: the pretrained backbone (moved to ``device``; trained in place, in train mode). A ViT must
            already carry ``cfg.drop_path`` (build it with ``drop_path_rate``,
            :func:`selfsup.eval.finetune_data.prepare_backbone`); ``cfg.pool`` is applied here.
        train_dataset: ``(augmented image, label)`` pairs; its transform runs at every access.
        val_dataset: the **same images** with the eval transform; the held-out indices of
            :func:`~selfsup.eval.linear.split_train_val` are read from it (required when ``val_fraction > 0``).
        test_dataset: the test split with the eval transform, scored once at the end.
        cfg: the run (default ``FinetuneConfig()``); ``overrides`` replace its fields by name.
        device, num_workers, pin_memory, eval_batch_size: where the model trains; loaders.
        amp_dtype: autocast dtype (``torch.bfloat16``; ``torch.float16`` adds a gradient scaler on CUDA).
        train_labels: labels of ``train_dataset`` (default: its ``.targets``) for the stratified split.
    """
    t0 = time.perf_counter()
    cfg = FinetuneConfig() if cfg is None else cfg
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    device = torch.device(device)
    _labels, tr_idx, va_idx = dataset_selection_split(
        train_dataset, train_labels, val_dataset, num_classes, cfg.val_fraction, cfg.seed
    )
    has_val = va_idx.numel() > 0
    steps_per_epoch = tr_idx.numel() // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training part of the train split has {tr_idx.numel()} images, fewer than one batch "
            f"(batch_size {cfg.batch_size}); lower batch_size"
        )
    drop_path = _drop_path_in_effect(backbone)
    if is_vit(backbone) and not math.isclose(drop_path, cfg.drop_path, abs_tol=1e-6):
        raise ValueError(
            f"the ViT was built with drop_path_rate {drop_path:g} but FinetuneConfig.drop_path is "
            f"{cfg.drop_path:g}; build it with drop_path_rate={cfg.drop_path} "
            "(selfsup.eval.finetune_data.prepare_backbone)"
        )

    set_global_pool(backbone, cfg.pool)
    peak = cfg.peak_lr()
    if cfg.min_lr > peak:
        raise ValueError(f"FinetuneConfig.min_lr {cfg.min_lr:g} exceeds the peak lr {peak:g} (lr x batch scaling)")

    def loader(ds: Dataset, **kw: Any) -> DataLoader:
        return DataLoader(ds, num_workers=num_workers, pin_memory=pin_memory, **kw)

    with _seeded(cfg.seed, device):
        g_head = torch.Generator().manual_seed(cfg.seed)
        model = FinetuneModel(backbone, num_classes, cfg.head_init_std, generator=g_head).to(device)
        groups = finetune_param_groups(model, cfg, peak)
        opt = build_optimizer(
            groups, cfg.optimizer, lr=peak, weight_decay=cfg.weight_decay, momentum=cfg.momentum, betas=cfg.betas
        )
        total = cfg.epochs * steps_per_epoch
        warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
        schedule = build_scheduler(opt, total, warmup, cfg.min_lr / peak, "cosine")
        mixup = build_mixup(cfg, num_classes)
        criterion = build_criterion(cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

        train_subset = Subset(train_dataset, tr_idx.tolist())
        sampler = RandomSampler(train_subset, generator=torch.Generator().manual_seed(cfg.seed + 1))
        train_loader = loader(
            train_subset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, persistent_workers=num_workers > 0
        )
        val_loader = loader(Subset(val_dataset, va_idx.tolist()), batch_size=eval_batch_size) if has_val else None

        val_curve: list[float] = []
        loss_curve: list[float] = []
        best_val, best_epoch, best_state = -math.inf, cfg.epochs, None
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            loss_sum, n_seen = torch.zeros((), device=device), 0
            for step, batch in enumerate(train_loader):
                x, y = split_batch(batch)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                target = y
                if mixup is not None:
                    x, target = mixup(x, y)
                with _autocast(device, amp_dtype):
                    logits = model(x)
                loss = criterion(logits.float(), target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"fine-tune loss is {loss.item()} at epoch {epoch}, step {step + 1} "
                        f"(peak lr {peak:g}); lower lr or check the inputs"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(opt)
                scaler.update()
                schedule.step()
                loss_sum += loss.detach() * y.numel()
                n_seen += y.numel()
            loss_curve.append(loss_sum.item() / max(n_seen, 1))
            if val_loader is not None:
                val_top1 = evaluate_model(model, val_loader, num_classes, device, amp_dtype, "val labels")["top1"]
                if val_top1 > best_val:
                    best_val, best_epoch = val_top1, epoch
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                val_top1 = float("nan")
            val_curve.append(val_top1)

        # The test split is read only now, once per reported model; nothing above depends on it.
        test_loader = loader(test_dataset, batch_size=eval_batch_size)
        last = evaluate_model(model, test_loader, num_classes, device, amp_dtype, "test labels")
        best = last
        if best_state is not None and best_epoch != cfg.epochs:
            model.load_state_dict(best_state)
            best = evaluate_model(model, test_loader, num_classes, device, amp_dtype, "test labels")
    model.eval()
    _, top = layer_ids(model, cfg.layer_decay)
    return FinetuneResult(
        best_val_epoch=best_epoch,
        best_val_top1=best_val if has_val else float("nan"),
        test_top1_at_best_val=best["top1"],
        test_top5_at_best_val=best["top5"],
        test_top1_last=last["top1"],
        test_top5_last=last["top5"],
        epochs=cfg.epochs,
        steps=total,
        peak_lr=peak,
        val_top1=val_curve,
        train_loss=loss_curve,
        layer_scales=[cfg.layer_decay ** (top - i) for i in range(top + 1)],
        drop_path=drop_path,
        pool=current_pool(backbone),
        n_train=tr_idx.numel(),
        n_val=va_idx.numel(),
        n_test=len(test_dataset),  # type: ignore[arg-type]
        seconds=time.perf_counter() - t0,
        config=dataclasses.asdict(cfg),
        model=model,
    )
