r"""MAE: masked autoencoder (He et al., CVPR 2022; spec §2).

The backbone is the registry's timm ViT with a **fixed** 2-D sin-cos position table (frozen) and MAE's
initialisation; a light decoder (:class:`~selfsup.models.masked_vit.MAEDecoder`) reconstructs the removed
patches. For every image ``x [C, H, W]`` of the batch (one view per image; more views are treated as more
images)::

    (keep, m, restore) = random_masking(N, L, r, generator)        # K = floor(L (1 - r)) kept per sample
    h    = ViT_kept(x, keep)                                        # [N, 1 + K, D]: cls + kept tokens
    ŷ    = decoder(h, restore)                                      # [N, L, p² C]
    loss = mae_loss(x, ŷ, m, p, norm_pix_loss)                      # mean over the masked patches

Masks come from ``batch.generator`` only, so a resumed run draws the same ones. Weight decay (AdamW) skips
norms and biases (1-D), the class token and the position tables (the ViT's ``no_weight_decay()``) and the
mask token (the decoder's); the position tables are frozen anyway. MAE's reference recipe: AdamW
``betas (0.9, 0.95)``, wd 0.05, lr = 1.5e-4 x B/256, 40 warm-up epochs then cosine, mask 0.75, norm-pix on.

Reusable pieces (IMLE-SSL builds on them): :meth:`MAE.draw_masking`, :meth:`MAE.forward_encoder` (kept-token
pass through ``self.backbone.blocks[i]``, timm blocks), :meth:`MAE.forward_decoder`, and
:meth:`MAE.forward_loss` with ``reduction="none"`` for the per-sample masked loss ``[N]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from selfsup.losses.mae import mae_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import TINY_VIT, BackboneSpec
from selfsup.models.masked_vit import (
    DecoderConfig,
    MAEDecoder,
    Masking,
    check_masked_vit,
    forward_kept,
    mae_init_,
    pool_tokens,
    random_masking,
    set_sincos_pos_embed,
    vit_patch_size,
)

__all__ = ["MAE", "MAEOutput"]


@dataclass
class MAEOutput:
    """What :meth:`MAE.forward_loss` returns.

    Attributes:
        loss: 0-d (``reduction="mean"``) or ``[N]`` per-sample masked means (``"none"``).
        pred: ``[N, L, p² C]`` decoder predictions, patch order.
        masking: the :class:`~selfsup.models.masked_vit.Masking` used.
        latent: ``[N, 1 + K, D]`` encoder tokens (cls first), the backbone's final-norm output.
    """

    loss: Tensor
    pred: Tensor
    masking: Masking
    latent: Tensor


def _decoder_config(cfg: Union[DecoderConfig, Mapping[str, Any], None]) -> DecoderConfig:
    if cfg is None:
        return DecoderConfig()
    if isinstance(cfg, DecoderConfig):
        return cfg
    if isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(DecoderConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown decoder field(s) {unknown}; valid: {sorted(known)}")
        return DecoderConfig(**cfg)
    raise TypeError(f"decoder must be a DecoderConfig or a mapping, got {type(cfg).__name__}")


@register_method
class MAE(Method):
    """Masked autoencoder on a registry ViT.

    Args:
        backbone: a ViT spec, e.g. ``{name: vit_base, kwargs: {patch_size: 16, img_size: 224}}`` (the encoder).
        mask_ratio: fraction ``r`` of patches removed per image (MAE: 0.75); ``floor(L (1 - r))`` are kept.
        norm_pix_loss: per-patch normalised targets (MAE's published checkpoints: on).
        decoder: decoder shape (:class:`~selfsup.models.masked_vit.DecoderConfig`; MAE: width 512, depth 8,
            16 heads).
        mae_init: re-initialise the encoder the MAE way (Xavier-uniform linears and patch conv, tokens
            N(0, 0.02²)); ``false`` keeps timm's initialisation.
        init_from: start from pretrained MAE weights (encoder and decoder): one of our MAE / CAN / IMLE checkpoints,
            or the official MAE release's full checkpoint with decoder (``mae_pretrain_vit_base_full.pth``; keys
            converted, see :func:`selfsup.models.mae_weights.load_mae_weights`). Other modules keep their init.
    """

    tiny = {"backbone": TINY_VIT, "decoder": {"width": 32, "depth": 1, "heads": 2}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder: Optional[DecoderConfig] = None,
        mae_init: bool = True,
        init_from: Optional[str] = None,
    ):
        super().__init__(backbone if backbone is not None else {"name": "vit_base"})
        vit = self.backbone
        try:
            check_masked_vit(vit)
        except ValueError as e:
            raise ValueError(
                f"{type(self).__name__} needs a ViT backbone (vit_tiny, vit_small, vit_base, ...), "
                f"got {self.backbone_spec['name']}: {e}"
            ) from e
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mae_init:
            mae_init_(vit)
        set_sincos_pos_embed(vit)  # after the init: the fixed table, frozen
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = vit_patch_size(vit)
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        self.num_patches = int(vit.patch_embed.num_patches)
        self.decoder = MAEDecoder(
            self.num_features, self.num_patches, self.patch_size, self.in_chans, _decoder_config(decoder)
        )
        if init_from:
            self.load_mae(init_from)

    def load_mae(self, path: str) -> dict:
        """Copy pretrained MAE encoder + decoder weights from ``path`` (see ``init_from``); returns the report."""
        from lightning.pytorch.utilities import rank_zero_info

        from selfsup.models.mae_weights import load_mae_weights

        report = load_mae_weights(self, path)
        rank_zero_info(
            f"{type(self).__name__}: {report.get('loaded')} tensors loaded from {path} ({report.get('source')})"
        )
        return report

    # ---------------------------------------------------------------------------------- pieces
    def draw_masking(self, n: int, generator: torch.Generator, mask_ratio: Optional[float] = None) -> Masking:
        """A fresh per-sample masking of ``n`` images from ``generator`` (on its device)."""
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        return random_masking(n, self.num_patches, r, generator)

    def forward_encoder(self, imgs: Tensor, keep: Optional[Tensor]) -> Tensor:
        """``imgs [N, C, H, W]``, ``keep [N, K]`` -> encoder tokens ``[N, 1 + K, D]`` (``keep=None``: all patches)."""
        return forward_kept(self.backbone, imgs, keep)

    def decoder_tokens(self, latent: Tensor) -> Tensor:
        """Encoder tokens as the decoder receives them: after the ViT's final LayerNorm. A ViT built with
        ``global_pool: avg`` has no final norm on tokens (timm moves it after the pooling, ``fc_norm``);
        that LayerNorm is then applied token by token."""
        vit = self.backbone
        if isinstance(vit.norm, nn.Identity) and not isinstance(getattr(vit, "fc_norm", nn.Identity()), nn.Identity):
            return vit.fc_norm(latent)
        return latent

    def forward_decoder(self, tokens: Tensor, restore: Tensor) -> Tensor:
        """Decoder-ready tokens ``[N, 1 + K, D]`` + ``restore [N, L]`` -> predictions ``[N, L, p² C]``."""
        return self.decoder(tokens, restore)

    def predict(self, imgs: Tensor, masking: Masking) -> Tensor:
        """Predictions ``[N, L, p² C]`` for ``imgs`` under ``masking`` (encoder on the kept patches)."""
        return self.forward_decoder(self.decoder_tokens(self.forward_encoder(imgs, masking.keep)), masking.restore)

    def forward_loss(
        self, imgs: Tensor, masking: Union[Masking, torch.Generator], reduction: Literal["mean", "none"] = "mean"
    ) -> MAEOutput:
        """The MAE loss of ``imgs [N, C, H, W]`` under ``masking`` (or a fresh one drawn from a generator).

        ``reduction="none"`` gives the per-sample masked mean ``[N]`` (IMLE-SSL scores latent codes with it).
        """
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
        if isinstance(masking, torch.Generator):
            masking = self.draw_masking(imgs.shape[0], masking)
        latent = self.forward_encoder(imgs, masking.keep)
        pred = self.forward_decoder(self.decoder_tokens(latent), masking.restore)
        loss = mae_loss(imgs, pred, masking.mask, self.patch_size, self.norm_pix_loss, reduction=reduction)
        return MAEOutput(loss=loss, pred=pred, masking=masking, latent=latent)

    @torch.no_grad()
    def heldout_loss(self, imgs: Tensor, generator: torch.Generator, num_codes: int = 1, chunk: int = 32) -> Tensor:
        """``[N]`` masked loss of ``imgs [N, C, H, W]`` under a fresh random mask each (validation; ``num_codes`` is
        for latent-code models, an MAE has none)."""
        out = [
            self.forward_loss(imgs[c : c + chunk], generator, reduction="none").loss.float()
            for c in range(0, imgs.shape[0], chunk)
        ]
        return torch.cat(out)

    # ---------------------------------------------------------------------------------- duty
    def training_loss(self, batch: Batch) -> dict[str, Any]:
        b, v = self.check_views(batch.views)
        out = self.forward_loss(batch.views.flatten(0, 1), batch.generator)
        pooled = pool_tokens(self.backbone, out.latent).detach()  # the ViT's own pooling, on the kept tokens
        emb = pooled.view(b, v, -1) if v > 1 else pooled
        return {"loss": out.loss, "embeddings": {"backbone": emb}}
