r"""I-JEPA's narrow ViT predictor and the token passes of a class-token-free registry (timm) ViT.

Follows ``facebookresearch/ijepa`` ``src/models/vision_transformer.py`` (``VisionTransformerPredictor``,
``vit_predictor``, ``VisionTransformer.forward(x, masks)``, ``get_2d_sincos_pos_embed``), ``src/masks/utils.py``
(``apply_masks``), ``src/utils/tensors.py`` (``repeat_interleave_batch``) and ``src/helper.py`` (``init_model``).

Notation: ``B`` images, ``L = H·W`` patches, encoder width ``D``, predictor width ``E``, ``n_enc`` context masks of
``Kc`` patches and ``M`` target masks of ``Kt`` patches each (:mod:`selfsup.models.multiblock_mask`).

The encoder is the registry's unmodified timm ``VisionTransformer`` built **without a class token**
(``class_token: false``, ``global_pool: avg``, ``fc_norm: false``), as the official ViT has none: its pooled
``forward`` (kNN monitor, probes, export) is then the mean of the last layer's tokens after the final LayerNorm,
I-JEPA's evaluation feature. :func:`check_ijepa_vit` checks that layout; :func:`set_fixed_pos_embed` fills
``pos_embed [1, L, D]`` with the fixed 2-D sin-cos table and freezes it (official ``requires_grad=False``);
:func:`encode_tokens` is the official masked forward::

    x = patch_embed(imgs) + pos_embed                  [B, L, D]
    x = cat_e gather(x, context[e])                    [n_enc·B, Kc, D]   (apply_masks: mask-major)
    x = norm(blocks(norm_pre(x)))                      (keep=None: every patch, [B, L, D])

:class:`IJEPAPredictor` (``VisionTransformerPredictor``), for encoder tokens ``z [n_enc·B, Kc, D]``::

    x   = predictor_embed(z) + P[context]              [n_enc·B, Kc, E]   P: fixed sin-cos table [L, E]
    q   = mask_token + P[targets]                      [M·n_enc·B, Kt, E] (repeat_interleave_batch order)
    y   = norm(blocks(cat(repeat(x, M), q)))[:, Kc:]   [M·n_enc·B, Kt, E]
    out = predictor_proj(y)                            [M·n_enc·B, Kt, D]

Row ``(m·n_enc + e)·B + b`` of the output predicts target block ``m`` of image ``b`` from its context ``e``.
Blocks are timm's pre-norm ``Block`` (qkv bias, MLP ratio 4, LayerNorm eps 1e-6, the official ``vit_predictor``).

Initialisation (:func:`ijepa_init_`), what the official ends with: the constructors initialise Linear and patch
Conv2d weights ``trunc_normal(std 0.02)`` with zero biases, LayerNorms to 1 / 0, the mask token ``trunc_normal(0.02)``,
and rescale each block's ``attn.proj`` / ``mlp.fc2`` by ``1 / sqrt(2 (i + 1))``; ``helper.init_model`` then re-draws
every Linear weight ``trunc_normal(0.02)``, which undoes that rescaling: it is therefore not applied here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from selfsup.models.masked_vit import sincos_pos_embed_2d

__all__ = [
    "IJEPAPredictor",
    "PredictorConfig",
    "check_ijepa_vit",
    "encode_tokens",
    "gather_tokens",
    "ijepa_init_",
    "set_fixed_pos_embed",
]


def check_ijepa_vit(vit: nn.Module) -> None:
    """The timm ViT layout I-JEPA's token passes support: no class or register tokens, a position table over the
    patches only, a square grid, a static image size, and the final LayerNorm on the tokens (``fc_norm: false``)."""
    name = type(vit).__name__
    missing = [a for a in ("patch_embed", "pos_embed", "blocks", "norm") if getattr(vit, a, None) is None]
    if missing:
        raise ValueError(f"I-JEPA needs a timm ViT; {name} has no {missing}")
    if getattr(vit, "cls_token", None) is not None or getattr(vit, "reg_token", None) is not None:
        raise ValueError(
            "I-JEPA's ViT has no class token: build the backbone with kwargs {class_token: false, global_pool: avg, "
            "fc_norm: false} (its pooled feature is then the mean of the normed last-layer tokens)"
        )
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError("I-JEPA supports timm ViTs without dynamic_img_size")
    if isinstance(vit.norm, nn.Identity):
        raise ValueError(
            "I-JEPA's ViT normalises every token after the last block: build it with fc_norm: false (timm's "
            "global_pool avg otherwise moves the final LayerNorm after the pooling)"
        )
    gh, gw = vit.patch_embed.grid_size
    if gh != gw:
        raise ValueError(f"I-JEPA needs a square patch grid, got {gh}x{gw}")
    if tuple(vit.pos_embed.shape) != (1, gh * gw, vit.embed_dim):
        raise ValueError(f"unexpected pos_embed shape {tuple(vit.pos_embed.shape)} for a {gh}x{gw} grid")


@torch.no_grad()
def set_fixed_pos_embed(vit: nn.Module) -> nn.Module:
    """Fill ``vit.pos_embed [1, L, D]`` with the fixed 2-D sin-cos table (no class row) and freeze it, in place."""
    check_ijepa_vit(vit)
    vit.pos_embed.copy_(sincos_pos_embed_2d(vit.embed_dim, vit.patch_embed.grid_size[0], cls_token=False)[None])
    vit.pos_embed.requires_grad_(False)
    return vit


@torch.no_grad()
def ijepa_init_(module: nn.Module, std: float = 0.02) -> None:
    """The official initialisation, in place: Linear and Conv2d weights ``trunc_normal(0, std)`` (cut at ±2, as the
    official ``trunc_normal_``), biases 0, LayerNorm 1 / 0, a ``mask_token`` ``trunc_normal(0, std)``. Frozen
    position tables are left alone."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    token = getattr(module, "mask_token", None)
    if isinstance(token, nn.Parameter):
        nn.init.trunc_normal_(token, std=std, a=-2.0, b=2.0)


