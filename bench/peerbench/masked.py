"""The masked ViT methods written with lightly: MAE, iBOT, I-JEPA (lightly's ``examples/pytorch/mae.py``,
``ibot.py``, ``ijepa.py``, configured with the recipe's values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import Ctx, Peer, Unsupported, ema_hook, frozen_copy, momentum_schedule, named, register
from .transforms import aug_notes, dino_transform, normalize_kwargs, photometric_notes


def _masked_vit(vit: nn.Module, **kw) -> nn.Module:
    """lightly's MaskedVisionTransformerTIMM around the recipe's ViT, keeping its initialisation and positions."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    return MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip", **kw)


def _vit_checks(vit: nn.Module) -> None:
    if not hasattr(vit, "patch_embed"):
        raise Unsupported("a ViT method on a backbone that is not a timm ViT")


@register("mae")
def build_mae(ctx: Ctx) -> Peer:
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
    from lightly.transforms import MAETransform

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if len(ctx.pipelines) != 1:
        raise Unsupported("MAETransform makes one view")
    aug = ctx.pipelines[0]
    dec = a["decoder"] or {}
    width, depth, heads = int(dec.get("width", 512)), int(dec.get("depth", 8)), int(dec.get("heads", 16))
    patch = int(vit.patch_embed.patch_size[0])
    backbone = _masked_vit(vit)
    seq_len = backbone.sequence_length
    prefix = int(vit.num_prefix_tokens)
    if prefix != 1:
        raise Unsupported("lightly's MAE recipe indexes patches after one class token")
    decoder_embed = nn.Linear(vit.embed_dim, width)
    decoder = MaskedVisionTransformerDecoderTIMM(
        num_patches=vit.patch_embed.num_patches,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_prefix_tokens=prefix,
        mlp_ratio=float(dec.get("mlp_ratio", 4.0)),
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
    )
    prediction_head = nn.Linear(width, patch**2 * 3)
    model = nn.ModuleDict(
        {"backbone": backbone, "decoder_embed": decoder_embed, "decoder": decoder, "prediction_head": prediction_head}
    )
    mask_ratio, norm_pix = float(a["mask_ratio"]), bool(a["norm_pix_loss"])
    # timm with global_pool avg moves the final LayerNorm after the pooling (fc_norm): its encode() then ends without
    # one; selfsup applies fc_norm token by token before the decoder, and so does this loop (the same network)
    token_norm = vit.fc_norm if isinstance(vit.norm, nn.Identity) and not isinstance(vit.fc_norm, nn.Identity) else None
    criterion = nn.MSELoss()
    transform = MAETransform(input_size=aug.crop_size, min_scale=aug.scale[0], normalize=normalize_kwargs(aug))

    def loss(batch, step, epoch):
        images = batch[0][0]  # one view
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=mask_ratio, device=images.device)
        features = backbone.encode(images=images, idx_keep=idx_keep)
        if token_norm is not None:
            features = token_norm(features)
        x_decode = decoder_embed(features)
        x_masked = x_decode.new_zeros(b, seq_len, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_pred = prediction_head(utils.get_at_index(decoder(x_masked, idx_mask=idx_mask), idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
        if norm_pix:
            target = utils.normalize_mean_var(target, dim=-1)
        return criterion(x_pred, target)

    params = named(
        ("backbone", backbone), ("decoder_embed", decoder_embed), ("decoder", decoder), ("head", prediction_head)
    )
    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": params}],
        [
            "MaskedVisionTransformerTIMM",
            "MaskedVisionTransformerDecoderTIMM",
            "random_token_mask / patchify",
            "normalize_mean_var (norm-pix targets)",
            "MAETransform",
        ],
        [
            "decoder, its embedding and prediction layers initialised by lightly's modules",
            "the recipe's ViT pools the mean of its tokens (timm's fc_norm after the pooling): the loop applies fc_norm "
            "to the encoder tokens before the decoder, as selfsup does (lightly's encode() ends without a norm there)",
            *aug_notes([aug], "bicubic", "views", fixed_flip=0.5),
            *photometric_notes([aug], "views"),
        ],
    )


@register("ibot")
def build_ibot(ctx: Ctx) -> Peer:
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models import utils
    from lightly.models.modules import DINOProjectionHead
    from lightly.utils.scheduler import linear_warmup_schedule

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if a["patch_head"] != "shared":
        raise Unsupported(f"patch_head {a['patch_head']!r}: lightly's iBOT example shares one DINOProjectionHead")
    if a["nlayers"] != 3:
        raise Unsupported(f"head nlayers {a['nlayers']}: lightly's DINOProjectionHead has 3 layers")
    if a["centering"] != "ema" or a["koleo_weight"] or a["layerwise_decay"] != 1.0 or a["patch_embed_lr_mult"] != 1.0:
        raise Unsupported("the DINOv2 options (Sinkhorn centring, KoLeo, layer-wise lr)")
    if a["pred_start_epoch"]:
        raise Unsupported("pred_start_epoch > 0")
    student = _masked_vit(vit, antialias=False)
    teacher = frozen_copy(student)
    teacher.eval()  # lightly's example: freeze_eval_module (no dropout / drop path in the teacher)
    make_head = lambda: DINOProjectionHead(
        vit.embed_dim,
        a["hidden_dim"],
        a["bottleneck_dim"],
        a["out_dim"],
        freeze_last_layer=a["freeze_last_layer"],
        norm_last_layer=a["norm_last_layer"],
    )
    head = make_head()
    teacher_head = frozen_copy(head, make_head)
    dino_criterion = DINOLoss(
        output_dim=a["out_dim"],
        teacher_temp=a["teacher_temp"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum"],
    )
    ibot_criterion = IBOTPatchLoss(
        output_dim=a["patch_out_dim"],
        teacher_temp=a["teacher_patch_temp"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum2"],
    )
    model = nn.ModuleDict(
        {"student": student, "head": head, "teacher": teacher, "teacher_head": teacher_head, "dino": dino_criterion}
    )
    model["ibot"] = ibot_criterion
    momentum = momentum_schedule(a["momentum_teacher"], 1.0, ctx.total_steps)
    lo, hi = a["pred_ratio"] - a["pred_ratio_var"], a["pred_ratio"] + a["pred_ratio_var"]
    aspect = tuple(a["pred_aspect_ratio"])
    gh, gw = (int(s) for s in vit.patch_embed.grid_size)
    min_block = (min(gh, gw) // 3) ** 2
    warm = int(a["warmup_teacher_temp_epochs"])
    lam1, lam2 = float(a["lambda1"]), float(a["lambda2"])
    transform, tname, notes = dino_transform(ctx, ibot=True)

    def temps(epoch):
        if not warm:
            return a["teacher_temp"], a["teacher_patch_temp"]
        return (
            linear_warmup_schedule(epoch, warm, a["warmup_teacher_temp"], a["teacher_temp"]),
            linear_warmup_schedule(epoch, warm, a["warmup_teacher_patch_temp"], a["teacher_patch_temp"]),
        )

    def loss(batch, step, epoch):
        views = batch[0]
        global_views = torch.cat(views[:2])
        b2 = len(global_views)
        mask = global_views.new_zeros((b2, student.sequence_length), dtype=torch.bool)
        block_mask = utils.random_block_mask(
            size=(b2, gh, gw),
            batch_mask_ratio=a["mask_probability"],
            min_image_mask_ratio=lo,
            max_image_mask_ratio=hi,
            min_num_masks_per_block=min_block,
            min_block_aspect_ratio=aspect[0],
            max_block_aspect_ratio=aspect[1],
            device=mask.device,
        )
        mask[:, student.vit.num_prefix_tokens :] = block_mask.flatten(start_dim=1)
        with torch.no_grad():
            t_feats = teacher.encode(global_views)
            t_cls = teacher_head(t_feats[:, 0])
            t_masked = teacher_head(t_feats[mask])
        s_feats = student.encode(global_views, mask=mask)
        s_cls = head(s_feats[:, 0])
        s_masked = head(s_feats[mask])
        n_views = 2
        if len(views) > 2:
            s_cls = torch.cat([s_cls, head(student.encode(torch.cat(views[2:]))[:, 0])])
            n_views = len(views)
        temp, temp2 = temps(epoch)
        cls_loss = dino_criterion(teacher_out=t_cls.chunk(2), student_out=s_cls.chunk(n_views), teacher_temp=temp)
        patch_loss = ibot_criterion(t_masked, s_masked, mask=block_mask, teacher_temp=temp2)
        return lam1 * cls_loss + lam2 * patch_loss

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("student", student), ("head", head))}],
        [
            "MaskedVisionTransformerTIMM",
            "DINOProjectionHead (shared by class and patch tokens)",
            "DINOLoss",
            "IBOTPatchLoss",
            "random_block_mask",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "masks: lightly's random_block_mask (DINOv2's sampler: the images' mask ratios spread evenly over "
            f"[{lo:.2f}, {hi:.2f}]), selfsup iBOT's (a ratio drawn per image from U({lo:.2f}, {hi:.2f}))",
            "patch centre: IBOTPatchLoss updates it from the masked teacher tokens; iBOT (selfsup) from all of them",
            "the teacher head starts as a copy of the student head (as the official code and selfsup); lightly's "
            "example builds a second DINOProjectionHead and its student head without the frozen gains",
            *notes,
        ],
        after_backward=lambda step, epoch: head.cancel_last_layer_gradients(epoch),
        after_step=ema_hook(momentum, (student, teacher), (head, teacher_head)),
    )


@register("ijepa")
def build_ijepa(ctx: Ctx) -> Peer:
    from lightly.data import IJEPAMaskCollator
    from lightly.models import utils
    from lightly.models.modules import IJEPAPredictorTIMM
    from lightly.transforms.ijepa_transform import IJEPATransform

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if int(vit.num_prefix_tokens) != 0:
        raise Unsupported("lightly's I-JEPA masks index patch tokens of a ViT without a class token")
    if len(ctx.pipelines) != 1:
        raise Unsupported("IJEPATransform makes one view")
    aug = ctx.pipelines[0]
    patch = int(vit.patch_embed.patch_size[0])
    pred_cfg = a["predictor"] or {}
    heads = pred_cfg.get("heads") or int(vit.blocks[0].attn.num_heads)
    encoder = _masked_vit(vit)
    target_encoder = frozen_copy(encoder)
    predictor = IJEPAPredictorTIMM(
        num_patches=vit.patch_embed.num_patches,
        depth=int(pred_cfg.get("depth", 6)),
        mlp_dim=vit.embed_dim,
        predictor_embed_dim=int(pred_cfg.get("width", 384)),
        num_heads=int(heads),
        mlp_ratio=float(pred_cfg.get("mlp_ratio", 4.0)),
    )
    model = nn.ModuleDict({"encoder": encoder, "predictor": predictor, "target_encoder": target_encoder})
    collator = IJEPAMaskCollator(
        input_size=aug.crop_size,
        patch_size=patch,
        enc_mask_scale=tuple(a["enc_mask_scale"]),
        pred_mask_scale=tuple(a["pred_mask_scale"]),
        aspect_ratio=tuple(a["aspect_ratio"]),
        nenc=int(a["num_enc_masks"]),
        npred=int(a["num_pred_masks"]),
        min_keep=int(a["min_keep"]),
        allow_overlap=bool(a["allow_overlap"]),
    )
    transform = IJEPATransform(input_size=aug.crop_size, min_scale=aug.scale[0], normalize=normalize_kwargs(aug))
    m0, m1, total = float(a["momentum"]), a.get("final_momentum"), ctx.total_steps

    def loss(batch, step, epoch):
        udata, masks_enc, masks_pred = batch
        imgs = udata[0]
        with torch.no_grad():
            h = target_encoder.encode(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = utils.apply_masks(h, masks_pred)
            h = utils.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = torch.cat([encoder.encode(imgs, idx_keep=m) for m in masks_enc])
        z = predictor(z, masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h)

    def after_step(step):  # the example's linear momentum_scheduler, after the optimiser step
        m = m0 if m1 is None else m0 + min(step, total) * (m1 - m0) / total
        with torch.no_grad():
            for pq, pk in zip(encoder.parameters(), target_encoder.parameters()):
                pk.data.mul_(m).add_((1.0 - m) * pq.detach().data)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("encoder", encoder), ("predictor", predictor))}],
        ["MaskedVisionTransformerTIMM", "IJEPAPredictorTIMM", "IJEPAMaskCollator", "apply_masks", "IJEPATransform"],
        [
            "masks drawn in the DataLoader workers by IJEPAMaskCollator (the official collator's scheme); selfsup "
            "draws the same multi-block masks in the training step",
            "predictor initialised by lightly's module",
            *aug_notes([aug], "bicubic", "views", fixed_flip=0.5),
            *photometric_notes([aug], "views"),
        ],
        collate_fn=collator,
        after_step=after_step,
    )
