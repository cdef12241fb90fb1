r"""DINO (Caron et al., 2021): self-distillation with no labels, a centred and sharpened EMA teacher.

Follows ``facebookresearch/dino``: ``main_dino.py`` (``train_dino``, ``train_one_epoch``, ``DINOLoss``),
``utils.py`` (``MultiCropWrapper``, ``cosine_scheduler``, ``clip_gradients``, ``cancel_gradients_last_layer``,
``get_params_groups``) and ``vision_transformer.py`` (``DINOHead``, :mod:`selfsup.models.dino_head`).

Student ``s = head(backbone(x))`` on every crop: the ``V`` global views ``batch.views`` and the ``Vl`` local views
``batch.local_views`` (multi-crop, ``data.local_views``; ``None`` = global only). As ``MultiCropWrapper``, the
backbone runs once per resolution group (global, then local; one pass when both have the same size) and the head
once on the concatenated features (so a BN head normalises over every crop). Teacher ``t = head_ξ(backbone_ξ(x))``,
an :class:`~selfsup.methods.base.EMATeacher` of backbone and head, on the global views only, without gradient; its
copy has drop path off (the official teacher is built without ``drop_path_rate``). With ``c`` the centre::

    loss = mean_{i < V, v ≠ i} mean_b  −Σ_k softmax((t_{b,i} − c)/τt)_k · log softmax(s_{b,v}/τs)_k     (dino_loss)
    c ← m·c + (1 − m)·mean over the global batch and teacher views of t                   (after the loss)
    ξ ← τ ξ + (1 − τ) θ after each optimiser step,  τ: cosine from momentum_teacher to 1 over the run
    τt(epoch) = linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[epoch], then teacher_temp

The centre is a buffer (``center``, in the checkpoint); its batch mean is all-reduced (:func:`dino_batch_mean`), so
it is equal on every rank. The loss is per sample (no gather): DDP's averaging gives the global-batch gradient, as
the official code. ``frozen`` drops the gradients of the head's last layer while ``epoch < freeze_last_layer``
(``cancel_gradients_last_layer``, after clipping as the official). Logged: ``teacher_temp``, ``teacher_entropy``
(mean entropy of the centred, sharpened teacher rows; ``log K`` = uniform) and ``teacher_batch_entropy`` (entropy of
their batch mean; small = one dimension dominates).

What the engine carries from the official optimisation (recipes): AdamW, lr ``0.0005 × B/256`` (``scale_lr:
linear``), 10 warm-up epochs, cosine to ``min_lr`` (``final_lr_ratio = min_lr / peak lr``), weight decay cosine
``0.04 → 0.4`` (``optim.weight_decay_end``), per-parameter clipping at 3.0 (``optim.clip_grad_per_param``), biases
and 1-D parameters without weight decay.

Departures: (1) the engine also keeps what a backbone's ``no_weight_decay()`` names (a ViT's ``pos_embed`` and
``cls_token``) out of weight decay, where ``get_params_groups`` decays every parameter of more than one dimension
(``optim.exclude_1d: false`` would decay biases and norms too, also unlike the official); (2) ViTs are timm's, whose
``dynamic_img_size`` resamples the position embedding for the 96 px local crops (bicubic) where DINO's
``interpolate_pos_encoding`` scales it with a +0.1 offset; (3) the lr warm-up's first step is not 0 and the minimum
lr is a ratio of the peak; (4) with gradient accumulation the centre moves once per micro-batch (the official code
has none). The EMA covers every head parameter, the frozen gains included (as the official ``zip`` over
``student.parameters()``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from selfsup.losses import dino_batch_mean, dino_center_update, dino_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import TINY_RESNET, TINY_VIT, BackboneSpec
from selfsup.models.dino_head import DINOHead
from selfsup.schedules import linear_warmup

__all__ = ["DINO", "disable_drop_path"]


def disable_drop_path(module: nn.Module) -> int:
    """Set the drop probability of every stochastic-depth layer under ``module`` (timm ``DropPath``, torchvision
    ``StochasticDepth``) to 0; returns how many it changed."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    n = 0
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob, n = 0.0, n + 1
        elif isinstance(m, StochasticDepth):
            m.p, n = 0.0, n + 1
    return n


