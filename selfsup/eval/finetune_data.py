"""What a fine-tune reads: the backbone rebuilt for training (drop path, pooling) and its three datasets.

* :func:`prepare_backbone` reads a checkpoint or an export (:func:`selfsup.eval.load.read_backbone_state`),
  rebuilds the backbone from its recorded spec ``{name, kwargs}`` with ``drop_path_rate`` set for a timm ViT
  (timm's stochastic depth, linear in depth up to the rate), loads the weights strictly and applies the
  pooling choice (:func:`selfsup.eval.pool.set_global_pool`).
* :func:`train_transform` is the training augmentation of a :class:`~selfsup.eval.finetune.FinetuneConfig`
  at the data preset's crop size and normalisation: ``randaugment`` is timm's ``create_transform`` (MAE:
  RandomResizedCrop bicubic, flip, ``rand-m9-mstd0.5-inc1``, random erasing 0.25 pixel mode).
* :func:`finetune_datasets` gives the train split augmented, the same split under the eval transform (its
  held-out part is the validation set) and the test split under the eval transform.
* :func:`finetune_checkpoint` runs all of it and :func:`~selfsup.eval.finetune.finetune` (``selfsup finetune``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from selfsup.data.build import num_classes, open_source
from selfsup.data.transforms import Augment, eval_transform, per_image_transform
from selfsup.eval.finetune import FinetuneConfig, FinetuneResult, finetune
from selfsup.eval.load import read_backbone_state
from selfsup.eval.pool import is_vit, set_global_pool
from selfsup.models import backbone_spec, build_backbone

__all__ = [
    "amp_dtype",
    "finetune_checkpoint",
    "finetune_datasets",
    "finetune_on_data",
    "finetune_spec",
    "prepare_backbone",
    "train_transform",
]


def finetune_spec(spec: dict, cfg: FinetuneConfig) -> dict:
    """The backbone spec to train: ``spec`` with ``drop_path_rate = cfg.drop_path`` for a timm ViT.

    A ResNet has no stochastic depth in torchvision; its spec is returned unchanged.
    """
    from selfsup.models.vit import VIT_ARCHS

    out = backbone_spec(spec)
    if out["name"] in VIT_ARCHS:
        out["kwargs"]["drop_path_rate"] = float(cfg.drop_path)
    return out


def prepare_backbone(path: str | os.PathLike, cfg: FinetuneConfig, which: str = "online") -> tuple[nn.Module, dict]:
    """``(backbone ready to fine-tune, the spec it was built from)`` of a checkpoint or an export.

    The weights load strictly (a mismatch names the keys); ``cfg.drop_path`` and ``cfg.pool`` are applied.
    """
    state, spec = read_backbone_state(path, which)
    spec = finetune_spec(spec, cfg)
    model = build_backbone(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in '{path}' do not match backbone {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return set_global_pool(model, cfg.pool), spec


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """PIL posterize keeping ``bits_to_keep`` most significant bits; 0 bits gives a black image.

    timm's RandAugment ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which ``rand-m9-mstd0.5`` draws
    a few times per hundred calls; Pillow >= 10 rejects it ("bits must be between or equal to 1 and 8") where the
    Pillow of MAE's time returned the black image. This keeps that behaviour.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