def gather_tokens(x: Tensor, masks: Tensor) -> Tensor:
    """``x [B, L, D]``, ``masks [G, B, K]`` -> ``[G·B, K, D]``, row ``g·B + b`` = ``x[b, masks[g, b]]`` (the official
    ``apply_masks``: mask-major)."""
    if masks.dim() != 3 or masks.shape[1] != x.shape[0]:
        raise ValueError(f"masks must be [G, B, K] with B = {x.shape[0]}, got shape {tuple(masks.shape)}")
    g, b, k = masks.shape
    idx = masks.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])  # [G, B, K, D]
    return torch.gather(x.unsqueeze(0).expand(g, -1, -1, -1), 2, idx).reshape(g * b, k, x.shape[-1])


def encode_tokens(vit: nn.Module, imgs: Tensor, masks: Optional[Tensor] = None) -> Tensor:
    """The encoder on the patches of ``masks [G, B, K]`` (``[G·B, K, D]``) or on every patch (``None``: ``[B, L, D]``,
    which is ``vit.forward_features(imgs)``); the tokens after the final LayerNorm."""
    x = vit.patch_embed(imgs) + vit.pos_embed  # [B, L, D]
    if masks is not None:
        x = gather_tokens(x, masks)
    x = vit.norm_pre(vit.pos_drop(x))
    return vit.norm(vit.blocks(x))


@dataclass
class PredictorConfig:
    """The predictor's shape (official ``meta.pred_depth`` / ``pred_emb_dim``; ViT-H/14: depth 12, width 384).

    Attributes:
        width: predictor token width ``E`` (``predictor_embed``: ``D -> E``).
        depth: transformer blocks.
        heads: attention heads per block (``None``: the encoder's, as the official ``num_heads=encoder.num_heads``);
            must divide ``width``.
        mlp_ratio: MLP hidden width / ``E`` (official 4).
    """

    width: int = 384
    depth: int = 12
    heads: Optional[int] = None
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width < 4 or self.width % 4 or self.depth < 1:
            raise ValueError(f"predictor: width must be a positive multiple of 4 and depth >= 1; got {self}")
        if self.heads is not None and (self.heads < 1 or self.width % self.heads):
            raise ValueError(f"predictor: heads must divide width, got {self}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"predictor: mlp_ratio must be > 0, got {self.mlp_ratio}")


class IJEPAPredictor(nn.Module):
    """I-JEPA's predictor (see the module docstring): context tokens + mask tokens at the target positions ->
    predicted target-encoder tokens. ``no_weight_decay()`` names the (frozen) position table only: the official
    optimiser decays the mask token (a 3-D parameter)."""

    def __init__(self, embed_dim: int, num_patches: int, heads: int, config: Optional[PredictorConfig] = None):
        super().__init__()
        from timm.models.vision_transformer import Block

        cfg = config or PredictorConfig()
        g = math.isqrt(num_patches)
        if g * g != num_patches:
            raise ValueError(f"the predictor needs a square number of patches, got {num_patches}")
        heads = int(cfg.heads if cfg.heads is not None else heads)
        if cfg.width % heads:
            raise ValueError(f"predictor width {cfg.width} is not divisible by {heads} heads (set predictor.heads)")
        self.config, self.num_patches, self.heads = cfg, num_patches, heads
        self.predictor_embed = nn.Linear(embed_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        table = sincos_pos_embed_2d(cfg.width, g, cls_token=False)[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # [1, L, E]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(cfg.width, heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth)]
        )
        self.norm = norm(cfg.width)
        self.predictor_proj = nn.Linear(cfg.width, embed_dim)
        ijepa_init_(self)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, z: Tensor, context: Tensor, targets: Tensor) -> Tensor:
        """``z [n_enc·B, Kc, D]`` context tokens, ``context [n_enc, B, Kc]``, ``targets [M, B, Kt]`` ->
        predictions ``[M·n_enc·B, Kt, D]`` (row ``(m·n_enc + e)·B + b``)."""
        n_enc, b, kc = context.shape
        m, bt, kt = targets.shape
        if bt != b or tuple(z.shape[:2]) != (n_enc * b, kc):
            raise ValueError(
                f"predictor: tokens {tuple(z.shape)}, context masks {tuple(context.shape)} and target masks "
                f"{tuple(targets.shape)} disagree (expected tokens [n_enc·B, Kc, D] = [{n_enc * b}, {kc}, D])"
            )
        pos = self.pos_embed.expand(b, -1, -1)  # [B, L, E]
        x = self.predictor_embed(z) + gather_tokens(pos, context)  # [n_enc·B, Kc, E]
        q = gather_tokens(pos, targets)  # [M·B, Kt, E], row m·B + b
        q = q.view(m, 1, b, kt, -1).expand(-1, n_enc, -1, -1, -1).reshape(m * n_enc * b, kt, -1)
        q = self.mask_token + q  # [M·n_enc·B, Kt, E]
        x = torch.cat([x.repeat(m, 1, 1), q], dim=1)  # row (m·n_enc + e)·B + b
        x = self.norm(self.blocks(x))
        return self.predictor_proj(x[:, kc:])  # [M·n_enc·B, Kt, D]