@register_method
class DINO(Method):
    """DINO.

    Args:
        backbone: backbone spec ``{name, kwargs}`` (ViT-S/16: ``{name: vit_small, kwargs: {drop_path_rate: 0.1,
            dynamic_img_size: true}}`` so that the 96 px local crops pass).
        out_dim: ``K`` (official 65536).
        hidden_dim, bottleneck_dim, nlayers: the head's MLP (official 2048, 256, 3).
        use_bn_in_head: BatchNorm in the head's MLP (official default False).
        norm_last_layer: freeze the last layer's weight-norm gains at 1 (official True).
        momentum_teacher: EMA rate at step 0, cosine to 1 over the run (official 0.996).
        student_temp: ``τs`` (0.1).
        teacher_temp: ``τt`` after the warm-up (official 0.04; 0.07 in the README's longer runs).
        warmup_teacher_temp: ``τt`` at epoch 0 (0.04).
        warmup_teacher_temp_epochs: epochs of the linear ``τt`` warm-up (official default 0; 30 in the README).
        center_momentum: ``m`` of the centre's EMA (0.9).
        freeze_last_layer: epochs during which the head's last layer gets no update (1).
    """

    min_views = 2
    tiny = {"backbone": TINY_RESNET, "out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}
    tiny_variants = {
        "vit": {"backbone": TINY_VIT},
        "bn_head": {"use_bn_in_head": True, "norm_last_layer": False},
    }

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        momentum_teacher: float = 0.996,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
    ):
        for name, t in (
            ("student_temp", student_temp),
            ("teacher_temp", teacher_temp),
            ("warmup_teacher_temp", warmup_teacher_temp),
        ):
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ValueError(f"DINO {name} must be finite and > 0, got {t!r}")
        for name, m in (("momentum_teacher", momentum_teacher), ("center_momentum", center_momentum)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"DINO {name} must be in [0, 1], got {m}")
        for name, n in (
            ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs),
            ("freeze_last_layer", freeze_last_layer),
        ):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"DINO {name} must be an integer number of epochs >= 0, got {n!r}")
        super().__init__(backbone)
        self.head = DINOHead(
            self.num_features, out_dim, use_bn_in_head, norm_last_layer, nlayers, hidden_dim, bottleneck_dim
        )
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = (
            float(warmup_teacher_temp),
            warmup_teacher_temp_epochs,
        )
        self.center_momentum, self.freeze_last_layer = float(center_momentum), freeze_last_layer
        self.register_buffer("center", torch.zeros(out_dim))
        teacher = self.add_teacher(
            "teacher", EMATeacher(momentum_teacher, final_tau=1.0, backbone=self.backbone, head=self.head)
        )
        disable_drop_path(teacher.backbone)

    def teacher_temp_at(self, epoch: int) -> float:
        """``τt`` of ``epoch`` (the official ``teacher_temp_schedule[epoch]``)."""
        return linear_warmup(self.warmup_teacher_temp, self.teacher_temp, epoch, self.warmup_teacher_temp_epochs)

    def frozen(self, step: int, epoch: int) -> list[nn.Parameter]:
        """The head's last layer (gains and directions) while ``epoch < freeze_last_layer``."""
        return list(self.head.last_layer.parameters()) if epoch < self.freeze_last_layer else []

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        b, v = self.check_views(batch.views)
        x = batch.views.flatten(0, 1)  # [B·V, C, H, W], sample-major
        local = batch.local_views
        if local is None:
            h = self.backbone(x)
        else:
            if local.dim() != 5 or local.shape[0] != b:
                raise ValueError(f"local_views must be [B, Vl, C, h, w] with B = {b}; got {tuple(local.shape)}")
            xl = local.flatten(0, 1)
            if xl.shape[-2:] == x.shape[-2:]:  # one resolution: one backbone pass, as MultiCropWrapper
                h = self.backbone(torch.cat([x, xl]))
            else:
                h = torch.cat([self.backbone(x), self.backbone(xl)])
        z = self.head.project(h)  # [B·V + B·Vl, bottleneck], the head once on every crop
        logits = self.head.last_layer(z)
        student = logits[: b * v].view(b, v, -1)
        if local is not None:
            student = torch.cat([student, logits[b * v :].view(b, local.shape[1], -1)], dim=1)  # [B, V + Vl, K]
        with torch.no_grad():
            teacher = self.teacher(x).view(b, v, -1)  # global views only
        temp = self.teacher_temp_at(batch.epoch)
        loss = dino_loss(student, teacher, self.center, student_temp=self.student_temp, teacher_temp=temp)
        with torch.no_grad():
            p = torch.softmax((teacher.float() - self.center) / temp, dim=-1).flatten(0, 1)  # [B·V, K]
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
            mean_p = p.mean(0)
            batch_entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
            new_center = dino_center_update(
                self.center, teacher, self.center_momentum, batch_mean=dino_batch_mean(teacher)
            )
            self.center.copy_(new_center)
        embeddings = {
            "backbone": h[: b * v].detach().view(b, v, -1),
            "head": z[: b * v].detach().view(b, v, -1),
        }
        return {
            "loss": loss,
            "teacher_temp": temp,
            "teacher_entropy": entropy,
            "teacher_batch_entropy": batch_entropy,
            "embeddings": embeddings,
        }
