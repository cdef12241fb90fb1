r"""iBOT (Zhou et al., 2022): DINO on the class tokens plus self-distillation of masked patches; and the DINOv2
recipe (Oquab et al., 2023) as a configuration of the same class.

Follows ``bytedance/ibot`` (the official iBOT code): ``main_ibot.py`` (``train_ibot``, ``train_one_epoch``,
``iBOTLoss``), ``loader.py`` (``ImageFolderMask``: :mod:`selfsup.models.blockwise_mask`), ``models/head.py``
(``iBOTHead``: shared MLP, own or shared last layer) and ``models/vision_transformer.py`` (``masked_embed``: a
learned token replacing the patch embedding at masked patches, before the position embedding). The DINOv2
configuration follows ``facebookresearch/dinov2``: ``dinov2/train/ssl_meta_arch.py`` (``forward_backward``),
``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``, ``dinov2/data/{collate,masking}.py``,
``dinov2/utils/param_groups.py`` and ``dinov2/configs/ssl_default_config.yaml``.

Shapes: ``B`` images, ``V`` global crops, ``Vl`` local crops, ``N`` patches of a global crop, ``D`` the ViT width.
Masks ``m [B·V, N]`` (block-wise, from ``batch.generator``) on the global crops; the student embeds the patches
``[B·V, N, D]``, puts the mask token where ``m`` is True, and runs the ViT (``_pos_embed``, ``blocks``, ``norm``):
class tokens ``h [B·V, D]`` and patch tokens ``P [B·V, N, D]``; local crops go through unmasked (class tokens only).
The teacher (EMA of backbone and heads, drop path off) sees the clean global crops. With ``g`` the class head and
``gp`` the patch head::

    L_cls   = dino_loss(g(h ∪ h_local) [B, V+Vl, K], g_ξ(h_ξ) [B, V, K], c, τs, τt(e))  (pairs of different crops)
    L_patch = ibot_patch_loss(gp(P) [B·V, N, Kp], gp_ξ(P_ξ), m, c2, τs, τt2(e))          (same crop, masked patches)
    loss    = λ1 L_cls + λ2 L_patch (+ w_koleo Σ_v koleo_loss(h_v [B, D]))
    c  ← mc·c  + (1 − mc)·mean over the global batch and crops of g_ξ(h_ξ)                (dino_batch_mean)
    c2 ← mc2·c2 + (1 − mc2)·mean over the global batch, crops and all N patches of gp_ξ(P_ξ)

``patch_head``: ``"shared"`` (iBOT ``--shared_head true``, DINOv2 ``separate_head: false``: the class head's
MLP and last layer), ``"last_layer"`` (iBOT ``--shared_head false``: the MLP shared, an own weight-normalised
last layer to ``Kp``) or ``"separate"`` (DINOv2 ``separate_head: true``: a whole second DINOHead).
``centering: "sinkhorn"`` (DINOv2 ``centering: sinkhorn_knopp``) replaces the centred softmaxes by Sinkhorn-Knopp
codes with ``ε = τt``: class tokens with :func:`selfsup.losses.sinkhorn_knopp` over the ``B·V`` rows (the same
maths as DINOv2's ``DINOLoss.sinkhorn_knopp_teacher``: ``N = rows·world``, 3 iterations) and the cross-entropy
over pairs of different crops by :func:`selfsup.losses.swav_loss` (the same pair mean as ``dino_loss``); masked
patches with :func:`selfsup.losses.ibot.masked_sinkhorn_knopp` (the global masked count all-reduced, as
``iBOTPatchLoss.sinkhorn_knopp_teacher``); the centres are then not used. ``koleo_weight`` adds DINOv2's KoLeo on
each global crop's student class tokens (before the head, per rank). ``layerwise_decay`` / ``patch_embed_lr_mult``
give DINOv2's ``get_params_groups_with_decay`` learning-rate multipliers.

Departures: (1) the teacher's patch head is always the EMA of the student's (official iBOT builds the teacher with
``shared_head_teacher=True`` by default, so with ``--shared_head false`` its patch logits come from its class last
layer); (2) in ``centering: "ema"`` the patch centre is iBOT's (all patches); DINOv2's ``centering`` mode averages
the masked patches only; (3) timm ViTs: ``dynamic_img_size`` resamples the position table for local crops (bicubic,
no +0.1 offset), layer scale is timm's ``init_values``, drop path is timm's linear rule (DINOv2 default
``drop_path_uniform: true``), no register tokens; (4) DINOv2's teacher temperature warms up per iteration,
here per epoch as iBOT; DINOv2's "epoch" is 1250 iterations (recipes convert); (5) masks come from the keyed
generator, not Python's global ``random`` in loader workers; (6) with gradient accumulation the centres move once per
micro-batch; (7) the student's head runs on every patch (as iBOT; DINOv2 only on masked ones: same loss).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from selfsup.losses import dino_batch_mean, dino_center_update, dino_loss, sinkhorn_knopp, swav_loss
from selfsup.losses.ibot import ibot_patch_loss, masked_patch_cross_entropy, masked_sinkhorn_knopp
from selfsup.losses.koleo import koleo_loss
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.dino import disable_drop_path
from selfsup.methods.registry import register_method
from selfsup.models import TINY_VIT, BackboneSpec
from selfsup.models.blockwise_mask import BlockwiseMaskGenerator
from selfsup.models.dino_head import DINOHead
from selfsup.schedules import linear_warmup

__all__ = ["IBOT", "vit_tokens"]


def vit_tokens(vit: nn.Module, x: Tensor, mask: Optional[Tensor] = None, mask_token: Optional[Tensor] = None) -> Tensor:
    """A timm ViT's normalised tokens ``[n, prefix + L, D]`` of images ``x [n, C, H, W]``; where ``mask [n, L]`` is
    True the patch embedding is replaced by ``mask_token [D]`` before the position embedding (iBOT ``mask_model``)."""
    t = vit.patch_embed(x)  # [n, L, D], or [n, h, w, D] with dynamic_img_size
    if mask is not None:
        flat = t.reshape(t.shape[0], -1, t.shape[-1])
        if mask.shape != flat.shape[:2]:
            raise ValueError(f"mask must be [n, L] = {tuple(flat.shape[:2])}; got {tuple(mask.shape)}")
        t = torch.where(mask.unsqueeze(-1), mask_token.to(flat.dtype), flat).reshape(t.shape)
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(t)))
    return vit.norm(vit.blocks(t))


@register_method
class IBOT(Method):
    """iBOT (and, configured, DINOv2): class-token DINO + masked-patch distillation with an EMA teacher.

    Args:
        backbone: a timm ViT with a class token (``{name: vit_small, kwargs: {patch_size: 16, drop_path_rate: 0.1,
            dynamic_img_size: true}}``; DINOv2 adds ``init_values: 1.0e-5``).
        out_dim, patch_out_dim: ``K`` / ``Kp`` (iBOT 8192 / 8192; DINOv2 65536, 131072 in the long configs).
        hidden_dim, bottleneck_dim, nlayers, norm_last_layer: the DINOHead (2048, 256, 3, True).
        patch_head: ``"shared"`` | ``"last_layer"`` | ``"separate"`` (module docstring; iBOT default
            ``"last_layer"``, README ``"shared"``).
        momentum_teacher: EMA rate at step 0, cosine to 1 (iBOT 0.996; DINOv2 0.992).
        student_temp, teacher_temp, warmup_teacher_temp: ``τs``, ``τt`` after / at the start of the warm-up (0.1,
            iBOT default 0.04 / README 0.07, 0.04).
        teacher_patch_temp, warmup_teacher_patch_temp: ``τt2`` (0.07, 0.04; DINOv2 uses ``τt`` for both).
        warmup_teacher_temp_epochs: linear warm-up of both temperatures (30).
        center_momentum, center_momentum2: ``mc`` / ``mc2`` (0.9, 0.9).
        lambda1, lambda2: weights of the class and patch losses (1, 1).
        freeze_last_layer: epochs without updates of the last layers (1).
        pred_ratio, pred_ratio_var, mask_probability, pred_aspect_ratio, mask_sampler: the masks
            (:class:`~selfsup.models.blockwise_mask.BlockwiseMaskGenerator`; ``mask_sampler: dinov2`` for DINOv2).
        pred_start_epoch: no masks before this epoch (the patch temperature then stays at its warm-up value).
        centering: ``"ema"`` (iBOT, DINOv2 ``centering``) or ``"sinkhorn"`` (DINOv2 ``sinkhorn_knopp``).
        sinkhorn_iters: Sinkhorn-Knopp iterations (3).
        koleo_weight: DINOv2's KoLeo weight (0.1 there; 0 = off).
        layerwise_decay, patch_embed_lr_mult: DINOv2's lr multipliers (``layerwise_decay^(depth + 1 − layer)``,
            patch embedding × ``patch_embed_lr_mult``); 1, 1 = one group.
    """

    min_views = 2
    tiny = {
        "backbone": {**TINY_VIT, "kwargs": {**TINY_VIT["kwargs"], "dynamic_img_size": True}},  # local crops pass
        "out_dim": 32,
        "patch_out_dim": 32,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
    }
    tiny_variants = {
        "last_layer": {"patch_head": "last_layer", "patch_out_dim": 24, "pred_ratio_var": 0.0},
        "dinov2": {
            "patch_head": "separate",
            "patch_out_dim": 24,
            "centering": "sinkhorn",
            "koleo_weight": 0.1,
            "mask_sampler": "dinov2",
            "mask_probability": 0.5,
            "layerwise_decay": 0.9,
            "patch_embed_lr_mult": 0.2,
        },
    }

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        patch_head: Literal["shared", "last_layer", "separate"] = "last_layer",
        momentum_teacher: float = 0.996,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        freeze_last_layer: int = 1,
        pred_ratio: float = 0.3,
        pred_ratio_var: float = 0.2,
        mask_probability: float = 1.0,
        pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        mask_sampler: Literal["ibot", "dinov2"] = "ibot",
        pred_start_epoch: int = 0,
        centering: Literal["ema", "sinkhorn"] = "ema",
        sinkhorn_iters: int = 3,
        koleo_weight: float = 0.0,
        layerwise_decay: float = 1.0,
        patch_embed_lr_mult: float = 1.0,
    ):
        temps = (student_temp, teacher_temp, warmup_teacher_temp, teacher_patch_temp, warmup_teacher_patch_temp)
        if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"IBOT temperatures must be finite and > 0, got {temps}")
        for name, m in (("momentum_teacher", momentum_teacher), ("center_momentum", center_momentum),
                        ("center_momentum2", center_momentum2)):  # fmt: skip
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"IBOT {name} must be in [0, 1], got {m}")
        if patch_head not in ("shared", "last_layer", "separate"):
            raise ValueError(f"IBOT patch_head must be 'shared', 'last_layer' or 'separate', got {patch_head!r}")
        if patch_head == "shared" and patch_out_dim != out_dim:
            raise ValueError(f"patch_head 'shared' needs patch_out_dim == out_dim, got {patch_out_dim} != {out_dim}")
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"IBOT centering must be 'ema' or 'sinkhorn', got {centering!r}")
        if koleo_weight < 0 or layerwise_decay <= 0 or patch_embed_lr_mult < 0:
            raise ValueError("IBOT koleo_weight, patch_embed_lr_mult must be >= 0 and layerwise_decay > 0")
        super().__init__(backbone)
        vit = self.backbone
        if any(getattr(vit, a, None) is None for a in ("patch_embed", "cls_token", "blocks", "norm")):
            raise ValueError("IBOT needs a timm ViT backbone with a class token (vit_small, vit_base, ...)")
        if getattr(vit, "global_pool", "token") != "token":
            raise ValueError("IBOT distils the class token: use the ViT's default global_pool 'token'")
        self.prefix = int(vit.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(self.num_features))  # iBOT masked_embed (zeros)
        self.head = DINOHead(self.num_features, out_dim, False, norm_last_layer, nlayers, hidden_dim, bottleneck_dim)
        heads: dict[str, nn.Module] = {"head": self.head}
        self.patch_head_kind = patch_head
        if patch_head == "last_layer":
            self.patch_last_layer = weight_norm(nn.Linear(bottleneck_dim, patch_out_dim, bias=False))
            gain = self.patch_last_layer.parametrizations.weight.original0
            with torch.no_grad():
                gain.fill_(1.0)
            gain.requires_grad_(not norm_last_layer)
            heads["patch_last_layer"] = self.patch_last_layer
        elif patch_head == "separate":
            self.patch_head = DINOHead(
                self.num_features, patch_out_dim, False, norm_last_layer, nlayers, hidden_dim, bottleneck_dim
            )
            heads["patch_head"] = self.patch_head
        self.masks = BlockwiseMaskGenerator(
            pred_ratio, pred_ratio_var, mask_probability, tuple(pred_aspect_ratio), mask_sampler
        )
        self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
        self.teacher_patch_temp, self.warmup_teacher_patch_temp = teacher_patch_temp, warmup_teacher_patch_temp
        self.warmup_teacher_temp_epochs, self.pred_start_epoch = int(warmup_teacher_temp_epochs), int(pred_start_epoch)
        self.center_momentum, self.center_momentum2 = float(center_momentum), float(center_momentum2)
        self.lambda1, self.lambda2, self.freeze_last_layer = float(lambda1), float(lambda2), int(freeze_last_layer)
        self.centering, self.sinkhorn_iters, self.koleo_weight = centering, int(sinkhorn_iters), float(koleo_weight)
        self.layerwise_decay, self.patch_embed_lr_mult = float(layerwise_decay), float(patch_embed_lr_mult)
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("center2", torch.zeros(patch_out_dim))
        teacher = self.add_teacher("teacher", EMATeacher(momentum_teacher, 1.0, backbone=self.backbone, **heads))
        disable_drop_path(teacher.backbone)

    # ------------------------------------------------------------------------------------ schedules
    def teacher_temp_at(self, epoch: int) -> float:
        return linear_warmup(self.warmup_teacher_temp, self.teacher_temp, epoch, self.warmup_teacher_temp_epochs)

    def teacher_patch_temp_at(self, epoch: int) -> float:
        """iBOT's ``teacher_temp2_schedule``: held at the warm-up value until ``pred_start_epoch``, then warmed up."""
        if epoch < self.pred_start_epoch:
            return self.warmup_teacher_patch_temp
        e = epoch - self.pred_start_epoch
        return linear_warmup(
            self.warmup_teacher_patch_temp, self.teacher_patch_temp, e, self.warmup_teacher_temp_epochs
        )

    def frozen(self, step: int, epoch: int) -> list[nn.Parameter]:
        """Every last layer (class and patch) while ``epoch < freeze_last_layer`` (``cancel_gradients_last_layer``)."""
        if epoch >= self.freeze_last_layer:
            return []
        layers = [self.head.last_layer, getattr(self, "patch_last_layer", None)]
        layers.append(self.patch_head.last_layer if self.patch_head_kind == "separate" else None)
        return [p for layer in layers if layer is not None for p in layer.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """One group, or DINOv2's layer-wise multipliers: ``layerwise_decay^(depth + 1 − layer)`` (layer 0: patch
        embedding, position table, class and mask tokens; ``i + 1``: block ``i``; ``depth + 1``: the rest) and the
        patch embedding's extra ``patch_embed_lr_mult``."""
        if self.layerwise_decay == 1.0 and self.patch_embed_lr_mult == 1.0:
            return super().param_groups()
        depth, groups = len(self.backbone.blocks), {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            layer = depth + 1
            if name == "mask_token" or any(name.startswith(f"backbone.{k}") for k in ("patch_embed", "pos_embed",
                                                                                      "cls_token", "reg_token")):  # fmt: skip
                layer = 0
            elif name.startswith("backbone.blocks."):
                layer = int(name.split(".")[2]) + 1
            mult = self.layerwise_decay ** (depth + 1 - layer)
            if name.startswith("backbone.patch_embed"):
                mult *= self.patch_embed_lr_mult
            key = f"layer{layer}" + ("_patch_embed" if name.startswith("backbone.patch_embed") else "")
            groups.setdefault(key, {"name": key, "params": [], "lr_mult": mult})["params"].append(p)
        return list(groups.values())

    # ------------------------------------------------------------------------------------ the step
    def _patch_logits(self, tokens: Tensor, teacher: Optional[nn.Module] = None) -> Tensor:
        src = self if teacher is None else teacher
        if self.patch_head_kind == "shared":
            return src.head(tokens)
        if self.patch_head_kind == "last_layer":
            return src.patch_last_layer(src.head.project(tokens))
        return src.patch_head(tokens)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        b, v = self.check_views(batch.views)
        x = batch.views.flatten(0, 1)  # [B·V, C, H, W], sample-major
        p = int(self.backbone.patch_embed.patch_size[0])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        mask = self.masks(b * v, grid, batch.generator).to(x.device)  # [B·V, N]
        if batch.epoch < self.pred_start_epoch:
            mask = torch.zeros_like(mask)
        tokens = vit_tokens(self.backbone, x, mask, self.mask_token)  # [B·V, prefix + N, D]
        h, patches = tokens[:, 0], tokens[:, self.prefix :]
        cls_feats = h
        local = batch.local_views
        if local is not None:
            if local.dim() != 5 or local.shape[0] != b:
                raise ValueError(f"local_views must be [B, Vl, C, h, w] with B = {b}; got {tuple(local.shape)}")
            cls_feats = torch.cat([h, vit_tokens(self.backbone, local.flatten(0, 1))[:, 0]])
        z = self.head.project(cls_feats)
        logits = self.head.last_layer(z)
        student = logits[: b * v].view(b, v, -1)
        if local is not None:
            student = torch.cat([student, logits[b * v :].view(b, local.shape[1], -1)], dim=1)  # [B, V + Vl, K]
        s_patch = self._patch_logits(patches)  # [B·V, N, Kp]
        with torch.no_grad():
            tt = vit_tokens(self.teacher.backbone, x)
            t_cls = self.teacher.head(tt[:, 0]).view(b, v, -1)
            t_patch = self._patch_logits(tt[:, self.prefix :], self.teacher)
        temp, temp2 = self.teacher_temp_at(batch.epoch), self.teacher_patch_temp_at(batch.epoch)
        if self.centering == "ema":
            cls_loss = dino_loss(student, t_cls, self.center, student_temp=self.student_temp, teacher_temp=temp)
            patch_loss = ibot_patch_loss(
                s_patch, t_patch, mask, self.center2, student_temp=self.student_temp, teacher_temp=temp2
            )
            with torch.no_grad():
                self.center.copy_(dino_center_update(self.center, t_cls, self.center_momentum,
                                                     batch_mean=dino_batch_mean(t_cls)))  # fmt: skip
                self.center2.copy_(dino_center_update(self.center2, t_patch, self.center_momentum2,
                                                      batch_mean=dino_batch_mean(t_patch)))  # fmt: skip
        else:
            codes = sinkhorn_knopp(t_cls.flatten(0, 1), epsilon=temp, iters=self.sinkhorn_iters).view_as(t_cls)
            cls_loss = swav_loss(student, codes, temperature=self.student_temp)
            targets = torch.zeros_like(t_patch, dtype=codes.dtype)
            targets[mask] = masked_sinkhorn_knopp(t_patch[mask], teacher_temp=temp2, iters=self.sinkhorn_iters)
            patch_loss = masked_patch_cross_entropy(s_patch, targets, mask, student_temp=self.student_temp)
        loss = self.lambda1 * cls_loss + self.lambda2 * patch_loss
        out: dict[str, Any] = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(hv) for hv in h.view(b, v, -1).unbind(1))
            loss = loss + self.koleo_weight * koleo
            out["koleo_loss"] = koleo.detach()
        embeddings = {"backbone": h.detach().view(b, v, -1), "head": z[: b * v].detach().view(b, v, -1)}
        return {"loss": loss, **out, "teacher_temp": temp, "teacher_patch_temp": temp2,
                "mask_ratio": mask.float().mean().detach(), "embeddings": embeddings}  # fmt: skip
