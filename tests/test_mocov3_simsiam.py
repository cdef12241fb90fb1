"""MoCo v3 and SimSiam at the method level: the losses against their formulas on outputs recomputed here from the
methods' own modules (MoCo v3 at a perturbed student, where the momentum encoder differs), the gradient paths (only
through the queries / the predictions), the official momentum schedule, the ViT's frozen patch projection and fixed
sin-cos position embedding, the official heads, SimSiam's fixed-lr predictor group, and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_cases import make_batch, random_views
from torch import nn

import selfsup.distributed
import selfsup.methods.moco_v3  # registers MoCoV3 until selfsup/methods/__init__.py imports it
import selfsup.methods.simsiam  # registers SimSiam until selfsup/methods/__init__.py imports it
from selfsup.engine.optim import build_optimizer, build_scheduler, method_param_groups
from selfsup.losses import moco_v3_loss, simsiam_loss
from selfsup.methods import get_method
from selfsup.methods.moco_v3 import MoCoV3, mocov3_sincos_pos_embed
from selfsup.methods.simsiam import SimSiam
from selfsup.models import MLP, TINY_RESNET, TINY_VIT

B = 8
STEP, MAX_STEPS = 3, 10
VARIANTS = {"resnet": {}, "vit": MoCoV3.tiny_variants["vit"]}


def _moco(variant: str = "resnet", **overrides) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(**{**MoCoV3.tiny, **VARIANTS[variant], **overrides}).train()


def _simsiam(**overrides) -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(**{**SimSiam.tiny, **overrides}).train()


def _batch(seed: int = 1):
    return make_batch(random_views(MoCoV3, b=B, seed=seed), step=STEP, max_steps=MAX_STEPS, seed=0)


@torch.no_grad()
def _perturb(modules, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))


def _grads(method: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    method.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------------- MoCo v3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mocov3_loss_is_the_formula_with_teacher_keys_at_a_perturbed_student(one_thread, variant):
    """Loss and student gradient = moco_v3_loss(queries of the student, keys of the momentum encoder as constants),
    with teacher != student; the same formula with the student's own projections as keys differs."""
    method = _moco(variant)
    _perturb([method.backbone, method.projector, method.predictor], seed=5)
    batch = _batch()
    x1, x2 = batch.views[:, 0], batch.views[:, 1]
    out = method.training_loss(batch)
    got = _grads(method, out["loss"])

    q1 = method.predictor(method.projector(method.backbone(x1)))
    q2 = method.predictor(method.projector(method.backbone(x2)))
    with torch.no_grad():
        k1 = method.teacher.projector(method.teacher.backbone(x1))
        k2 = method.teacher.projector(method.teacher.backbone(x2))
    ref = moco_v3_loss(q1, q2, k1, k2, temperature=method.temperature, offset=0)
    torch.testing.assert_close(out["loss"].detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(got, _grads(method, ref))

    # gradient only through the queries: nothing reaches the momentum encoder, which holds no optimiser group
    assert not any(k.startswith("teacher.") for k in got)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    grouped = {id(p) for g in method.param_groups() for p in g["params"]}
    assert grouped.isdisjoint(id(p) for p in method.teacher.parameters())

    # keys from the (perturbed) student instead of the teacher: a different loss
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    wrong = moco_v3_loss(q1, q2, z1, z2, temperature=method.temperature)
    assert abs(wrong.item() - ref.item()) > 1e-3
    assert set(out) == {"loss", "ctr_q1_k2", "ctr_q2_k1", "momentum", "embeddings"}
    torch.testing.assert_close(out["ctr_q1_k2"] + out["ctr_q2_k1"], out["loss"].detach())


def test_mocov3_keys_are_gathered_without_gradient_and_labels_offset_by_rank(one_thread, monkeypatch):
    """Rank 1 of 2 (gather emulated as [t; t]): keys of both ranks, positives at rows N + i, the gather sees detached
    keys only; with gather_distributed off, the local keys and offset 0."""
    seen = []

    def fake_gather(t, group=None, grad="all"):
        seen.append(t.requires_grad)
        return torch.cat([t, t + 0.5])  # rank 0's rows differ from this rank's

    monkeypatch.setattr(selfsup.distributed, "gather", fake_gather)
    monkeypatch.setattr(selfsup.distributed, "rank", lambda group=None: 1)
    method = _moco()
    batch = _batch()
    x1, x2 = batch.views[:, 0], batch.views[:, 1]
    loss = method.training_loss(batch)["loss"]
    assert seen == [False, False]
    q1 = method.predictor(method.projector(method.backbone(x1)))
    q2 = method.predictor(method.projector(method.backbone(x2)))
    with torch.no_grad():
        k1, k2 = method.teacher(x1), method.teacher(x2)
    ref = moco_v3_loss(q1, q2, torch.cat([k1, k1 + 0.5]), torch.cat([k2, k2 + 0.5]), temperature=1.0, offset=B)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)

    local = _moco(gather_distributed=False)
    loss_local = local.training_loss(batch)["loss"]
    torch.testing.assert_close(loss_local.detach(), moco_v3_loss(q1, q2, k1, k2, temperature=1.0).detach())


