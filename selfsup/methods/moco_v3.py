r"""MoCo v3 (Chen, Xie & He, ICCV 2021): queries from backbone + projector + predictor against keys from a momentum
encoder (an EMA of backbone + projector), contrasted over the keys of the global batch.

Follows facebookresearch/moco-v3: ``moco/builder.py`` (``MoCo.__init__``, ``_build_mlp``,
``MoCo_ResNet._build_projector_and_predictor_mlps``, ``MoCo_ViT._build_projector_and_predictor_mlps``,
``MoCo.forward``, ``MoCo.contrastive_loss``, ``concat_all_gather``), ``main_moco.py`` (``adjust_moco_momentum``,
``train``, the optimisers, ``augmentation1`` / ``augmentation2``) and ``vits.py`` (``VisionTransformerMoCo``:
``build_2d_sincos_position_embedding``, its weight initialisation and ``stop_grad_conv1``).

For views ``x1, x2`` (separate forward passes, BatchNorm statistics per view, as ``MoCo.forward``), queries
``q_v = pred(proj(f(x_v)))`` (this rank's ``N`` rows) and keys ``k_v = proj_ξ(f_ξ(x_v))`` computed under no-grad by
the momentum encoder and all-gathered **without gradient** (``concat_all_gather``: ``self.gather(k.detach())``)::

    ctr(q, k) = 2τ · CE( nrm(q) nrm(k)ᵀ / τ,  labels = offset + arange(N) ),    offset = rank · N
    loss      = ctr(q1, k2) + ctr(q2, k1)                                      (selfsup.losses.moco_v3_loss)

The queries stay local; each rank's loss is the mean over its queries and DDP averages the gradients, which is the
single-process gradient at the global batch. Heads (``_build_mlp``: every Linear without bias; hidden layers
``Linear -> BN -> ReLU``; ``last_bn`` appends ``BN(affine=False)``):

* ResNet: projector ``_build_mlp(2, F, 4096, 256)`` = ``F -> 4096 (BN, ReLU) -> 256 -> BN(affine=False)``,
  predictor ``_build_mlp(2, 256, 4096, 256, last_bn=False)``;
* ViT: projector ``_build_mlp(3, D, 4096, 256)`` (two hidden layers), predictor ``_build_mlp(2, 256, 4096, 256)``,
  which for the ViT **keeps** its last ``BN(affine=False)`` (``MoCo_ViT`` does not pass ``last_bn=False``).

``projector=None`` / ``predictor_last_bn=None`` pick these by backbone family (a ViT is a backbone with a
``patch_embed``); explicit values override.

Momentum encoder: the teacher ``teacher`` (``EMATeacher(tau, final_tau, backbone, projector)``, ``--which teacher``
evaluates it). With ``final_tau=1.0`` its rate after optimiser step ``k`` of ``K`` is the official ``--moco-m-cos``
schedule: ``adjust_moco_momentum(epoch + i / iters_per_epoch)`` with ``k = epoch · iters_per_epoch + i`` and
``K = epochs · iters_per_epoch`` gives ``m_k = 1 − ½(1 + cos(π k / K))(1 − m0)``, which is exactly
``cosine_tau(k, K, m0, 1.0)`` (``tests/test_mocov3_simsiam.py`` checks it at ``k = 0, K/2, K`` and in between).
``final_tau=None`` keeps ``m0`` constant (``main_moco.py`` without ``--moco-m-cos``).

ViT backbones (``vits.py``, done for every ViT as ``VisionTransformerMoCo`` does): the position embedding becomes
the fixed 2-D sin-cos table of ``build_2d_sincos_position_embedding`` (frozen parameter; channels
``[sin(r ω), cos(r ω), sin(c ω), cos(c ω)]`` for the patch in grid row ``r``, column ``c``, ``ω_j = 10000^(−4j/D)``;
the cls row zeros), and the weights get its initialisation (Linear: Xavier-uniform, ``qkv`` with the fan of one of
Q, K, V; biases 0; patch projection Xavier-uniform on ``[D, 3p²]``, bias 0; cls token ``N(0, 1e-6²)``); the
projector and predictor keep PyTorch's default init, as the official heads. ``stop_grad_conv1`` freezes the patch
projection at that random init (``patch_embed.proj`` weight and bias ``requires_grad=False``: no gradient, no
parameter group, no weight decay); the backbone stays the registry's unmodified timm ViT (export and probes as usual).
The official ViT-S has 12 heads (timm's has 6): the recipes set ``num_heads: 12``.

Departures:

* the momentum update runs after each optimiser step (``EMATeacher``, base class) with ``m_k`` of the step just
  taken; the official code updates at the start of iteration ``k + 1`` (before computing its keys) with ``m_{k+1}``.
  The teacher that computes the keys has seen the same online weights; its rate lags by one step,
  ``|m_{k+1} − m_k| ≤ π(1 − m0) / (2K)`` (5e-7 in the 100-epoch ResNet-50 run, K = 100 · 312), and the official no-op update
  at iteration 0 is skipped;
* the per-iteration lr schedule is the engine's (linear warm-up from ``peak/warmup_steps``, not 0, then half-cosine).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from selfsup import distributed
from selfsup.losses import moco_v3_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, TINY_VIT, BackboneSpec
from selfsup.models.masked_vit import sincos_pos_embed_2d

__all__ = ["MoCoV3", "mocov3_sincos_pos_embed", "mocov3_vit_init_"]


def mocov3_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """``vits.py`` ``build_2d_sincos_position_embedding``: ``[1 + G², D]``, row ``1 + r·G + c`` (grid row ``r``,
    column ``c``) is ``[sin(r ω), cos(r ω), sin(c ω), cos(c ω)]``, ``ω_j = 10000^(−j / (D/4))``; the cls row zeros.
    MAE's table (:func:`~selfsup.models.masked_vit.sincos_pos_embed_2d`) encodes the column first: the halves swap."""
    table = sincos_pos_embed_2d(embed_dim, grid_size, cls_token=True)
    half = embed_dim // 2
    return torch.cat([table[:, half:], table[:, :half]], dim=1)