def _fix_posterize(transform: Any) -> Any:
    """Point every posterize op of the timm RandAugment / AutoAugment inside ``transform`` at :func:`_posterize`."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


class _AcceptTensors:
    """Run a PIL-only transform (timm's) on a PIL image or a ``uint8 [3, H, W]`` tensor (in-memory data)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def train_transform(aug: Augment, cfg: FinetuneConfig) -> Callable[[Any], torch.Tensor]:
    """The training transform of ``cfg.augment`` at ``aug``'s crop size and normalisation.

    * ``randaugment``: ``timm.data.create_transform(is_training=True)``: RandomResizedCrop(``crop_scale``,
      ``aug.ratio``, ``interpolation``) + flip 0.5 + RandAugment ``cfg.randaugment`` + Normalize + RandomErasing
      (``reprob``, pixel mode, one box); no colour jitter (MAE passes none). Posterizing to 0 bits gives a black
      image, as with the Pillow of MAE's time (current Pillow raises).
    * ``ssl``: ``aug`` itself, one view (the checkpoint's pretraining augmentation; MIN-MMCR).
    * ``crop_flip``: RandomResizedCrop(``crop_scale``, ``interpolation``) + flip only.
    * ``none``: ``aug``'s eval transform.
    """
    if cfg.augment == "randaugment":
        from timm.data import create_transform

        return _AcceptTensors(
            _fix_posterize(
                create_transform(
                    input_size=aug.crop_size,
                    is_training=True,
                    scale=cfg.crop_scale,
                    ratio=aug.ratio,
                    hflip=0.5,
                    color_jitter=None,
                    auto_augment=cfg.randaugment,
                    interpolation=cfg.interpolation,
                    re_prob=cfg.reprob,
                    re_mode="pixel",
                    re_count=1,
                    mean=aug.mean,
                    std=aug.std,
                )
            )
        )
    if cfg.augment == "ssl":
        return per_image_transform(aug)
    if cfg.augment == "crop_flip":
        from selfsup.eval.protocols import CROP_FLIP

        return per_image_transform(
            dataclasses.replace(aug, **{**CROP_FLIP, "scale": cfg.crop_scale}, interpolation=cfg.interpolation)
        )
    if cfg.augment == "none":
        return eval_transform(aug)
    raise ValueError(f"FinetuneConfig.augment must be randaugment, ssl, crop_flip or none, got {cfg.augment!r}")


def finetune_datasets(data: Any, cfg: FinetuneConfig) -> tuple[Dataset, Dataset, Dataset, int]:
    """``(train augmented, train under the eval transform, test under the eval transform, classes)``.

    ``data`` is a ``DataConfig``: its ``bank_split`` is the labelled train split, ``test_split`` the test split,
    ``augment`` (+ ``augment_overrides``) the preset giving crop size, normalisation, the eval transform and,
    for ``augment: ssl``, the training augmentation.
    """
    src = open_source(data)
    aug = src.resolve_augment(None)
    tf = train_transform(aug, cfg)
    train = src.images(data.bank_split, tf, tensor_transform=tf)
    val = src.eval_split(data.bank_split)
    test = src.eval_split(data.test_split)
    return train, val, test, num_classes(val)


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on a CUDA device that supports it, else fp32 (``None``); ``none``, ``bf16``, ``fp16``."""
    if amp == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else None
    table = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in table:
        raise ValueError(f"amp must be auto, none, bf16 or fp16, got {amp!r}")
    return table[amp]


def finetune_on_data(
    backbone: nn.Module,
    data: Any,
    cfg: FinetuneConfig,
    device: str | torch.device = "cpu",
    amp: str = "auto",
    eval_batch_size: int = 512,
) -> FinetuneResult:
    """Fine-tune ``backbone`` (from :func:`prepare_backbone`) on ``data`` (a ``DataConfig``, see
    :func:`finetune_datasets`); a ViT's ``img_size`` must be the preset's crop size."""
    device = torch.device(device)
    train, val, test, classes = finetune_datasets(data, cfg)
    crop = open_source(data).resolve_augment(None).crop_size
    if is_vit(backbone):
        img = tuple(backbone.patch_embed.img_size)
        if img != (crop, crop):
            raise ValueError(
                f"the ViT was pretrained at img_size {img[0]} but the data preset "
                f"'{data.augment}' crops {crop} px; pass --data.augment with a {img[0]} px crop"
            )
    workers = 0 if data.in_memory else data.num_workers
    return finetune(
        backbone.to(device),
        train,
        val,
        test,
        classes,
        cfg,
        device=device,
        num_workers=workers,
        eval_batch_size=eval_batch_size,
        amp_dtype=amp_dtype(amp, device),
    )


def finetune_checkpoint(
    checkpoint: str | os.PathLike,
    data: Any,
    cfg: FinetuneConfig,
    which: str = "online",
    device: str | torch.device = "cpu",
    amp: str = "auto",
    eval_batch_size: int = 512,
) -> tuple[FinetuneResult, dict]:
    """Fine-tune the backbone of ``checkpoint`` on ``data`` (a ``DataConfig``); returns ``(result, spec)``."""
    backbone, spec = prepare_backbone(checkpoint, cfg, which)
    return finetune_on_data(backbone, data, cfg, device, amp, eval_batch_size), spec
