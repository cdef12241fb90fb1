r"""CAN: contrastive + masked autoencoder + noise prediction (Mishra et al., 2022; spec §1).

Two views of every image (the engine's ``[B, 2, C, H, W]``, SimCLR-style augmentation), each an independent
sample with its own mask and noise level. With ``x`` the clean (normalised) view, ``N = 2B`` rows::

    (keep, m, restore) = random_masking(N, L, r, generator)              # r: paper 0.5, public code 0.75
    σ_n = σ_max · u_n,  u_n ~ U[0, 1);   ε ~ N(0, I) like x               # σ_max: paper 0.05, public code 0.1
    h   = ViT_kept(x + σ ε, keep)                                          # noise on the encoder input only
    z   = g(pool(h))          pool: mean of the kept patch tokens (pool_cls: all tokens incl. cls, as CANc)
                              g: Linear(D, D) -> ReLU -> Linear(D, 128)  (no BatchNorm)
    ŷ   = decoder(h + MLP(e(σ)), restore)                                  # noise level added to every token
    L_rec   = mae_loss(x, ŷ, m)                      clean image on the masked patches (global masked mean)
    L_noise = Σ (1 − m) mean_d (ŷ − patchify(σ ε))² / Σ (1 − m)           scaled noise, visible patches
    L_nce   = info_nce_loss(gather(z_view1), gather(z_view2), τ = 0.1)   negatives from every rank
    loss    = w_mae · [(1 − w_noise) L_rec + w_noise L_noise] + w_nce · L_nce      (0.97, 0.3, 0.03)

``e(σ)`` is the 128-d sinusoidal embedding ``[sin(s f_k)]_k ++ [cos(s f_k)]_k``, ``f_k = exp(−k ln(10⁴) / 63)``,
``k < 64``, of ``s = σ · embed_scale`` (1 as the original: σ ≤ 0.1 makes it nearly constant; a diffusion-style
``embed_scale`` such as 1000 is available), through ``Linear(128, D) -> ReLU -> Linear(D, D)``.

Fixed against the public code (spec §1.3, §7): the reconstruction target is the **clean** image (the code adds
the noise in place and reconstructs the noisy one); σ_max is wired to the config (the code ignores ``--std``);
the noise branch is always on; nothing autograd needs is modified in place; negatives are gathered across ranks
(the code used per-GPU negatives only). Randomness (masks, levels, noise) comes from ``batch.generator`` in the
fixed order of :meth:`CAN.draw`, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from selfsup.losses import info_nce_loss
from selfsup.losses.mae import mae_loss, masked_patch_mse
from selfsup.methods.base import Batch
from selfsup.methods.mae import MAE
from selfsup.methods.registry import register_method
from selfsup.models import BackboneSpec
from selfsup.models.masked_vit import DecoderConfig, Masking, mae_init_, patchify, pool_tokens, random_masking

__all__ = ["CAN", "CANDraw", "NoiseConfig", "noise_level_embedding"]


def noise_level_embedding(sigma: Tensor, dim: int = 128) -> Tensor:
    """``σ [N] -> [N, dim]``: ``[sin(σ f_k)]_{k<h} ++ [cos(σ f_k)]_{k<h}``, ``h = dim/2``,
    ``f_k = exp(−k ln(10000) / (h − 1))`` (so ``f_0 = 1``, ``f_{h−1} = 1e-4``). ``e(0) = [0]*h ++ [1]*h``."""
    if dim < 4 or dim % 2:
        raise ValueError(f"the noise-level embedding needs an even width >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / (half - 1))
    args = sigma.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


@dataclass
class NoiseConfig:
    """CAN's noise branch.

    Attributes:
        sigma_max: noise levels ``σ = sigma_max · U[0, 1)`` per view, in normalised-image units (paper 0.05,
            public code 0.1).
        embed_scale: ``σ`` is multiplied by this before the sinusoidal embedding (1 as the original).
        embed_dim: width of the sinusoidal embedding (128 as the original).
        target: what the decoder predicts on visible patches: ``scaled`` = ``σ ε`` (the public code) or
            ``unit`` = ``ε``.
    """

    sigma_max: float = 0.05
    embed_scale: float = 1.0
    embed_dim: int = 128
    target: Literal["scaled", "unit"] = "scaled"

    def __post_init__(self) -> None:
        if not self.sigma_max >= 0 or not self.embed_scale > 0:
            raise ValueError(f"noise: sigma_max must be >= 0 and embed_scale > 0, got {self}")
        if self.target not in ("scaled", "unit"):
            raise ValueError(f"noise.target must be 'scaled' or 'unit', got {self.target!r}")


class CANDraw(NamedTuple):
    """Everything random of one CAN step, for ``N`` view rows (sample-major: row ``2b + v``).

    Attributes:
        masking: per-row masking (``keep [N, K]``, ``mask [N, L]``, ``restore [N, L]``).
        sigma: ``[N]`` noise levels ``σ_max · u``.
        eps: ``[N, C, H, W]`` unit Gaussian noise.
    """

    masking: Masking
    sigma: Tensor
    eps: Tensor

    def rows(self, index) -> CANDraw:
        return CANDraw(self.masking.rows(index), self.sigma[index], self.eps[index])


@register_method
class CAN(MAE):
    """CAN on a registry ViT (MAE encoder and decoder, see :class:`~selfsup.methods.mae.MAE`).

    Args:
        backbone: a ViT spec (CANc: ``vit_base``, patch 16, 224 px).
        mask_ratio: per view (paper 0.5; public code 0.75).
        norm_pix_loss: norm-pix reconstruction targets (public code: off).
        decoder: decoder shape (512 / 8 / 16 as MAE).
        mae_init: MAE's initialisation of the encoder.
        noise: the noise branch (:class:`NoiseConfig`: σ_max, embedding, target).
        weight_mae, weight_noise, weight_nce: ``loss = w_mae [(1 − w_noise) L_rec + w_noise L_noise] + w_nce L_nce``
            (the public code's defaults 0.97, 0.3, 0.03).
        temperature: InfoNCE temperature (0.1).
        proj_dim: projector output width (128).
        pool_cls: the contrastive pool averages every encoder token including cls (public code) instead of the
            kept patch tokens only (paper).
        gather_distributed: InfoNCE negatives from every rank (default); ``false`` is **CAN parity**: the public
            code's per-GPU negatives (each rank's InfoNCE over its own rows; changes results only with more than
            one rank).
        init_from: start the encoder and decoder from pretrained MAE weights (see :class:`~selfsup.methods.mae.MAE`).
    """

    num_views = 2
    tiny = {**MAE.tiny, "proj_dim": 16}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        mask_ratio: float = 0.5,
        norm_pix_loss: bool = True,
        decoder: Optional[DecoderConfig] = None,
        mae_init: bool = True,
        noise: Optional[NoiseConfig] = None,
        weight_mae: float = 0.97,
        weight_noise: float = 0.3,
        weight_nce: float = 0.03,
        temperature: float = 0.1,
        proj_dim: int = 128,
        pool_cls: bool = False,
        gather_distributed: bool = True,
        init_from: Optional[str] = None,
    ):
        super().__init__(
            backbone, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, decoder=decoder, mae_init=mae_init
        )
        if isinstance(noise, dict):
            noise = NoiseConfig(**noise)
        self.noise = noise or NoiseConfig()
        if min(weight_mae, weight_nce) < 0 or not 0.0 <= weight_noise <= 1.0:
            raise ValueError(
                f"loss weights: weight_mae, weight_nce >= 0 and weight_noise in [0, 1]; got "
                f"{weight_mae}, {weight_nce}, {weight_noise}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weight_mae, self.weight_noise, self.weight_nce = float(weight_mae), float(weight_noise), float(weight_nce)
        self.temperature, self.pool_cls = float(temperature), bool(pool_cls)
        self.gather_distributed = bool(gather_distributed)
        d = self.num_features
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, int(proj_dim)))
        self.noise_mlp = nn.Sequential(nn.Linear(self.noise.embed_dim, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        mae_init_(self.projector)
        mae_init_(self.noise_mlp)
        if init_from:
            self.load_mae(init_from)

    # ---------------------------------------------------------------------------------- randomness
    def draw(self, n: int, image_shape: tuple[int, ...], generator: torch.Generator) -> CANDraw:
        """Masks, then levels ``σ = σ_max · U[0, 1)``, then ``ε ~ N(0, I)``, from ``generator`` in this order."""
        dev = generator.device
        masking = random_masking(n, self.num_patches, self.mask_ratio, generator)
        sigma = self.noise.sigma_max * torch.rand(n, generator=generator, device=dev)
        eps = torch.randn(n, *image_shape, generator=generator, device=dev)
        return CANDraw(masking, sigma, eps)

    # ---------------------------------------------------------------------------------- pieces
    def forward_decoder(self, tokens: Tensor, restore: Tensor, sigma: Optional[Tensor] = None) -> Tensor:
        """The decoder on ``tokens + MLP(e(σ · embed_scale))`` (``σ`` defaults to 0: clean inputs)."""
        if sigma is None:
            sigma = tokens.new_zeros(tokens.shape[0])
        cond = self.noise_mlp(noise_level_embedding(sigma * self.noise.embed_scale, self.noise.embed_dim))
        return self.decoder(tokens + cond.to(tokens.dtype)[:, None, :], restore)

    def contrastive_pool(self, tokens: Tensor) -> Tensor:
        """``[N, 1 + K, D] -> [N, D]``: mean of the kept patch tokens (or of all tokens with ``pool_cls``)."""
        return tokens.mean(dim=1) if self.pool_cls else tokens[:, 1:, :].mean(dim=1)

    def forward_losses(self, views: Tensor, draw: CANDraw) -> dict[str, Any]:
        """All of CAN's terms for ``views [B, 2, C, H, W]`` under ``draw`` (``2B`` rows, sample-major)."""
        b, _ = self.check_views(views)
        x = views.flatten(0, 1)  # [2B, C, H, W] clean, row 2b + v
        if draw.eps.shape != x.shape or draw.sigma.shape != (x.shape[0],):
            raise ValueError(
                f"the draw holds noise {tuple(draw.eps.shape)} / levels {tuple(draw.sigma.shape)} "
                f"for views {tuple(x.shape)}"
            )
        scaled = draw.sigma.view(-1, 1, 1, 1).to(x.dtype) * draw.eps.to(x.dtype)  # σ ε  [2B, C, H, W]
        latent = self.forward_encoder(x + scaled, draw.masking.keep)  # noise on the encoder input only
        tokens = self.decoder_tokens(latent)  # [2B, 1 + K, D]

        z = self.projector(self.contrastive_pool(tokens)).view(b, 2, -1)  # before the noise embedding
        loss_nce = info_nce_loss(self.gather(z[:, 0]), self.gather(z[:, 1]), temperature=self.temperature)

        pred = self.forward_decoder(tokens, draw.masking.restore, draw.sigma)  # [2B, L, p² C]
        mask = draw.masking.mask
        loss_rec = mae_loss(x, pred, mask, self.patch_size, self.norm_pix_loss)  # clean target, masked patches
        noise_target = patchify(scaled if self.noise.target == "scaled" else draw.eps.to(x.dtype), self.patch_size)
        loss_noise = masked_patch_mse(pred, noise_target, 1.0 - mask)  # visible patches
        loss = (
            self.weight_mae * ((1.0 - self.weight_noise) * loss_rec + self.weight_noise * loss_noise)
            + self.weight_nce * loss_nce
        )
        pooled = pool_tokens(self.backbone, latent).detach().view(b, 2, -1)
        return {
            "loss": loss,
            "loss_rec": loss_rec.detach(),
            "loss_noise": loss_noise.detach(),
            "loss_nce": loss_nce.detach(),
            "sigma_mean": draw.sigma.mean().detach(),
            "embeddings": {"backbone": pooled, "projector": z.detach()},
        }

    # ---------------------------------------------------------------------------------- duty
    def training_loss(self, batch: Batch) -> dict[str, Any]:
        b, v = self.check_views(batch.views)
        draw = self.draw(b * v, tuple(batch.views.shape[2:]), batch.generator)
        return self.forward_losses(batch.views, draw)
