"""MEC, SimCLR and BYOL: losses on the methods' own outputs, teachers (EMA, no gradient), schedules, per-view BN."""

from __future__ import annotations

import copy

import pytest
import torch
from method_cases import make_batch

from selfsup.engine.optim import method_param_groups
from selfsup.losses import byol_loss, info_nce_loss, mec_loss
from selfsup.methods import BYOL, MEC, SimCLR

TINY = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}
B, DIM = 6, 16


def _views(b=B, v=2, seed=0, size=16):
    x = torch.randn(b, v, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, 1:] = 2 * x[:, 1:] + 1  # the two views have different statistics (per-view BN is then visible)
    return x


def _batch(views, step=0, max_steps=20, steps_per_epoch=5):
    return make_batch(views, step=step, max_steps=max_steps, steps_per_epoch=steps_per_epoch)


def _mec(**kw):
    torch.manual_seed(0)
    return MEC(backbone=TINY, dim=DIM, pred_dim=8, warmup_epochs=2, **kw).train()


def _bn_stats(module):
    return [
        t.clone()
        for m in module.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


# ---------------------------------------------------------------------------------------------------- MEC
def test_mec_architecture_follows_off_mec():
    """Projector F-F-F-d (no hidden biases, BN+ReLU, last linear then BN(affine=False)); predictor d-p-d with bias."""
    m = _mec()
    f = m.num_features
    lin = [x for x in m.projector if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features, x.bias is not None) for x in lin] == [
        (f, f, False),
        (f, f, False),
        (f, DIM, False),
    ]
    assert isinstance(m.projector[-1], torch.nn.BatchNorm1d) and not m.projector[-1].affine
    lin = [x for x in m.predictor if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features, x.bias is not None) for x in lin] == [(DIM, 8, False), (8, DIM, True)]
    assert m.teacher.names == ["backbone", "projector"]  # no predictor in the teacher
    groups = method_param_groups(m, lr=0.1, weight_decay=1e-5, exclude=False)
    assert [g["name"] for g in groups] == ["all"]  # the seed trains every parameter in one SGD group


def test_mec_loss_equals_mec_loss_of_its_own_outputs():
    m = _mec()
    views = _views()
    out = m.training_loss(_batch(views, step=3))
    x1, x2 = views[:, 0], views[:, 1]
    z1, z2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    with torch.no_grad():
        p1, p2 = m.teacher(x1), m.teacher(x2)
    lamda_inv = 8 * 24 + (24 - 8 * 24) * 3 / 9  # m = 6, d = 16, eps_sq = 64: 24; warm-up 10 steps, step 3
    expected, parts = mec_loss(z1, z2, p1, p2, eps_sq=64.0, lamda_inv=lamda_inv, return_parts=True)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["coding_length"], parts["coding_length"])
    assert out["lamda_inv"].item() == pytest.approx(lamda_inv)
    assert not torch.allclose(out["loss"], mec_loss(z1, z2, p1, p2))  # λ inside T follows the warm-up
    assert 1.0 <= out["effective_rank"].item() <= B and not out["effective_rank"].requires_grad


def test_mec_lamda_inv_warms_up_per_step_from_8x():
    """m = 6 rows, d = 16, eps_sq = 64: lamda_inv = 24; 2 warm-up epochs x 5 steps: 8x at step 0, 1x at step 9."""
    m = _mec()
    views = _views()
    got = {s: m.training_loss(_batch(views, step=s))["lamda_inv"].item() for s in (0, 4, 9, 10, 19)}
    assert got == pytest.approx({0: 192.0, 4: 192.0 - 168.0 * 4 / 9, 9: 24.0, 10: 24.0, 19: 24.0})
    seed = MEC(backbone=TINY, pred_dim=8)  # the seed's d = 2048, eps_sq = 64, 10 epochs; m = 1024: 8 x 32, then 32
    assert (seed.lamda_inv_at(1024, 0, 1251), seed.lamda_inv_at(1024, 12509, 1251)) == pytest.approx((256.0, 32.0))
    assert MEC(backbone=TINY, dim=DIM, pred_dim=8, eps_sq=16.0).lamda_inv_at(6, 10**6, 5) == pytest.approx(6.0)


