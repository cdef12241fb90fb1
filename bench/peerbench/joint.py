"""The 2-view joint-embedding methods written with lightly: SimCLR, BYOL, MMCR, Barlow Twins, VICReg, MoCo v3,
SimSiam (lightly's ``examples/pytorch/<method>.py``, configured with the recipe's values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import Ctx, Peer, Unsupported, ema_hook, equal_hidden, frozen_copy, momentum_schedule, named, register
from .transforms import aug_notes, crop_max_notes, two_view_transform, view_kwargs


@register("simclr")
def build_simclr(ctx: Ctx) -> Peer:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    proj = list(ctx.args["projector"])
    equal_hidden(proj, "projector")
    backbone = ctx.backbone
    head = SimCLRProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj), batch_norm=True)
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    criterion = NTXentLoss(temperature=ctx.args["temperature"])
    transform, tname, notes = two_view_transform(ctx)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head))}],
        ["SimCLRProjectionHead", "NTXentLoss", tname],
        [
            f"SimCLRProjectionHead(batch_norm=True) ends with BatchNorm1d({proj[-1]}) after its output layer; the "
            "recipe's projector ends with the Linear",
            "one backbone pass per view (BatchNorm statistics per view), as lightly's example; selfsup: one pass "
            "over both views",
            *notes,
        ],
    )


@register("byol")
def build_byol(ctx: Ctx) -> Peer:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    proj, a = list(ctx.args["projector"]), ctx.args
    if len(proj) != 2:
        raise Unsupported(f"projector {proj}: lightly's BYOLProjectionHead has one hidden layer")
    backbone = ctx.backbone
    head = BYOLProjectionHead(ctx.feat, proj[0], proj[1])
    pred = BYOLPredictionHead(proj[1], a["predictor_hidden"], proj[1])
    backbone_m, head_m = frozen_copy(backbone), frozen_copy(head)
    model = nn.ModuleDict(
        {"backbone": backbone, "head": head, "pred": pred, "backbone_m": backbone_m, "head_m": head_m}
    )
    criterion = NegativeCosineSimilarity()
    momentum = momentum_schedule(a["tau"], a.get("final_tau", 1.0), ctx.total_steps)
    transform, tname, notes = two_view_transform(ctx)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        p0, p1 = pred(head(backbone(x0))), pred(head(backbone(x1)))
        with torch.no_grad():
            z0, z1 = head_m(backbone_m(x0)), head_m(backbone_m(x1))
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head), ("pred", pred))}],
        [
            "BYOLProjectionHead",
            "BYOLPredictionHead",
            "NegativeCosineSimilarity",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "loss scale: lightly's example takes 0.5·(−cos − cos), selfsup Σ(2 − 2·cos): 4x the gradient (Adam is "
            "invariant to it up to eps and the coupled weight decay)",
            "EMA step at the start of each iteration with that step's momentum (lightly's example); selfsup after the "
            "optimiser step: one step apart",
            *notes,
        ],
        before_step=ema_hook(momentum, (backbone, backbone_m), (head, head_m)),
    )


@register("mmcr")
def build_mmcr(ctx: Ctx) -> Peer:
    from lightly.loss import MMCRLoss
    from lightly.models.modules import MMCRProjectionHead
    from lightly.transforms import MMCRTransform

    proj, a = list(ctx.args["projector"]), ctx.args
    equal_hidden(proj, "projector")
    if len(ctx.pipelines) != 1:
        raise Unsupported("MMCRTransform makes k views of one pipeline; the recipe's pipelines are a pair")
    aug, views = ctx.pipelines[0], int(ctx.data.views)
    if aug.solarize_p > 0:
        raise Unsupported("the recipe solarises its views; MMCRTransform does not")
    backbone = ctx.backbone
    head = MMCRProjectionHead(
        ctx.feat, proj[0], proj[-1], num_layers=len(proj) - 1, use_bias=bool(a["projector_last_bias"])
    )
    modules = {"backbone": backbone, "head": head}
    tau = a.get("momentum_tau")
    if tau is not None:
        modules.update(backbone_m=frozen_copy(backbone), head_m=frozen_copy(head))
        ema_pairs = ((backbone, modules["backbone_m"]), (head, modules["head_m"]))
    model = nn.ModuleDict(modules)
    criterion = MMCRLoss(lmda=a["lmbda"])
    transform = MMCRTransform(k=views, **view_kwargs(aug))

    def loss(batch, step, epoch):
        z = torch.stack([head(backbone(x)) for x in batch[0]], dim=1)  # [B, k, D], one pass per view
        z = F.normalize(z, dim=-1)
        if tau is None:
            return criterion(z, z)  # no momentum branch: the centroid of the online views, as the recipe
        with torch.no_grad():
            zm = torch.stack([model["head_m"](model["backbone_m"](x)) for x in batch[0]], dim=1)
        return criterion(z, F.normalize(zm, dim=-1))

    differences = [
        "embeddings L2-normalised before MMCRLoss (added: lightly's MMCRLoss and example never normalise, which "
        "leaves the nuclear-norm objective unbounded; the official MMCR and selfsup normalise)",
        f"one backbone pass per view ({views} passes of {ctx.data.batch_size} images, BatchNorm statistics per view), "
        "as lightly's example; selfsup: one pass over all views",
        *aug_notes([aug], "bilinear", "views"),
        *crop_max_notes([aug], "views"),
    ]
    if tau is None:
        differences.insert(1, "no momentum branch (as the recipe): MMCRLoss gets the online embeddings twice")
    if a["lmbda"]:
        differences.append("local term: MMCRLoss over the doubled view stack weighs it sqrt(2)x the recipe's")
    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head))}],
        ["MMCRProjectionHead", "MMCRLoss", "MMCRTransform"] + (["update_momentum"] if tau is not None else []),
        differences,
        **({} if tau is None else {"before_step": ema_hook(lambda step: tau, *ema_pairs)}),
    )


@register("barlow")
def build_barlow(ctx: Ctx) -> Peer:
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    proj, a = list(ctx.args["projector"]), ctx.args
    if len(proj) != 3 or proj[0] != proj[1]:
        raise Unsupported(f"projector {proj}: lightly's BarlowTwinsProjectionHead has two equal hidden layers")
    backbone = ctx.backbone
    head = BarlowTwinsProjectionHead(ctx.feat, proj[0], proj[2])
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    criterion = BarlowTwinsLoss(lambda_param=a["lambd"])
    scale = float(a["scale_loss"])
    transform, tname, notes = two_view_transform(ctx)
    params = named(("backbone", backbone), ("head", head))

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return scale * criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [
            {"name": "weights", "params": [(n, p) for n, p in params if p.ndim > 1]},
            {"name": "biases", "params": [(n, p) for n, p in params if p.ndim <= 1], "lr_mult": a["bias_lr_mult"]},
        ],
        ["BarlowTwinsProjectionHead", "BarlowTwinsLoss", tname],
        [
            "BarlowTwinsProjectionHead's output layer has a bias (no effect: the loss batch-normalises the outputs)",
            *notes,
        ],
    )


@register("vicreg")
def build_vicreg(ctx: Ctx) -> Peer:
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.transforms import VICRegTransform

    proj, a = list(ctx.args["projector"]), ctx.args
    equal_hidden(proj, "projector")
    if len(ctx.pipelines) != 1:
        raise Unsupported("VICRegTransform is symmetric; the recipe's pipelines are a pair")
    aug = ctx.pipelines[0]
    backbone = ctx.backbone
    head = VICRegProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj))
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    # lightly's variance term is the official ½(var_a + var_b), as selfsup's: the recipe's std_coeff carries over
    criterion = VICRegLoss(lambda_param=a["sim_coeff"], mu_param=a["std_coeff"], nu_param=a["cov_coeff"])
    kw = view_kwargs(aug)
    transform = VICRegTransform(**kw, solarize_prob=aug.solarize_p)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head))}],
        ["VICRegProjectionHead", "VICRegLoss", "VICRegTransform"],
        [
            "VICRegProjectionHead's output layer has a bias (the recipe's has none)",
            *aug_notes([aug], "bilinear", "views"),
            *crop_max_notes([aug], "views"),
        ],
    )


@register("mocov3")
def build_mocov3(ctx: Ctx) -> Peer:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead

    proj, a = list(ctx.args["projector"] or []), ctx.args
    if not proj:
        raise Unsupported("the recipe leaves the projector to the backbone family; give it explicitly")
    equal_hidden(proj, "projector")
    if hasattr(ctx.backbone, "patch_embed"):
        raise Unsupported("MoCo v3's ViT recipe (fixed sin-cos positions, frozen patch projection) has no lightly part")
    backbone = ctx.backbone
    head = MoCoProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj), batch_norm=True)
    pred = MoCoProjectionHead(proj[-1], a["predictor_hidden"], proj[-1], num_layers=2, batch_norm=True)
    backbone_m, head_m = frozen_copy(backbone), frozen_copy(head)
    model = nn.ModuleDict(
        {"backbone": backbone, "head": head, "pred": pred, "backbone_m": backbone_m, "head_m": head_m}
    )
    criterion = NTXentLoss(temperature=a["temperature"], memory_bank_size=0)
    momentum = momentum_schedule(a["tau"], a.get("final_tau"), ctx.total_steps)
    transform, tname, notes = two_view_transform(ctx)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        q0, q1 = pred(head(backbone(x0))), pred(head(backbone(x1)))
        with torch.no_grad():
            k0, k1 = head_m(backbone_m(x0)), head_m(backbone_m(x1))
        return criterion(q0, k1) + criterion(q1, k0)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": named(("backbone", backbone), ("head", head), ("pred", pred))}],
        [
            "MoCoProjectionHead(batch_norm=True) as projector and predictor",
            "NTXentLoss(memory_bank_size=0)",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "loss: lightly has no MoCo v3 loss; NTXentLoss without memory bank is SimCLR's NT-Xent on (query, key): "
            "its negatives include the other queries and it adds key-anchored rows, where MoCo v3 (selfsup) takes "
            "2τ·CE(q·kᵀ/τ) over the batch's keys only",
            "MoCoProjectionHead(batch_norm=True) ends both MLPs with an affine BatchNorm1d; the recipe's projector "
            f"ends with BatchNorm1d(affine=False) and its predictor with the Linear (predictor_last_bn "
            f"{a.get('predictor_last_bn')}, the official ResNet builder)",
            "EMA step at the start of each iteration (lightly's example); selfsup after the optimiser step",
            *notes,
        ],
        before_step=ema_hook(momentum, (backbone, backbone_m), (head, head_m)),
    )


@register("simsiam")
def build_simsiam(ctx: Ctx) -> Peer:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform

    a = ctx.args
    if len(ctx.pipelines) != 1:
        raise Unsupported("SimSiamTransform is symmetric; the recipe's pipelines are a pair")
    aug = ctx.pipelines[0]
    if aug.solarize_p > 0:
        raise Unsupported("the recipe solarises its views; SimSiamTransform does not")
    hidden = ctx.feat if a.get("hidden_dim") is None else int(a["hidden_dim"])
    backbone = ctx.backbone
    head = SimSiamProjectionHead(ctx.feat, hidden, a["dim"])
    pred = SimSiamPredictionHead(a["dim"], a["pred_dim"], a["dim"])
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head, "prediction_head": pred})
    criterion = NegativeCosineSimilarity()
    transform = SimSiamTransform(**view_kwargs(aug))

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        z0, z1 = head(backbone(x0)), head(backbone(x1))
        p0, p1 = pred(z0), pred(z1)
        return 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))

    encoder = named(("backbone", backbone), ("head", head))
    groups = [{"name": "encoder", "params": encoder}, {"name": "predictor", "params": named(("pred", pred))}]
    if a.get("fix_pred_lr"):
        groups[1]["fixed_lr"] = True
    else:
        groups = [{"name": "all", "params": encoder + groups[1]["params"]}]
    return Peer(
        model,
        transform,
        loss,
        groups,
        ["SimSiamProjectionHead", "SimSiamPredictionHead", "NegativeCosineSimilarity", "SimSiamTransform"],
        [*aug_notes([aug], "bilinear", "views"), *crop_max_notes([aug], "views")],
    )
