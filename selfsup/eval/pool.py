"""How a backbone pools its output into one feature vector, chosen at evaluation time.

A ResNet has one pooling (global average). A timm ViT pools per its ``global_pool`` (a registry kwarg
recorded in the backbone spec): ``token`` (the class token after the final LayerNorm: MAE's linear
probe, ``--cls_token``) or ``avg`` (the mean of the patch tokens: MAE's fine-tune default). The
checkpoint fixes the one it was pretrained with; :func:`set_global_pool` switches it without touching
any weight, through timm's own ``reset_classifier(0, global_pool=...)``. The state dict stays the
same, so a strict load still applies:

* a ViT built with ``token`` (final ``norm`` LayerNorm, no ``fc_norm``) switched to ``avg`` averages
  the patch tokens **after** that pretrained final LayerNorm;
* a ViT built with ``avg`` (``norm`` is the identity, a pretrained ``fc_norm`` after pooling) switched
  to ``token`` takes the raw class token through that ``fc_norm``.

MAE's own ``avg`` fine-tune drops the pretrained ``norm`` and trains a freshly initialised
``fc_norm`` instead; pretraining with ``global_pool: avg`` gives exactly that module layout.
"""

from __future__ import annotations

from typing import Literal, Optional

from torch import nn

__all__ = ["POOLS", "Pool", "current_pool", "is_vit", "set_global_pool"]

Pool = Literal["token", "avg"]
POOLS: tuple[str, ...] = ("token", "avg")


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm Vision Transformer (has ``blocks``, ``patch_embed`` and ``global_pool``)."""
    return all(hasattr(backbone, a) for a in ("blocks", "patch_embed", "global_pool"))


def current_pool(backbone: nn.Module) -> str:
    """The pooling ``backbone``'s forward applies now: a ViT's ``global_pool``, else ``avg`` (a ResNet's)."""
    return str(backbone.global_pool) if is_vit(backbone) else "avg"


def set_global_pool(backbone: nn.Module, pool: Optional[str]) -> nn.Module:
    """Make ``backbone``'s pooled forward use ``pool``; returns the same module.

    ``None`` keeps the backbone's own pooling. For a ViT, ``token`` needs a class token. Any backbone
    that is not a ViT pools by global average: ``avg`` is accepted for it (nothing changes) and
    ``token`` is an error naming the backbone.
    """
    if pool is None:
        return backbone
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)} (or None for the backbone's own), got {pool!r}")
    if not is_vit(backbone):
        if pool == "token":
            raise ValueError(
                f"pool 'token' needs a ViT with a class token; {type(backbone).__name__} pools by "
                "global average only (use pool avg or leave it unset)"
            )
        return backbone
    if pool == "token" and getattr(backbone, "cls_token", None) is None:
        raise ValueError("pool 'token': this ViT has no class token (built with class_token=False); use pool avg")
    if getattr(backbone, "attn_pool", None) is not None:
        raise ValueError("this ViT pools by attention (global_pool 'map'); switching it would drop that module")
    backbone.reset_classifier(0, global_pool=pool)
    return backbone