def test_mec_teacher_is_declared_gets_no_gradient_and_follows_the_cosine_momentum():
    m = _mec()
    assert m.teacher_names == ["teacher"] and m.backbone_for("teacher") is m.teacher.backbone
    n = 1000
    assert m.teacher.tau_at(0, n) == pytest.approx(0.996)
    assert m.teacher.tau_at(n // 2, n) == pytest.approx(0.998)
    assert m.teacher.tau_at(n, n) == pytest.approx(1.0)
    m.training_loss(_batch(_views()))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    online = [p.detach().clone() for mod in (m.backbone, m.projector) for p in mod.parameters()]
    old = [p.clone() for p in m.teacher.parameters()]
    m.on_train_step_end(n, n)  # last step: τ = 1, the teacher stays
    assert all(torch.equal(t, o) for t, o in zip(m.teacher.parameters(), old))
    m.on_train_step_end(0, n)  # first step: τ = 0.996
    for t, o, s in zip(m.teacher.parameters(), old, online):
        torch.testing.assert_close(t, 0.996 * o + 0.004 * s)


def test_mec_views_go_through_separate_forward_passes():
    """BN running statistics after one training_loss equal those of two separate passes, not one concatenated."""
    m = _mec()
    views = _views()
    separate, joint = copy.deepcopy(m.backbone), copy.deepcopy(m.backbone)
    m.training_loss(_batch(views))
    separate(views[:, 0]), separate(views[:, 1])
    joint(views.flatten(0, 1))
    for a, b in zip(_bn_stats(m.backbone), _bn_stats(separate)):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(_bn_stats(m.backbone), _bn_stats(joint)))
    assert any(not torch.allclose(a, b) for a, b in zip(_bn_stats(m.teacher.backbone), _bn_stats(joint)))


@pytest.mark.parametrize("method", [MEC, SimCLR, BYOL])
def test_two_views_exactly(method):
    m = method(backbone=TINY)
    name = method.__name__
    with pytest.raises(ValueError, match=f"{name} takes exactly 2 views per image, got 4"):
        m.training_loss(_batch(_views(v=4)))
    with pytest.raises(ValueError, match=f"{name} takes exactly 2 views per image, got 1"):
        m.training_loss(_batch(_views(v=1)))


# ------------------------------------------------------------------------------------------------- SimCLR
def test_simclr_loss_equals_info_nce_of_its_projections():
    torch.manual_seed(0)
    m = SimCLR(backbone=TINY, projector=[32, 8], temperature=0.2).train()
    views = _views()
    out = m.training_loss(_batch(views))
    z = m.projector(m.backbone(views.flatten(0, 1))).view(B, 2, -1)  # one pass over both views, as SimCLR
    torch.testing.assert_close(out["loss"], info_nce_loss(z[:, 0], z[:, 1], temperature=0.2))
    assert not torch.allclose(out["loss"], info_nce_loss(z[:, 0], z[:, 1], temperature=0.5))
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.teacher_names == []


# --------------------------------------------------------------------------------------------------- BYOL
def test_byol_loss_is_symmetric_byol_loss_on_its_outputs():
    torch.manual_seed(0)
    m = BYOL(backbone=TINY, projector=[32, 8], predictor_hidden=16).train()
    views = _views()
    out = m.training_loss(_batch(views))
    x1, x2 = views[:, 0], views[:, 1]
    p1, p2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    with torch.no_grad():
        z1, z2 = m.teacher(x1), m.teacher(x2)
    torch.testing.assert_close(out["loss"], byol_loss(p1, z2) + byol_loss(p2, z1))


def test_byol_target_is_an_ema_without_gradient():
    torch.manual_seed(0)
    m = BYOL(backbone=TINY, projector=[32, 8], predictor_hidden=16, tau=0.99).train()
    assert m.teacher.names == ["backbone", "projector"] and m.backbone_for("teacher") is m.teacher.backbone
    assert m.teacher.tau_at(0, 100) == pytest.approx(0.99) and m.teacher.tau_at(100, 100) == pytest.approx(1.0)
    m.training_loss(_batch(_views()))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    old = [p.clone() for p in m.teacher.parameters()]
    online = [p.detach() for mod in (m.backbone, m.projector) for p in mod.parameters()]
    m.on_train_step_end(0, 100)
    for t, o, s in zip(m.teacher.parameters(), old, online):
        torch.testing.assert_close(t, 0.99 * o + 0.01 * s)
    assert any(not torch.equal(t, o) for t, o in zip(m.teacher.parameters(), old))
