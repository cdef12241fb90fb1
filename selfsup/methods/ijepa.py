r"""I-JEPA (Assran et al., CVPR 2023): predict the target encoder's features of masked blocks from one context block.

Follows ``facebookresearch/ijepa``: ``src/train.py`` (``forward_target``, ``forward_context``, ``loss_fn``, the
``momentum_scheduler``), ``src/masks/multiblock.py`` (:mod:`selfsup.models.multiblock_mask`),
``src/models/vision_transformer.py`` and ``src/helper.py`` (``init_model``, ``init_opt``;
:mod:`selfsup.models.ijepa_predictor`), ``configs/in1k_vith14_ep300.yaml``.

One view per image ``x [B, C, H, W]`` (RandomResizedCrop only: presets ``ijepa`` / ``ijepa_cifar``), ``L`` patches;
masks from ``batch.generator``: context ``c [n_enc, B, Kc]`` and targets ``t [M, B, Kt]`` (equal counts across the
batch)::

    h    = LN(target_encoder(x))[t]          [M·n_enc·B, Kt, D]   all L patches, no grad; LN without affine
    z    = encoder(x[c])                     [n_enc·B, Kc, D]     the context patches only
    p    = predictor(z, c, t)                [M·n_enc·B, Kt, D]
    loss = mean smooth_l1(p − h)                                  (ijepa_loss; LN inside it, per token)
    ξ ← m ξ + (1 − m) θ after each optimiser step,  m = m0 + k (m1 − m0) / K  (linear in the step k of K; 0.996 → 1)

The encoder is the registry's timm ViT without a class token (``class_token: false, global_pool: avg, fc_norm:
false``): fixed 2-D sin-cos positions (frozen), the official initialisation, and its pooled forward (kNN, probes,
export) is the mean of the last layer's normed tokens, I-JEPA's evaluation feature. The target encoder is the
:class:`~selfsup.methods.base.EMATeacher` ``teacher`` (``--which teacher`` evaluates it; the paper evaluates the
target encoder). Logged: ``momentum``, ``context_tokens`` (``Kc``), ``target_tokens`` (``Kt``).

What the engine carries (recipes): AdamW (0.9, 0.999), weight decay cosine ``0.04 → 0.4``
(``optim.weight_decay_end``), biases and 1-D parameters without decay, lr warm-up then cosine to ``final_lr``, bf16.

Departures: (1) masks are drawn from the keyed ``batch.generator`` in the training step (the official collator seeds
the block sizes from a shared step counter and draws positions from each loader worker's global RNG); a block that
can never exceed ``min_keep`` is an error at construction (the official loops forever); (2) the engine's lr warm-up
starts near 0, not at ``start_lr`` (0.2 × peak), and its cosine ends at ``final_lr_ratio × peak``; its weight-decay
cosine reaches the end value at the last step (the official ``CosineWDSchedule`` steps before use); (3) the official
ViT has no ``norm_pre`` / ``pos_drop`` (timm's are the identity here); (4) timm's fused attention and LayerNorm-eps
1e-6 blocks, numerically equal up to float rounding; (5) with gradient accumulation, each micro-batch draws its own
masks (the official has none); (6) the loss is logged per rank (the official all-reduces it for logging only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from selfsup.losses.ijepa import ijepa_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import TINY_VIT, BackboneSpec
from selfsup.models.ijepa_predictor import (
    IJEPAPredictor,
    PredictorConfig,
    check_ijepa_vit,
    encode_tokens,
    gather_tokens,
    ijepa_init_,
    set_fixed_pos_embed,
)
from selfsup.models.masked_vit import pool_tokens
from selfsup.models.multiblock_mask import MultiBlockMaskSampler

__all__ = ["IJEPA", "LinearEMATeacher"]

#: the class-token-free timm ViT layout I-JEPA needs (merge into a backbone's kwargs)
IJEPA_VIT_KWARGS: dict[str, Any] = {"class_token": False, "global_pool": "avg", "fc_norm": False}


class LinearEMATeacher(EMATeacher):
    """An :class:`~selfsup.methods.base.EMATeacher` whose rate rises **linearly** from ``tau`` (step 0) to
    ``final_tau`` (step ``max_steps``): I-JEPA's ``momentum_scheduler`` (``ema[0] + i (ema[1] − ema[0]) / (ipe ·
    epochs · ipe_scale)``, ``ipe_scale`` 1 in every official config), ``i`` the optimiser step just taken."""

    def tau_at(self, step: int, max_steps: int) -> float:
        if self.final_tau is None or max_steps <= 0:
            return self.tau
        k = min(max(int(step), 0), int(max_steps))
        return float(self.tau + k * (self.final_tau - self.tau) / max_steps)


def _predictor_config(cfg: Union[PredictorConfig, Mapping[str, Any], None]) -> PredictorConfig:
    if cfg is None or isinstance(cfg, PredictorConfig):
        return cfg or PredictorConfig()
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(PredictorConfig)})
        if unknown:
            raise ValueError(f"unknown predictor field(s) {unknown}; valid: width, depth, heads, mlp_ratio")
        return PredictorConfig(**cfg)
    raise TypeError(f"predictor must be a PredictorConfig or a mapping, got {type(cfg).__name__}")


@register_method
class IJEPA(Method):
    """I-JEPA on a registry ViT without a class token.

    Args:
        backbone: a ViT spec with ``class_token: false, global_pool: avg, fc_norm: false`` (ViT-H/14: ``{name:
            vit_large, kwargs: {embed_dim: 1280, depth: 32, num_heads: 16, patch_size: 14, ...}}``).
        predictor: predictor shape (:class:`~selfsup.models.ijepa_predictor.PredictorConfig`; official ViT-H/14:
            width 384, depth 12, the encoder's heads).
        enc_mask_scale, pred_mask_scale, aspect_ratio, num_enc_masks, num_pred_masks, min_keep, allow_overlap: the
            official ``mask`` config (:class:`~selfsup.models.multiblock_mask.MultiBlockMaskSampler`).
        momentum, final_momentum: the target encoder's EMA rate, linear from ``momentum`` to ``final_momentum``
            (official ``ema: [0.996, 1.0]``).
        ijepa_init: the official initialisation of the encoder (trunc-normal 0.02); ``false`` keeps timm's.
    """

    num_views = 1
    tiny = {
        "backbone": {"name": TINY_VIT["name"], "kwargs": {**TINY_VIT["kwargs"], "patch_size": 4, **IJEPA_VIT_KWARGS}},
        "predictor": {"width": 16, "depth": 1, "heads": 2},
        "min_keep": 4,
    }
    tiny_variants = {"two_contexts": {"num_enc_masks": 2, "allow_overlap": True}}  # n_enc > 1: the repeat orders

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        predictor: Optional[PredictorConfig] = None,
        enc_mask_scale: tuple[float, float] = (0.85, 1.0),
        pred_mask_scale: tuple[float, float] = (0.15, 0.2),
        aspect_ratio: tuple[float, float] = (0.75, 1.5),
        num_enc_masks: int = 1,
        num_pred_masks: int = 4,
        min_keep: int = 10,
        allow_overlap: bool = False,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        ijepa_init: bool = True,
    ):
        default = {"name": "vit_base", "kwargs": {"img_size": 224, "patch_size": 16, **IJEPA_VIT_KWARGS}}
        super().__init__(backbone if backbone is not None else default)
        vit = self.backbone
        try:
            check_ijepa_vit(vit)
        except ValueError as e:
            raise ValueError(f"IJEPA needs a ViT backbone, got {self.backbone_spec['name']}: {e}") from e
        if ijepa_init:
            ijepa_init_(vit)
        set_fixed_pos_embed(vit)  # after the init: the fixed table, frozen
        grid = int(vit.patch_embed.grid_size[0])
        self.sampler = MultiBlockMaskSampler(
            grid, enc_mask_scale, pred_mask_scale, aspect_ratio, num_enc_masks, num_pred_masks, min_keep, allow_overlap
        )
        heads = int(vit.blocks[0].attn.num_heads)
        self.predictor = IJEPAPredictor(self.num_features, grid * grid, heads, _predictor_config(predictor))
        self.add_teacher("teacher", LinearEMATeacher(momentum, final_tau=final_momentum, backbone=self.backbone))

    def targets(self, imgs: Tensor, targets: Tensor, n_enc: int) -> tuple[Tensor, Tensor]:
        """The target encoder's tokens at ``targets [M, B, Kt]``, ``[M·n_enc·B, Kt, D]`` (not yet layer-normed: the
        loss does it, per token), and its pooled feature of every patch ``[B, D]``; without gradient."""
        with torch.no_grad():
            h = encode_tokens(self.teacher.backbone, imgs)  # [B, L, D], every patch
            pooled = pool_tokens(self.teacher.backbone, h)  # = self.teacher.backbone(imgs)
            m, b, kt = targets.shape
            h = gather_tokens(h, targets)  # [M·B, Kt, D], row m·B + b
            h = h.view(m, 1, b, kt, -1).expand(-1, n_enc, -1, -1, -1).reshape(m * n_enc * b, kt, -1)
        return h, pooled

    def training_loss(self, batch: Batch) -> dict[str, Any]:
        b, _ = self.check_views(batch.views)
        imgs = batch.views[:, 0]  # [B, C, H, W]
        masks = self.sampler(b, batch.generator, device=imgs.device)
        h, teacher_pooled = self.targets(imgs, masks.targets, masks.context.shape[0])
        z = encode_tokens(self.backbone, imgs, masks.context)  # [n_enc·B, Kc, D]
        pred = self.predictor(z, masks.context, masks.targets)  # [M·n_enc·B, Kt, D]
        loss = ijepa_loss(pred, h)
        embeddings = {
            "backbone": pool_tokens(self.backbone, z[:b].detach()),  # the ViT's pooling of the first context's tokens
            "teacher": teacher_pooled,  # the target encoder's pooled feature of every patch
        }
        return {
            "loss": loss,
            "momentum": self.teacher.tau_at(batch.step, batch.max_steps),
            "context_tokens": float(masks.context.shape[-1]),
            "target_tokens": float(masks.targets.shape[-1]),
            "embeddings": embeddings,
        }
