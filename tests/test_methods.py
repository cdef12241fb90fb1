"""MMCR method wiring: sample-major view grouping, momentum branch EMA, shared helpers."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import mmcr_loss
from selfsup.methods import MMCR, BackboneConfig, EMATeacher
from selfsup.methods.base import cosine_tau

TINY = BackboneConfig("resnet10", cifar_stem=True, width=8)


def _views(b=6, v=3, seed=0):
    return torch.randn(b, v, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_loss_equals_mmcr_of_grouped_projections():
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8]).train()
    views = _views()
    out = m.training_loss(views)
    z = m.projector(m.backbone(views.flatten(0, 1))).view(6, 3, -1)
    torch.testing.assert_close(out["loss"], mmcr_loss(z))
    assert out["global_nuc"].item() == pytest.approx(-out["loss"].item(), rel=1e-6)


def test_views_are_grouped_sample_major():
    """Shuffling images keeps the loss; regrouping views across images changes it."""
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8]).train()
    views = _views()
    ref = m.training_loss(views)["loss"]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(m.training_loss(views[perm])["loss"], ref, rtol=1e-4, atol=1e-4)
    regrouped = views.transpose(0, 1).reshape(views.shape)  # image-major misreading of the same tensor
    assert abs(m.training_loss(regrouped)["loss"].item() - ref.item()) > 1e-3


def test_one_view_is_rejected_with_a_clear_error():
    m = MMCR(backbone=TINY, projector=[16, 8])
    with pytest.raises(ValueError, match="at least 2 views"):
        m.training_loss(_views(v=1))
    with pytest.raises(ValueError, match=r"\[B, V, C, H, W\]"):
        m.training_loss(torch.randn(4, 3, 16, 16))


def test_momentum_branch_is_an_ema_of_parameters_only():
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8], momentum_tau=0.9).train()
    teacher = m.momentum.copies
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    old = [p.detach().clone() for p in teacher.parameters()]
    loss = m.training_loss(_views())["loss"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    m.on_train_step_end(1, 10)
    online = [p.detach() for mod in (m.backbone, m.projector) for p in mod.parameters()]
    for t, o, s in zip(teacher.parameters(), old, online):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)


def test_ema_teacher_module_count_checked():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMATeacher(a)
    with pytest.raises(ValueError, match="holds 1 modules"):
        ema.update([a, b], 0.5)


def test_cosine_tau_endpoints():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert math.isclose(cosine_tau(0, 1, 0.99), 0.99)