@torch.no_grad()
def mocov3_vit_init_(vit: nn.Module) -> nn.Module:
    """``VisionTransformerMoCo.__init__`` on a timm ViT, in place: fixed sin-cos ``pos_embed`` (frozen), then the
    initialisation of ``vits.py`` (see the module docstring)."""
    grid = tuple(vit.patch_embed.grid_size)
    expected = (1, 1 + grid[0] * grid[1], vit.embed_dim)
    if grid[0] != grid[1] or getattr(vit, "cls_token", None) is None or tuple(vit.pos_embed.shape) != expected:
        raise ValueError(
            "MoCo v3's ViT needs a square patch grid, one class token and a position embedding over cls + patches; "
            f"got grid {grid}, pos_embed {tuple(vit.pos_embed.shape)}"
        )
    vit.pos_embed.copy_(mocov3_sincos_pos_embed(vit.embed_dim, grid[0])[None])
    vit.pos_embed.requires_grad_(False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # Q, K and V as three separate [D, D] matrices
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / float(proj.weight[0].numel() + vit.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    return vit


@register_method
class MoCoV3(Method):
    """MoCo v3.

    Args:
        backbone: backbone spec ``{name, kwargs}`` (official: ResNet-50 ``zero_init_residual``, ViT-S/B/16).
        projector: widths after the backbone feature, ending in ``BN(affine=False)``; ``None``: ``[4096, 256]``
            for a ResNet, ``[4096, 4096, 256]`` for a ViT (``--moco-mlp-dim 4096 --moco-dim 256``).
        predictor_hidden: hidden width of the predictor (4096); its output width is the projector's.
        predictor_last_bn: end the predictor with ``BN(affine=False)``; ``None``: ``True`` for a ViT, ``False`` for
            a ResNet, as the official builders.
        temperature: ``--moco-t`` (1.0 for ResNet-50, 0.2 for the ViTs and solo-learn CIFAR).
        tau, final_tau: momentum ``--moco-m`` and the cosine schedule to ``final_tau`` (``--moco-m-cos``: 1.0);
            ``final_tau=None`` keeps it constant.
        stop_grad_conv1: freeze the ViT's random patch projection (``--stop-grad-conv1``); ViT backbones only.
        gather_distributed: keys of every rank as negatives (official); ``False``: this rank's keys only.
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8], "predictor_hidden": 16}
    tiny_variants = {"vit": {"backbone": TINY_VIT, "projector": [16, 16, 8], "stop_grad_conv1": True}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        predictor_hidden: int = 4096,
        predictor_last_bn: Optional[bool] = None,
        temperature: float = 1.0,
        tau: float = 0.99,
        final_tau: Optional[float] = 1.0,
        stop_grad_conv1: bool = False,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.is_vit = hasattr(self.backbone, "patch_embed")
        if stop_grad_conv1 and not self.is_vit:
            raise ValueError("stop_grad_conv1 freezes a ViT's patch projection; this backbone is not a ViT")
        if self.is_vit:
            mocov3_vit_init_(self.backbone)
            if stop_grad_conv1:
                self.backbone.patch_embed.proj.requires_grad_(False)
        if projector is None:
            projector = [4096, 4096, 256] if self.is_vit else [4096, 256]
        projector = list(projector)
        last_bn = self.is_vit if predictor_last_bn is None else bool(predictor_last_bn)
        self.projector = MLP([self.num_features, *projector], last_bn=True)
        self.predictor = MLP([projector[-1], predictor_hidden, projector[-1]], last_bn=last_bn)
        self.temperature, self.stop_grad_conv1 = float(temperature), bool(stop_grad_conv1)
        self.gather_distributed = bool(gather_distributed)
        # after the ViT's init: the momentum encoder starts as an exact copy (``param_m.data.copy_(param_b.data)``)
        self.add_teacher("teacher", EMATeacher(tau, final_tau, backbone=self.backbone, projector=self.projector))

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        b, _ = self.check_views(batch.views)
        x1, x2 = batch.views[:, 0], batch.views[:, 1]
        h1, h2 = self.backbone(x1), self.backbone(x2)  # separate passes, as MoCo.forward
        z1, z2 = self.projector(h1), self.projector(h2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.teacher(x1), self.teacher(x2)
        offset = distributed.rank() * b if self.gather_distributed else 0  # labels arange(N) + N · rank
        loss, parts = moco_v3_loss(
            q1,
            q2,
            self.gather(k1.detach()),  # concat_all_gather: keys of every rank, no gradient
            self.gather(k2.detach()),
            temperature=self.temperature,
            offset=offset,
            return_parts=True,
        )
        momentum = self.teacher.tau_at(batch.step, batch.max_steps)  # the rate of this step's EMA update
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (z1.detach(), z2.detach())}
        return {"loss": loss, **parts, "momentum": momentum, "embeddings": embeddings}
