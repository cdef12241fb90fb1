"""The multi-crop methods written with lightly: DINO and SwAV (lightly's ``examples/pytorch/dino.py`` and
``swav.py``, configured with the recipe's values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import Ctx, Peer, Unsupported, ema_hook, frozen_copy, momentum_schedule, named, register
from .transforms import aug_notes, dino_transform, jitter_kwargs, normalize_kwargs


@register("dino")
def build_dino(ctx: Ctx) -> Peer:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead

    a = ctx.args
    if a["nlayers"] != 3:
        raise Unsupported(f"head nlayers {a['nlayers']}: lightly's DINOProjectionHead has 3 layers")
    backbone = ctx.backbone
    make_head = lambda: DINOProjectionHead(
        ctx.feat,
        a["hidden_dim"],
        a["bottleneck_dim"],
        a["out_dim"],
        batch_norm=a["use_bn_in_head"],
        freeze_last_layer=a["freeze_last_layer"],
        norm_last_layer=a["norm_last_layer"],
    )
    head = make_head()
    teacher_backbone, teacher_head = frozen_copy(backbone), frozen_copy(head, make_head)
    model = nn.ModuleDict(
        {"student": backbone, "head": head, "teacher": teacher_backbone, "teacher_head": teacher_head}
    )
    criterion = DINOLoss(
        output_dim=a["out_dim"],
        warmup_teacher_temp=a["warmup_teacher_temp"],
        teacher_temp=a["teacher_temp"],
        warmup_teacher_temp_epochs=a["warmup_teacher_temp_epochs"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum"],
    )
    model["criterion"] = criterion  # its centre moves with the model (as the example's criterion.to(device))
    momentum = momentum_schedule(a["momentum_teacher"], 1.0, ctx.total_steps)
    transform, tname, notes = dino_transform(ctx)

    def loss(batch, step, epoch):
        views = batch[0]
        with torch.no_grad():
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
        student_out = [head(backbone(v)) for v in views]
        return criterion(teacher_out, student_out, epoch=epoch)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("student", backbone), ("head", head))}],
        ["DINOProjectionHead", "DINOLoss", "update_momentum", "cosine_schedule", tname],
        [
            "the teacher head starts as a copy of the student head (as the official code and selfsup); lightly's "
            "example builds a second, independently initialised DINOProjectionHead",
            "one backbone and head pass per crop (BatchNorm statistics per crop), as lightly's example; selfsup: one "
            "backbone pass per resolution and the head once over every crop",
            *notes,
        ],
        after_backward=lambda step, epoch: head.cancel_last_layer_gradients(epoch),
        after_step=ema_hook(momentum, (backbone, teacher_backbone), (head, teacher_head)),
    )


@register("swav")
def build_swav(ctx: Ctx) -> Peer:
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import SwaVTransform

    a = ctx.args
    views = int(ctx.data.views)
    if list(a["crops_for_assign"]) != list(range(views)):
        raise Unsupported(f"crops_for_assign {a['crops_for_assign']}: SwaVLoss assigns codes to every global crop")
    if a["queue_length"]:
        raise Unsupported("a SwAV queue (lightly's example keeps one outside the loss); the cpu-small recipe has none")
    if not a["hidden_dim"]:
        raise Unsupported("a one-layer SwAV head: lightly's SwaVProjectionHead has a hidden layer")
    if len(ctx.pipelines) != 1 or (ctx.local and len(ctx.local) != 1):
        raise Unsupported("SwaVTransform applies one photometric pipeline to every crop")
    g, loc = ctx.pipelines[0], ctx.local[0] if ctx.local else None
    photometric = ("jitter", "jitter_p", "gray_p", "blur_p", "blur_sigma", "flip_p", "solarize_p", "mean", "std")
    if loc is not None and any(getattr(g, k) != getattr(loc, k) for k in photometric):
        raise Unsupported("SwaVTransform applies one photometric pipeline to every crop; the recipe's differ")
    if g.solarize_p > 0:
        raise Unsupported("the recipe solarises; SwaVTransform does not")
    backbone = ctx.backbone
    head = SwaVProjectionHead(ctx.feat, a["hidden_dim"], a["feat_dim"])
    prototypes = SwaVPrototypes(
        a["feat_dim"], n_prototypes=a["nmb_prototypes"], n_steps_frozen_prototypes=a["freeze_prototypes_niters"]
    )
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head, "prototypes": prototypes})
    criterion = SwaVLoss(
        temperature=a["temperature"], sinkhorn_iterations=a["sinkhorn_iterations"], sinkhorn_epsilon=a["epsilon"]
    )
    nloc = int(ctx.data.local_views or 0)
    crop = dict(
        crop_sizes=(g.crop_size, loc.crop_size) if loc else (g.crop_size,),
        crop_counts=(views, nloc) if loc else (views,),
        crop_min_scales=(g.scale[0], loc.scale[0]) if loc else (g.scale[0],),
        crop_max_scales=(g.scale[1], loc.scale[1]) if loc else (g.scale[1],),
    )
    transform = SwaVTransform(
        **crop,
        hf_prob=g.flip_p,
        random_gray_scale=g.gray_p,
        gaussian_blur=g.blur_p,
        sigmas=tuple(g.blur_sigma),
        normalize=normalize_kwargs(g),
        **jitter_kwargs(g),
    )

    def loss(batch, step, epoch):
        prototypes.normalize()
        outs = [prototypes(F.normalize(head(backbone(x)), dim=1, p=2), step) for x in batch[0]]
        return criterion(outs[:views], outs[views:])

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head), ("prototypes", prototypes))}],
        ["SwaVProjectionHead", "SwaVPrototypes(n_steps_frozen_prototypes)", "SwaVLoss", "SwaVTransform"],
        [
            "SwaVPrototypes' layer has a bias (the official and the recipe's prototypes have none)",
            "one backbone and head pass per crop (BatchNorm statistics per crop), as lightly's example; selfsup: one "
            "backbone pass per resolution and the head once over every crop",
            "Sinkhorn: lightly's exp(scores/ε) without the max shift (the same codes while it does not overflow)",
            *aug_notes([g] + ([loc] if loc else []), "bilinear", "crops"),
        ],
    )
