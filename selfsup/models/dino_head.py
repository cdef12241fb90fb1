r"""DINO's projection head: an MLP to a bottleneck, L2 normalisation, and a weight-normalised last layer.

Follows ``facebookresearch/dino``, ``vision_transformer.py``: ``DINOHead`` (its ``_init_weights`` included)::

    in_dim -> hidden (GELU; BN before it with use_bn) -> ... -> bottleneck          (nlayers linear layers)
    z = mlp(x) / ||mlp(x)||_2                                                        (F.normalize, eps 1e-12)
    logits = W z,   W_k = g_k · v_k / ||v_k||_2   (row k of the [out_dim, bottleneck] weight, no bias)

The MLP's linear layers are initialised with a truncated normal of std 0.02 (cut at ±2, absolute, as the official
``trunc_normal_``) and zero biases; the last layer keeps ``nn.Linear``'s default initialisation for ``v``, then gets
its weight norm with every gain ``g_k`` filled with 1 and, with ``norm_last_layer`` (official default), frozen: the
rows of the effective weight are then unit vectors for the whole run. The weight norm is
``torch.nn.utils.parametrizations.weight_norm`` (the official code's deprecated ``nn.utils.weight_norm``, same
maths): ``g`` is ``last_layer.parametrizations.weight.original0`` (``[out_dim, 1]``), ``v`` is ``original1``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """DINO's head: ``logits = last_layer(normalize(mlp(x)))``.

    Args:
        in_dim: width of the backbone features.
        out_dim: ``K``, the output dimensions (official default 65536).
        use_bn: BatchNorm1d after each hidden linear layer (official ``--use_bn_in_head``, default False).
        norm_last_layer: keep the last layer's gains ``g`` at 1 (frozen); ``False`` trains them.
        nlayers: linear layers before the bottleneck (3: ``in -> hidden -> hidden -> bottleneck``; 1: one
            ``in -> bottleneck`` layer).
        hidden_dim: hidden width (official 2048).
        bottleneck_dim: width of the normalised bottleneck (official 256).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("nlayers", nlayers),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead {name} must be a positive integer, got {value!r}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for a, b in itertools.pairwise(dims):
                layers.append(nn.Linear(a, b))
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)  # before the last layer exists, as the official code
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad_(False)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.norm_last_layer = bool(norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def project(self, x: Tensor) -> Tensor:
        """``[N, in_dim] -> [N, bottleneck_dim]``: the L2-normalised bottleneck."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, in_dim] -> [N, out_dim]`` logits."""
        return self.last_layer(self.project(x))