def _official_momentum(epoch: float, epochs: int, moco_m: float) -> float:
    """main_moco.py adjust_moco_momentum, verbatim."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


def test_mocov3_momentum_is_the_official_cosine_per_iteration():
    """tau_at(k, K) = adjust_moco_momentum(epoch + i / iters_per_epoch) with k = epoch·ipe + i, K = epochs·ipe:
    m0 at k = 0, 1 − (1 − m0)/2 at K/2, 1 at K; the EMA step after optimiser step k uses it; constant without cos."""
    epochs, ipe, m0 = 10, 7, 0.99
    total = epochs * ipe
    teacher = _moco(tau=m0).teacher
    assert teacher.tau_at(0, total) == pytest.approx(m0, abs=1e-12)
    assert teacher.tau_at(total // 2, total) == pytest.approx(1 - (1 - m0) / 2, abs=1e-12)
    assert teacher.tau_at(total, total) == pytest.approx(1.0, abs=1e-12)
    for k in range(total + 1):
        official = _official_momentum(k // ipe + (k % ipe) / ipe, epochs, m0)
        assert teacher.tau_at(k, total) == pytest.approx(official, abs=1e-12)
    assert _moco(tau=0.996, final_tau=None).teacher.tau_at(total // 2, total) == 0.996

    method = _moco(tau=m0)
    _perturb([method.backbone, method.projector], seed=3)
    old = [p.detach().clone() for p in method.teacher.parameters()]
    method.on_train_step_end(STEP, MAX_STEPS)
    tau = _official_momentum(STEP, MAX_STEPS, m0)
    student = list(method.backbone.parameters()) + list(method.projector.parameters())
    for pt, po, ps in zip(method.teacher.parameters(), old, student):
        torch.testing.assert_close(pt, tau * po + (1 - tau) * ps.detach())
    assert method.training_loss(_batch())["momentum"] == pytest.approx(tau)


def _official_sincos(h: int, w: int, embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py VisionTransformerMoCo.build_2d_sincos_position_embedding, verbatim (torch.meshgrid's default ij)."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)


def test_mocov3_vit_freezes_the_patch_projection_and_fixes_the_sincos_table(one_thread):
    method = _moco("vit")
    vit, proj = method.backbone, method.backbone.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed.detach(), _official_sincos(4, 4, 32), rtol=0, atol=1e-6)
    torch.testing.assert_close(mocov3_sincos_pos_embed(384, 14)[None], _official_sincos(14, 14, 384), rtol=0, atol=1e-5)
    # vits.py's init: patch projection Xavier-uniform on [D, 3 p^2] with zero bias, cls token N(0, 1e-6^2)
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))
    assert proj.weight.abs().max().item() <= bound and proj.bias.abs().max().item() == 0.0
    assert vit.cls_token.abs().max().item() < 1e-5
    qkv = vit.blocks[0].attn.qkv
    assert qkv.weight.abs().max().item() <= math.sqrt(6.0 / (32 + 32)) and qkv.bias.abs().max().item() == 0.0

    weight0 = proj.weight.detach().clone()
    out = method.training_loss(_batch())
    grads = _grads(method, out["loss"])
    assert "backbone.patch_embed.proj.weight" not in grads and "backbone.patch_embed.proj.bias" not in grads
    assert "backbone.blocks.0.attn.qkv.weight" in grads
    groups = method_param_groups(method, lr=0.1, weight_decay=0.1, exclude=False)
    opt = build_optimizer(groups, "adamw", lr=0.1, weight_decay=0.1)
    frozen = {id(proj.weight), id(proj.bias), id(vit.pos_embed)}
    assert frozen.isdisjoint(id(p) for g in opt.param_groups for p in g["params"])
    opt.step()
    method.on_train_step_end(0, MAX_STEPS)
    assert torch.equal(proj.weight, weight0) and torch.equal(method.teacher.backbone.patch_embed.proj.weight, weight0)

    trainable = _moco("vit", stop_grad_conv1=False).backbone.patch_embed.proj
    assert trainable.weight.requires_grad and trainable.bias.requires_grad


def _linears_and_bns(mlp: nn.Module) -> tuple[list[nn.Linear], list[nn.BatchNorm1d]]:
    return [m for m in mlp if isinstance(m, nn.Linear)], [m for m in mlp if isinstance(m, nn.BatchNorm1d)]


@pytest.mark.parametrize("variant, layers, pred_last_bn", [("resnet", 2, False), ("vit", 3, True)])
def test_mocov3_default_heads_are_the_official_builders(variant, layers, pred_last_bn):
    """_build_mlp: no Linear bias anywhere, projector ending in BN(affine=False); ResNet: 2-layer projector and a
    predictor without last BN (MoCo_ResNet), ViT: 3-layer projector and a predictor with it (MoCo_ViT)."""
    backbone = TINY_RESNET if variant == "resnet" else TINY_VIT
    method = MoCoV3(backbone=backbone)
    lin, bns = _linears_and_bns(method.projector)
    assert [m.out_features for m in lin] == [4096] * (layers - 1) + [256]
    assert all(m.bias is None for m in lin) and not bns[-1].affine and isinstance(method.projector[-1], nn.BatchNorm1d)
    lin, bns = _linears_and_bns(method.predictor)
    assert [(m.in_features, m.out_features) for m in lin] == [(256, 4096), (4096, 256)]
    assert all(m.bias is None for m in lin)
    assert isinstance(method.predictor[-1], nn.BatchNorm1d) == pred_last_bn
    assert method.temperature == 1.0 and method.teacher.tau == 0.99 and method.teacher.final_tau == 1.0


def test_mocov3_errors():
    with pytest.raises(ValueError, match="stop_grad_conv1 freezes a ViT"):
        MoCoV3(backbone=TINY_RESNET, stop_grad_conv1=True, projector=[8, 4], predictor_hidden=8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MoCoV3(**MoCoV3.tiny, temperature=0.0)
    with pytest.raises(ValueError, match="MoCoV3 takes exactly 2 views per image, got 3"):
        _moco().training_loss(make_batch(torch.randn(4, 3, 3, 32, 32)))
    assert get_method("MoCoV3") is MoCoV3 and get_method("SimSiam") is SimSiam


# ------------------------------------------------------------------------------------------------------- SimSiam


def test_simsiam_loss_is_the_formula_with_stopped_projections(one_thread):
    """Loss and gradient = simsiam_loss(p1, p2, sg(z1), sg(z2)) on outputs recomputed from the method's modules; the
    same formula without the stop-gradient has another gradient (it would reach the projector through z)."""
    method = _simsiam()
    batch = make_batch(random_views(SimSiam, b=B, seed=1), step=STEP, max_steps=MAX_STEPS, seed=0)
    x1, x2 = batch.views[:, 0], batch.views[:, 1]
    out = method.training_loss(batch)
    got = _grads(method, out["loss"])

    z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    p1, p2 = method.predictor(z1), method.predictor(z2)
    ref = simsiam_loss(p1, p2, z1.detach(), z2.detach())
    by_hand = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
    torch.testing.assert_close(out["loss"].detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_hand.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(got, _grads(method, ref))

    z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    p1, p2 = method.predictor(z1), method.predictor(z2)
    no_stop = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    assert _max_diff(got, _grads(method, no_stop)) > 1e-4

    assert set(out) == {"loss", "z_std", "embeddings"}
    assert 0.0 < out["z_std"].item() < 1.0


def test_simsiam_heads_are_the_official_builder():
    """builder.py: projector F -> F -> F -> dim, no Linear bias (the official frozen one is removed by the BN), output
    BN(affine=False); predictor dim -> pred_dim (BN, ReLU) -> dim with a bias."""
    method = SimSiam(backbone=TINY_RESNET, dim=32, pred_dim=8)
    f = method.num_features
    lin, bns = _linears_and_bns(method.projector)
    assert [(m.in_features, m.out_features) for m in lin] == [(f, f), (f, f), (f, 32)]
    assert all(m.bias is None for m in lin)
    assert isinstance(method.projector[-1], nn.BatchNorm1d) and not method.projector[-1].affine
    assert [m.affine for m in bns] == [True, True, False]
    lin, _ = _linears_and_bns(method.predictor)
    assert [(m.in_features, m.out_features) for m in lin] == [(32, 8), (8, 32)]
    assert lin[0].bias is None and lin[1].bias is not None
    assert isinstance(method.predictor, MLP)
    with pytest.raises(ValueError, match="must be positive"):
        SimSiam(backbone=TINY_RESNET, dim=0)
    with pytest.raises(ValueError, match="SimSiam takes exactly 2 views per image, got 1"):
        _simsiam().training_loss(make_batch(torch.randn(4, 1, 3, 32, 32)))


def test_simsiam_predictor_group_is_marked_fixed_lr():
    """--fix-pred-lr: [encoder = backbone + projector, predictor with fixed_lr]; without it one plain group."""
    method = _simsiam()
    groups = method.param_groups()
    assert [g["name"] for g in groups] == ["encoder", "predictor"]
    assert groups[1].get("fixed_lr") is True and "fixed_lr" not in groups[0]

    def ids(params) -> set[int]:
        return {id(p) for p in params}

    assert ids(groups[1]["params"]) == ids(method.predictor.parameters())
    assert ids(groups[0]["params"]) == ids(method.backbone.parameters()) | ids(method.projector.parameters())
    plain = _simsiam(fix_pred_lr=False).param_groups()
    assert len(plain) == 1 and "fixed_lr" not in plain[0]
    assert len(plain[0]["params"]) == sum(len(g["params"]) for g in groups)


def test_simsiam_fixed_lr_predictor_keeps_the_peak_lr_through_the_schedule():
    """The official adjust_learning_rate: the fix_lr group stays at init_lr while the encoder's lr follows the cosine
    (and solo-learn's static_lr keeps it at the peak through the warm-up too)."""
    method = _simsiam()
    peak, total, warmup = 0.1, 20, 4
    groups = method_param_groups(method, lr=peak, weight_decay=1e-4, exclude=False)
    optimizer = build_optimizer(groups, "sgd", lr=peak, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total, warmup)
    predictor = {id(p) for p in method.predictor.parameters()}
    for step in range(total):
        for group in optimizer.param_groups:
            if {id(p) for p in group["params"]} <= predictor:
                assert group["lr"] == pytest.approx(peak), f"predictor lr at step {step}"
            elif step in (0, total // 2, total - 1):
                assert group["lr"] < peak, f"encoder lr at step {step}"
        optimizer.step()
        scheduler.step()
