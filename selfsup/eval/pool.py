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

Frozen-feature probes (kNN, linear, few-shot) also take DINO's multi-block features
(``eval_linear.py``, :class:`MultiBlockPool`): ``last4``, the class tokens of the last 4 blocks, each
after the final LayerNorm, concatenated (``--n_last_blocks 4 --avgpool_patchtokens false``, DINO's
ViT-S/16 protocol; ``[N, 4D]``), and ``token+avg``, the last block's class token and its mean patch
token, both after the final LayerNorm (``--n_last_blocks 1 --avgpool_patchtokens true``, ViT-B/16;
``[N, 2D]``). :func:`probe_pool` applies any of the four.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "MULTI_BLOCK",
    "POOLS",
    "PROBE_POOLS",
    "MultiBlockPool",
    "Pool",
    "ProbePool",
    "current_pool",
    "is_vit",
    "probe_pool",
    "probe_pool_name",
    "set_global_pool",
]

Pool = Literal["token", "avg"]
POOLS: tuple[str, ...] = ("token", "avg")
ProbePool = Literal["token", "avg", "last4", "token+avg"]
#: DINO's probe features: name -> (n_last_blocks, avgpool_patchtokens)
MULTI_BLOCK: dict[str, tuple[int, bool]] = {"last4": (4, False), "token+avg": (1, True)}
PROBE_POOLS: tuple[str, ...] = POOLS + tuple(MULTI_BLOCK)


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


class MultiBlockPool(nn.Module):
    """DINO's ``eval_linear.py`` features of a timm ViT: the class tokens of the last ``n`` blocks, each through
    the final LayerNorm, concatenated (``[N, n·D]``), then with ``avgpool`` the mean of the last block's normed
    patch tokens appended (``[N, (n + 1)·D]``). Weights are the ViT's own; nothing is trained or copied."""

    def __init__(self, vit: nn.Module, n_last_blocks: int, avgpool: bool):
        super().__init__()
        if not is_vit(vit) or getattr(vit, "cls_token", None) is None:
            raise ValueError(
                f"DINO's multi-block features need a ViT with a class token; got {type(vit).__name__} "
                "(a ResNet has only its global average pool: leave --pool unset)"
            )
        if not 1 <= n_last_blocks <= len(vit.blocks):
            raise ValueError(f"n_last_blocks must be in [1, {len(vit.blocks)}], got {n_last_blocks}")
        self.vit, self.n, self.avgpool = vit, int(n_last_blocks), bool(avgpool)
        self.pool = next(k for k, v in MULTI_BLOCK.items() if v == (self.n, self.avgpool))

    def forward(self, x: Tensor) -> Tensor:
        # [(patch tokens [N, L, D], prefix tokens [N, P, D])] for each of the last n blocks, after the final norm
        outs = self.vit.get_intermediate_layers(x, n=self.n, return_prefix_tokens=True, norm=True)
        feats = [prefix[:, 0] for _, prefix in outs]  # class tokens, [N, D] each
        if self.avgpool:
            feats.append(outs[-1][0].mean(dim=1))  # mean patch token of the last block
        return torch.cat(feats, dim=-1)


def probe_pool(backbone: nn.Module, pool: Optional[str]) -> nn.Module:
    """The module a frozen-feature probe runs: ``backbone`` with :func:`set_global_pool` for ``token`` / ``avg``
    (or ``None``), or a :class:`MultiBlockPool` around it for ``last4`` / ``token+avg``."""
    if pool in MULTI_BLOCK:
        return MultiBlockPool(backbone, *MULTI_BLOCK[pool])
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(PROBE_POOLS)} (or None for the backbone's own), got {pool!r}")
    return set_global_pool(backbone, pool)


def probe_pool_name(module: nn.Module) -> str:
    """The pooling of a module :func:`probe_pool` returned."""
    return module.pool if isinstance(module, MultiBlockPool) else current_pool(module)
