r"""The MAE family's pieces around a registry (timm) ViT: patches, masks, fixed position embeddings, the
kept-token encoder pass and the light decoder (He et al. 2022; spec §2.1-2.2).

The encoder **is** the registry's unmodified timm ``VisionTransformer`` (``num_classes=0``): nothing here
subclasses or wraps it, so its pooled ``forward`` (kNN monitor, probes, export) and its state-dict keys stay
timm's, and ``vit.blocks[i]`` stay timm blocks (IMLE-SSL wraps them). What the MAE family changes:

* :func:`set_sincos_pos_embed` fills ``vit.pos_embed`` with the fixed 2-D sin-cos table and freezes it (a
  parameter with ``requires_grad=False``, saved in every checkpoint, so an export still loads into a plain
  ``timm.create_model(...)`` and gives the same features);
* :func:`forward_kept` runs the encoder on the kept tokens only (training); the plain ``vit(x)`` stays the
  pooled forward on all tokens (evaluation, export). At mask ratio 0 the two agree token for token.

Notation: ``N`` images, ``C`` channels, ``H = W`` pixels, patch side ``p``, ``L = (H / p)²`` patches,
``K = floor(L · (1 - r))`` kept patches at mask ratio ``r``, encoder width ``D``, decoder width ``E``.

Patch layout (:func:`patchify`): patch ``l = i · (W / p) + j`` is grid row ``i``, column ``j``; inside a patch
the ``p² C`` values run over pixel row, pixel column, then channel (channel fastest), i.e.
``x[n, l, (a · p + b) · C + c] = imgs[n, c, i · p + a, j · p + b]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "DecoderConfig",
    "MAEDecoder",
    "Masking",
    "check_masked_vit",
    "forward_kept",
    "mae_init_",
    "masking_from_noise",
    "patchify",
    "pool_tokens",
    "random_masking",
    "set_sincos_pos_embed",
    "sincos_pos_embed_2d",
    "unpatchify",
    "vit_patch_size",
]


# ------------------------------------------------------------------------------------------------ patches
def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """``[N, C, H, W] -> [N, L, p² C]`` in row-major patch order, (pixel row, pixel column, channel) inside."""
    if imgs.dim() != 4:
        raise ValueError(f"patchify expects images [N, C, H, W], got shape {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    p = int(patch_size)
    if p < 1 or h != w or h % p:
        raise ValueError(
            f"patchify needs square images with a side divisible by the patch size; got {h}x{w} and patch_size {p}"
        )
    g = h // p
    x = imgs.reshape(n, c, g, p, g, p)
    x = torch.einsum("ncipjq->nijpqc", x)  # [N, gh, gw, p, p, C]
    return x.reshape(n, g * g, p * p * c)


def unpatchify(x: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """``[N, L, p² C] -> [N, C, H, W]``, the inverse of :func:`patchify`."""
    if x.dim() != 3:
        raise ValueError(f"unpatchify expects patches [N, L, p² C], got shape {tuple(x.shape)}")
    n, length, d = x.shape
    p, c = int(patch_size), int(channels)
    g = math.isqrt(length)
    if g * g != length or d != p * p * c:
        raise ValueError(
            f"unpatchify: {length} patches of {d} values are not a square grid of "
            f"{p}x{p}x{c} patches (patch_size {p}, channels {c})"
        )
    x = x.reshape(n, g, g, p, p, c)
    x = torch.einsum("nijpqc->ncipjq", x)
    return x.reshape(n, c, g * p, g * p)


# ------------------------------------------------------------------------------------------------ masking
class Masking(NamedTuple):
    """One random masking of ``N`` token sequences of length ``L`` (MAE's ``ids_keep / mask / ids_restore``).

    Attributes:
        keep: ``[N, K]`` (long) indices of the kept patches, in shuffled order (the encoder's token order).
        mask: ``[N, L]`` float, 1 = removed (masked), 0 = kept, in the original patch order.
        restore: ``[N, L]`` (long) ``argsort`` of the shuffle: position of patch ``l`` in ``[kept; removed]``.
    """

    keep: Tensor
    mask: Tensor
    restore: Tensor

    def rows(self, index) -> Masking:
        """The masking of a subset of the sequences (a slice or index tensor over ``N``)."""
        return Masking(self.keep[index], self.mask[index], self.restore[index])


def masking_from_noise(noise: Tensor, mask_ratio: float) -> Masking:
    """MAE masking from per-patch scores ``noise [N, L]``: sort ascending, keep the first
    ``K = floor(L (1 - r))`` (every sample keeps exactly ``K``), ``restore = argsort(shuffle)``.

    Fixing ``noise`` fixes the mask (IMLE-SSL keeps one mask per example for an epoch).
    """
    if noise.dim() != 2:
        raise ValueError(f"masking noise must be [N, L], got shape {tuple(noise.shape)}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1) (at least one patch is kept), got {mask_ratio}")
    n, length = noise.shape
    keep_n = int(length * (1.0 - float(mask_ratio)))
    if keep_n < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {length}; lower it")
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep = shuffle[:, :keep_n]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep_n] = 0
    mask = torch.gather(mask, 1, restore)
    return Masking(keep, mask, restore)


def random_masking(
    n: int | Tensor,
    length: Optional[int] = None,
    mask_ratio: float = 0.75,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Masking:
    """Per-sample uniform random masking keeping exactly ``floor(L (1 - r))`` patches of every sample.

    ``random_masking(N, L, r, generator)`` or ``random_masking(x, None, r, generator)`` with tokens
    ``x [N, L, D]``. Scores ``u ~ U[0, 1)^{N×L}`` are drawn from ``generator`` (on its device), then
    :func:`masking_from_noise`.
    """
    if isinstance(n, Tensor):
        if n.dim() != 3:
            raise ValueError(f"random_masking expects tokens [N, L, D] or (N, L); got shape {tuple(n.shape)}")
        device = n.device if device is None else device
        n, length = n.shape[0], n.shape[1]
    if length is None or int(length) < 1 or int(n) < 1:
        raise ValueError(f"random_masking needs N >= 1 sequences of length L >= 1, got N={n}, L={length}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(int(n), int(length), generator=generator, device=device)
    return masking_from_noise(noise, mask_ratio)


# ------------------------------------------------------------------------------------ position embeddings
def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[M] -> [M, dim]``: ``[sin(pos ω_k)]_k ++ [cos(pos ω_k)]_k``, ``ω_k = 10000^(-k / (dim/2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos table ``[(1 +) G², E]`` (float32), row ``1 + i G + j`` for grid cell (row i, column j).

    The first ``E/2`` channels encode the **column** ``j``, the last ``E/2`` the **row** ``i``; each half is
    ``[sin(pos ω_k)]_{k<E/4} ++ [cos(pos ω_k)]_{k<E/4}`` with ``ω_k = 10000^(-k / (E/4))``. The cls row is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.reshape(-1)), _sincos_1d(embed_dim // 2, rows.reshape(-1))], 1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], 0)
    return emb.float()


def vit_patch_size(vit: nn.Module) -> int:
    p = vit.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def check_masked_vit(vit: nn.Module) -> None:
    """The timm ViT layouts the kept-token pass supports: one class token, no register tokens, the position
    table covering cls + patches, a square grid, flattened patch tokens."""
    name = type(vit).__name__
    missing = [a for a in ("patch_embed", "pos_embed", "cls_token", "blocks", "norm") if getattr(vit, a, None) is None]
    if missing:
        raise ValueError(f"MAE needs a timm ViT with a class token and position embedding; {name} has no {missing}")
    if (
        getattr(vit, "reg_token", None) is not None
        or getattr(vit, "no_embed_class", False)
        or getattr(vit, "dynamic_img_size", False)
    ):
        raise ValueError("MAE supports timm ViTs without register tokens, no_embed_class or dynamic_img_size")
    gh, gw = vit.patch_embed.grid_size
    if gh != gw:
        raise ValueError(f"MAE needs a square patch grid, got {gh}x{gw}")
    if tuple(vit.pos_embed.shape) != (1, 1 + gh * gw, vit.embed_dim):
        raise ValueError(f"unexpected pos_embed shape {tuple(vit.pos_embed.shape)} for a {gh}x{gw} grid")


@torch.no_grad()
def set_sincos_pos_embed(vit: nn.Module) -> nn.Module:
    """Fill ``vit.pos_embed`` ``[1, 1 + L, D]`` with the fixed 2-D sin-cos table and freeze it (in place)."""
    check_masked_vit(vit)
    table = sincos_pos_embed_2d(vit.embed_dim, vit.patch_embed.grid_size[0], cls_token=True)
    vit.pos_embed.copy_(table[None])
    vit.pos_embed.requires_grad_(False)
    return vit


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation, in place: every ``nn.Linear`` Xavier-uniform with bias 0, LayerNorm weight 1 /
    bias 0, patch-embedding conv Xavier-uniform on its flattened ``[D, C p²]`` view, class / mask tokens
    ``N(0, 0.02²)``. Frozen position tables are left alone."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = getattr(getattr(module, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    for name in ("cls_token", "mask_token"):
        t = getattr(module, name, None)
        if isinstance(t, nn.Parameter):
            nn.init.normal_(t, std=0.02)


# ------------------------------------------------------------------------------------------ encoder pass
def forward_kept(vit: nn.Module, imgs: Tensor, keep: Optional[Tensor]) -> Tensor:
    """The encoder on the kept patches: ``imgs [N, C, H, W]``, ``keep [N, K]`` -> tokens ``[N, 1 + K, D]``.

    ``patch_embed -> + pos (patch rows) -> gather kept -> prepend cls + pos[0] -> norm_pre -> blocks -> norm``.
    ``keep=None`` keeps every patch in grid order, which is ``vit.forward_features(imgs)`` exactly.
    Token 0 is the class token; token ``1 + k`` is patch ``keep[:, k]``.
    """
    x = vit.patch_embed(imgs)  # [N, L, D]
    pos = vit.pos_embed  # [1, 1 + L, D]
    x = x + pos[:, 1:, :]
    if keep is not None:
        if keep.dim() != 2 or keep.shape[0] != x.shape[0]:
            raise ValueError(f"keep must be [N, K] indices for {x.shape[0]} images, got shape {tuple(keep.shape)}")
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
    cls = (vit.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
    x = vit.pos_drop(torch.cat([cls, x], dim=1))
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def pool_tokens(vit: nn.Module, tokens: Tensor) -> Tensor:
    """The ViT's own pooled feature of encoder tokens ``[N, 1 + K, D] -> [N, D]`` (class token, or mean of the
    patch tokens + fc_norm for ``global_pool="avg"``): on all tokens this is ``vit(x)``."""
    return vit.forward_head(tokens, pre_logits=True)


# ------------------------------------------------------------------------------------------------ decoder
@dataclass
class DecoderConfig:
    """The MAE decoder's shape (all official configs: width 512, depth 8, 16 heads, MLP ratio 4).

    Attributes:
        width: decoder token width ``E`` (``decoder_embed``: ``D -> E``).
        depth: transformer blocks.
        heads: attention heads per block (must divide ``width``).
        mlp_ratio: MLP hidden width / ``E``.
    """

    width: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width < 4 or self.width % 4 or self.depth < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"decoder: width must be a positive multiple of 4 and of heads, depth >= 1; got {self}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"decoder: mlp_ratio must be > 0, got {self.mlp_ratio}")


class MAEDecoder(nn.Module):
    r"""MAE's decoder: kept encoder tokens + mask tokens -> per-patch pixel predictions.

    ``latent [N, 1 + K, D]`` (cls first) ``-> Linear D->E -> append L-K mask tokens -> unshuffle with
    restore (cls stays first) -> + fixed 2-D sin-cos table [1, 1 + L, E] -> blocks -> LayerNorm ->
    Linear E -> p² C -> drop cls -> [N, L, p² C]``. Blocks are timm's pre-norm ``Block`` (qkv bias,
    LayerNorm eps 1e-6). ``no_weight_decay()`` names the mask token and the (frozen) position table.
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        patch_size: int,
        in_chans: int = 3,
        config: Optional[DecoderConfig] = None,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        cfg = config or DecoderConfig()
        g = math.isqrt(num_patches)
        if g * g != num_patches:
            raise ValueError(f"the decoder needs a square number of patches, got {num_patches}")
        self.config, self.num_patches, self.patch_size, self.in_chans = cfg, num_patches, patch_size, in_chans
        self.embed = nn.Linear(embed_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.width, g, cls_token=True)[None], requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth)]
        )
        self.norm = norm(cfg.width)
        self.pred = nn.Linear(cfg.width, patch_size * patch_size * in_chans)
        mae_init_(self)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def forward(self, latent: Tensor, restore: Tensor) -> Tensor:
        """``latent [N, 1 + K, D]``, ``restore [N, L]`` -> predictions ``[N, L, p² C]`` in patch order."""
        n, t, _ = latent.shape
        if restore.shape != (n, self.num_patches):
            raise ValueError(f"restore must be [N, L] = [{n}, {self.num_patches}], got {tuple(restore.shape)}")
        x = self.embed(latent)  # [N, 1 + K, E]
        masked = self.mask_token.expand(n, self.num_patches + 1 - t, -1)  # [N, L - K, E]
        x_ = torch.cat([x[:, 1:, :], masked], dim=1)  # [N, L, E] in shuffled order
        x_ = torch.gather(x_, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # original patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.pos_embed  # [N, 1 + L, E]
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:, :]  # [N, L, p² C]
