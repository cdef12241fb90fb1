"""timm Vision Transformers as backbones (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``).

Each builder returns an unmodified ``timm`` ``VisionTransformer`` with ``num_classes=0``: its
``forward`` is the pooled feature (class token by default, ``global_pool="avg"`` for the mean of the
patch tokens), ``num_features`` is the embedding width and ``no_weight_decay()`` names the position
embedding and the tokens. Any patch and image size works (CIFAR: ``img_size=32, patch_size=4`` gives
64 tokens, ``patch_size=2`` 256). The state dict is timm's, so an export loads with::

    timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)

Further keyword arguments go to timm (``drop_path_rate``, ``qkv_bias``, ``class_token``, ...). The
encoder's blocks stay addressable as ``model.blocks[i]`` (IMLE-SSL injects latent codes there).
"""

from __future__ import annotations

import timm
import torch.nn as nn

from selfsup.models.registry import register_backbone

__all__ = ["VIT_ARCHS", "timm_vit_name"]

#: registry name -> (timm architecture, embed dim, depth, heads)
VIT_ARCHS: dict[str, tuple[str, int, int, int]] = {
    "vit_tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "vit_small": ("vit_small_patch16_224", 384, 12, 6),
    "vit_base": ("vit_base_patch16_224", 768, 12, 12),
    "vit_large": ("vit_large_patch16_224", 1024, 24, 16),
}


def timm_vit_name(name: str) -> str:
    """The timm architecture behind a registry name (what ``timm.create_model`` needs to reload an export)."""
    return VIT_ARCHS[name][0]


def _vit(name: str, patch_size: int = 16, img_size: int = 224, global_pool: str = "token", **kw) -> nn.Module:
    if img_size % patch_size:
        raise ValueError(f"{name}: img_size {img_size} is not a multiple of patch_size {patch_size}")
    if global_pool not in ("token", "avg"):
        raise ValueError(
            f"{name}: global_pool must be 'token' (class token) or 'avg' (mean patch token), got {global_pool!r}"
        )
    return timm.create_model(
        VIT_ARCHS[name][0],
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        global_pool=global_pool,
        **kw,
    )


@register_backbone
def vit_tiny(**kw) -> nn.Module:
    return _vit("vit_tiny", **kw)


@register_backbone
def vit_small(**kw) -> nn.Module:
    return _vit("vit_small", **kw)


@register_backbone
def vit_base(**kw) -> nn.Module:
    return _vit("vit_base", **kw)


@register_backbone
def vit_large(**kw) -> nn.Module:
    return _vit("vit_large", **kw)
