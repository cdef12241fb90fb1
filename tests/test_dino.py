"""DINO: the head (weight norm, init), the loss recomputed from the method's own modules at a state where teacher and
student differ (multi-crop and global only), the teacher temperature by epoch, the centre buffer, the frozen last
layer (and the engine dropping its gradients), the teacher's drop path, and argument errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from method_cases import make_batch

import selfsup.methods.dino  # noqa: F401  (registers DINO until selfsup/methods/__init__.py imports it)
from selfsup.engine.config import OptimConfig
from selfsup.engine.module import SelfSupModule
from selfsup.engine.optim import method_param_groups
from selfsup.losses import dino_loss
from selfsup.methods.dino import DINO
from selfsup.models import TINY_RESNET, TINY_VIT
from selfsup.models.dino_head import DINOHead

B, K = 6, 32


def _dino(**kw) -> DINO:
    torch.manual_seed(0)
    return DINO(**{**DINO.tiny, **kw}).train()


def _views(b=B, v=2, size=32, seed=0) -> torch.Tensor:
    return torch.randn(b, v, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batch(views, local=None, step=0, steps_per_epoch=5):
    batch = make_batch(views, step=step, max_steps=50, steps_per_epoch=steps_per_epoch)
    batch.local_views = local
    return batch


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------------ the head
def test_head_shapes_init_and_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=40, hidden_dim=128, bottleneck_dim=8)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(64, 128), (128, 128), (128, 8)]
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    for m in lin:  # trunc_normal std .02, zero biases
        assert torch.count_nonzero(m.bias) == 0 and m.weight.abs().max() <= 2.0
    assert lin[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    x = torch.randn(5, 64)
    z = head.project(x)
    assert z.shape == (5, 8) and torch.allclose(z.norm(dim=-1), torch.ones(5))
    assert head(x).shape == (5, 40)
    # last layer: gains g = 1 and frozen, every row of the effective weight a unit vector, no bias
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (40, 1) and torch.equal(g, torch.ones(40, 1)) and not g.requires_grad
    assert v.requires_grad and head.last_layer.bias is None
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)
    # a training step moves v but the rows stay unit vectors
    head(x).pow(2).sum().backward()
    assert g.grad is None and v.grad is not None
    torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0).step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))


def test_head_options():
    free = DINOHead(16, out_dim=10, norm_last_layer=False, use_bn=True, hidden_dim=12, bottleneck_dim=4)
    g = free.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.equal(g, torch.ones(10, 1))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in free.mlp) == 2
    one = DINOHead(16, out_dim=10, nlayers=1, bottleneck_dim=4)
    assert isinstance(one.mlp, torch.nn.Linear) and one(torch.randn(3, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match="out_dim must be a positive integer"):
        DINOHead(16, out_dim=0)


# ------------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("use_bn", [False, True])
def test_loss_equals_dino_loss_of_outputs_recomputed_from_the_modules(use_bn):
    """Multi-crop at a state where teacher != student and the centre is not 0: the student on every crop (the
    backbone once per resolution group, the head once on all crops), the teacher on the global crops only."""
    method = _dino(use_bn_in_head=use_bn, norm_last_layer=not use_bn, warmup_teacher_temp_epochs=3, teacher_temp=0.07)
    _perturb(method.backbone, seed=1)  # the student moved away from the teacher
    _perturb(method.head, seed=2)
    center = 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(3))
    method.center.copy_(center)
    views, local = _views(), _views(v=3, size=16, seed=4)
    batch = _batch(views, local, step=5)  # epoch 1: tau_t = linspace(0.04, 0.07, 3)[1] = 0.055
    out = method.training_loss(batch)
    out["loss"].backward()
    got_grad = method.head.mlp[0].weight.grad.clone()
    assert out["teacher_temp"] == pytest.approx(0.055)

    method.zero_grad()
    hg = method.backbone(views.flatten(0, 1))
    hl = method.backbone(local.flatten(0, 1))
    s = method.head(torch.cat([hg, hl]))
    student = torch.cat([s[: B * 2].view(B, 2, K), s[B * 2 :].view(B, 3, K)], dim=1)
    with torch.no_grad():
        t = method.teacher.head(method.teacher.backbone(views.flatten(0, 1))).view(B, 2, K)
    expected = dino_loss(student, t, center, student_temp=0.1, teacher_temp=0.055)
    torch.testing.assert_close(out["loss"], expected)
    expected.backward()
    torch.testing.assert_close(got_grad, method.head.mlp[0].weight.grad)
    # the teacher matters here: the student's own global outputs as targets give another loss
    assert abs(dino_loss(student, student[:, :2].detach(), center, teacher_temp=0.055) - expected) > 1e-3
    # the centre moved after the loss: m c + (1 - m) mean_{b, i} t
    torch.testing.assert_close(method.center, 0.9 * center + 0.1 * t.mean(dim=(0, 1)))
    # logged entropies: 0 <= H(rows) <= H(batch mean) <= log K (concavity)
    h, hb = out["teacher_entropy"].item(), out["teacher_batch_entropy"].item()
    assert 0 <= h <= hb + 1e-6 <= math.log(K) + 1e-5
    assert out["embeddings"]["backbone"].shape == (B, 2, method.num_features)
    assert out["embeddings"]["head"].shape == (B, 2, 16) and not out["embeddings"]["head"].requires_grad


def test_global_views_only():
    method = _dino()
    _perturb(method.teacher, seed=5)
    views = _views(v=3)
    out = method.training_loss(_batch(views))  # local_views None: Vs = Vt = 3
    with torch.no_grad():
        s = method.head(method.backbone(views.flatten(0, 1))).view(B, 3, K)
        t = method.teacher(views.flatten(0, 1)).view(B, 3, K)
    torch.testing.assert_close(out["loss"], dino_loss(s, t, torch.zeros(K), student_temp=0.1, teacher_temp=0.04))
    with pytest.raises(ValueError, match="DINO needs at least 2 views"):
        method.training_loss(_batch(_views(v=1)))


def test_local_views_of_the_global_size_share_one_backbone_pass():
    method = _dino()
    calls = []
    method.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    method.training_loss(_batch(_views(), _views(v=2, seed=1)))
    assert calls == [(B * 4, 3, 32, 32)]
    calls.clear()
    method.training_loss(_batch(_views(), _views(v=2, size=16, seed=1)))
    assert calls == [(B * 2, 3, 32, 32), (B * 2, 3, 16, 16)]


def test_vit_multicrop_with_dynamic_img_size():
    vit = {"name": TINY_VIT["name"], "kwargs": {**TINY_VIT["kwargs"], "dynamic_img_size": True}}
    method = _dino(backbone=vit)
    out = method.training_loss(_batch(_views(), _views(v=4, size=16, seed=1)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and method.backbone.pos_embed.grad is not None


# -------------------------------------------------------------------------------------------- schedules, state
def test_teacher_temperature_warms_up_by_epoch_as_the_official_schedule():
    method = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    official = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(7) * 0.07))  # DINOLoss.teacher_temp_schedule
    assert [method.teacher_temp_at(e) for e in range(10)] == pytest.approx(official.tolist())
    for step, epoch in ((0, 0), (4, 0), (5, 1), (12, 2), (40, 8)):  # read from batch.epoch (5 steps per epoch)
        out = method.training_loss(_batch(_views(), step=step))
        assert out["teacher_temp"] == pytest.approx(official[epoch])
    assert _dino(teacher_temp=0.05).teacher_temp_at(0) == 0.05  # no warm-up epochs (official default 0)


def test_teacher_momentum_is_the_official_cosine():
    method = _dino(momentum_teacher=0.996)
    n = 100
    for it in (0, 10, 50, 99):  # utils.cosine_scheduler(0.996, 1, epochs, niter_per_ep)[it]
        official = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * it / n))
        assert method.teacher.tau_at(it, n) == pytest.approx(official)
    assert method.teacher.names == ["backbone", "head"]


def test_center_is_a_buffer_in_the_state_dict():
    method = _dino()
    assert "center" in dict(method.named_buffers()) and "center" not in dict(method.named_parameters())
    assert torch.equal(method.state_dict()["center"], torch.zeros(K))
    views = _views()
    method.training_loss(_batch(views))
    t = method.teacher(views.flatten(0, 1)).view(B, 2, K)  # the teacher's output of that step (no update since)
    torch.testing.assert_close(method.center, 0.1 * t.mean(dim=(0, 1)))
    fresh = _dino()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.center, method.center)


def test_the_teacher_copy_has_no_drop_path():
    vit = {"name": TINY_VIT["name"], "kwargs": {**TINY_VIT["kwargs"], "depth": 2, "drop_path_rate": 0.5}}
    method = _dino(backbone=vit)
    from timm.layers import DropPath

    student = [m.drop_prob for m in method.backbone.modules() if isinstance(m, DropPath)]
    teacher = [m.drop_prob for m in method.teacher.backbone.modules() if isinstance(m, DropPath)]
    assert len(student) == len(teacher) > 0 and max(student) > 0 and teacher == [0.0] * len(teacher)
    x = _views().flatten(0, 1)
    with torch.no_grad():
        assert torch.equal(method.teacher(x), method.teacher(x))  # deterministic in train mode
        assert not torch.equal(method.backbone(x), method.backbone(x))  # the student drops paths


# --------------------------------------------------------------------------------------------- frozen last layer
def test_frozen_last_layer_by_epoch():
    method = _dino(freeze_last_layer=2)
    last = list(method.head.last_layer.parameters())
    assert [id(p) for p in method.frozen(0, 0)] == [id(p) for p in last] and len(last) == 2
    assert len(method.frozen(17, 1)) == 2 and method.frozen(20, 2) == []
    assert _dino(freeze_last_layer=0).frozen(0, 0) == []


def test_engine_drops_the_last_layer_gradients_in_the_first_epoch():
    """A real optimiser step through SelfSupModule.on_before_optimizer_step (step 0, epoch 0): the last layer is
    unchanged, everything else moved; in epoch 1 the last layer moves."""
    method = _dino(norm_last_layer=False)  # the gains are trainable too: both must stay
    module = SelfSupModule(method, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04))
    groups = method_param_groups(method, lr=1e-2, weight_decay=0.04, exclude=True)
    opt = torch.optim.AdamW(groups)
    last = {n: p.detach().clone() for n, p in method.head.last_layer.named_parameters()}
    first = method.head.mlp[0].weight.detach().clone()
    method.training_loss(_batch(_views()))["loss"].backward()
    module.on_before_optimizer_step(opt)
    assert all(p.grad is None for p in method.head.last_layer.parameters())
    opt.step()
    for n, p in method.head.last_layer.named_parameters():
        assert torch.equal(p, last[n]), n
    assert not torch.equal(method.head.mlp[0].weight, first)

    module._trainer = SimpleNamespace(current_epoch=1, global_step=7)  # epoch 1: no longer frozen
    opt.zero_grad()
    method.training_loss(_batch(_views(seed=1), step=7))["loss"].backward()
    module.on_before_optimizer_step(opt)
    opt.step()
    assert all(not torch.equal(p, last[n]) for n, p in method.head.last_layer.named_parameters())


def test_param_groups_hold_neither_the_teacher_nor_frozen_gains():
    method = _dino()
    grouped = {id(p) for g in method.param_groups() for p in g["params"]}
    assert grouped.isdisjoint(id(p) for p in method.teacher.parameters())
    assert id(method.head.last_layer.parametrizations.weight.original0) not in grouped
    free = _dino(norm_last_layer=False)
    assert id(free.head.last_layer.parametrizations.weight.original0) in {
        id(p) for g in free.param_groups() for p in g["params"]
    }


def test_bad_arguments():
    for kw, match in (
        ({"teacher_temp": 0.0}, "teacher_temp must be finite and > 0"),
        ({"student_temp": -1.0}, "student_temp must be finite and > 0"),
        ({"center_momentum": 1.5}, r"center_momentum must be in \[0, 1\]"),
        ({"momentum_teacher": -0.1}, r"momentum_teacher must be in \[0, 1\]"),
        ({"freeze_last_layer": -1}, "freeze_last_layer must be an integer"),
        ({"warmup_teacher_temp_epochs": 1.5}, "warmup_teacher_temp_epochs must be an integer"),
        ({"out_dim": 0}, "out_dim must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            DINO(**{**DINO.tiny, **kw})
    method = _dino()
    with pytest.raises(ValueError, match=r"local_views must be \[B, Vl, C, h, w\]"):
        method.training_loss(_batch(_views(), _views(b=B - 1, size=16)))


def test_tiny_configs_are_small_and_resnet_default_is_tiny_resnet():
    assert DINO.tiny["backbone"] == TINY_RESNET
    for overrides in [{}, *DINO.tiny_variants.values()]:
        m = _dino(**overrides)
        assert sum(p.numel() for p in m.parameters()) < 500_000
        out = m.training_loss(_batch(_views()))
        assert torch.isfinite(out["loss"])
