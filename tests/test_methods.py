"""Method seams: the Batch, sample-major views, declared teachers (EMA), parameter groups, ViT backbones."""

from __future__ import annotations

import math

import pytest
import torch
from method_cases import make_batch

from selfsup.engine.optim import method_param_groups
from selfsup.losses import mmcr_loss
from selfsup.methods import MMCR, EMATeacher, Method
from selfsup.methods.base import cosine_tau
from selfsup.models import MLP

TINY = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}


def _views(b=6, v=3, seed=0, size=16):
    return torch.randn(b, v, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batch(views, step=0, max_steps=10, steps_per_epoch=5):
    return make_batch(views, step=step, max_steps=max_steps, steps_per_epoch=steps_per_epoch)


def test_loss_equals_mmcr_of_grouped_projections():
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8]).train()
    views = _views()
    out = m.training_loss(_batch(views))
    z = m.projector(m.backbone(views.flatten(0, 1))).view(6, 3, -1)
    torch.testing.assert_close(out["loss"], mmcr_loss(z))
    assert out["global_nuc"].item() == pytest.approx(-out["loss"].item(), rel=1e-6)


def test_views_are_grouped_sample_major():
    """Shuffling images keeps the loss; regrouping views across images changes it."""
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8]).train()
    views = _views()
    ref = m.training_loss(_batch(views))["loss"]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(m.training_loss(_batch(views[perm]))["loss"], ref, rtol=1e-4, atol=1e-4)
    regrouped = views.transpose(0, 1).reshape(views.shape)  # image-major misreading of the same tensor
    assert abs(m.training_loss(_batch(regrouped))["loss"].item() - ref.item()) > 1e-3


def test_one_view_is_rejected_with_a_clear_error():
    m = MMCR(backbone=TINY, projector=[16, 8])
    with pytest.raises(ValueError, match="at least 2 views"):
        m.training_loss(_batch(_views(v=1)))
    with pytest.raises(ValueError, match=r"\[B, V, C, H, W\]"):
        m.training_loss(_batch(torch.randn(4, 3, 16, 16)))


def test_momentum_teacher_is_a_declared_ema_of_parameters_only():
    torch.manual_seed(0)
    m = MMCR(backbone=TINY, projector=[16, 8], momentum_tau=0.9).train()
    assert m.teacher_names == ["teacher"]
    assert m.backbone_for("teacher") is m.teacher.backbone and m.backbone_for("online") is m.backbone
    with pytest.raises(ValueError, match="has: online, teacher"):
        m.backbone_for("momentum")
    assert {k.split(".")[0] for k in m.state_dict()} == {"backbone", "projector", "teacher"}
    assert any(k.startswith("teacher.projector.") for k in m.state_dict())
    teacher = m.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    old = [p.detach().clone() for p in teacher.parameters()]
    loss = m.training_loss(_batch(_views()))["loss"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    m.on_train_step_end(1, 10)  # the base class steps every declared teacher
    online = [p.detach() for mod in (m.backbone, m.projector) for p in mod.parameters()]
    for t, o, s in zip(teacher.parameters(), old, online):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)


def test_ema_teacher_cosine_schedule_and_names():
    a = torch.nn.Linear(2, 2)
    ema = EMATeacher(0.996, final_tau=1.0, backbone=a)
    assert ema.tau_at(0, 100) == pytest.approx(0.996) and ema.tau_at(100, 100) == pytest.approx(1.0)
    assert EMATeacher(0.99, backbone=a).tau_at(50, 100) == 0.99
    with pytest.raises(ValueError, match="at least one module"):
        EMATeacher(0.9)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        EMATeacher(1.5, backbone=a)


def test_cosine_tau_endpoints():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert math.isclose(cosine_tau(0, 1, 0.99), 0.99)


class _WithPredictor(Method):
    """A method with a predictor trained at 10x the lr and its own weight decay (as BYOL / MEC do)."""

    def __init__(self):
        super().__init__({"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1}})
        self.predictor = MLP([self.num_features, 8, self.num_features], last_bias=True)

    def param_groups(self):
        return [
            {"name": "backbone", "params": list(self.backbone.parameters())},
            {"name": "predictor", "params": list(self.predictor.parameters()), "lr_mult": 10.0, "weight_decay": 0.5},
        ]


def test_param_groups_lr_mult_weight_decay_and_no_weight_decay_names():
    m = _WithPredictor()
    groups = {g["name"]: g for g in method_param_groups(m, lr=0.1, weight_decay=0.05, exclude=True)}
    assert set(groups) == {"backbone", "backbone/no_decay", "predictor", "predictor/no_decay"}
    ids = lambda g: {id(p) for p in g["params"]}
    # the ViT's position embedding and class token (no_weight_decay()) join the 1-D parameters
    assert {id(m.backbone.pos_embed), id(m.backbone.cls_token)} <= ids(groups["backbone/no_decay"])
    assert all(p.ndim > 1 for p in groups["backbone"]["params"])
    assert id(m.backbone.patch_embed.proj.weight) in ids(groups["backbone"])
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["backbone/no_decay"]["weight_decay"] == 0.0
    assert groups["predictor"]["lr"] == pytest.approx(1.0) and groups["predictor"]["weight_decay"] == 0.5
    assert groups["predictor/no_decay"]["lr"] == pytest.approx(1.0)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in m.parameters() if p.requires_grad])
    flat = method_param_groups(m, lr=0.1, weight_decay=0.05, exclude=False)
    assert [g["name"] for g in flat] == ["backbone", "predictor"]  # exclude=False decays everything


def test_param_groups_must_cover_every_trainable_parameter_once():
    m = _WithPredictor()
    m.param_groups = lambda: [{"name": "backbone", "params": list(m.backbone.parameters())}]
    with pytest.raises(ValueError, match="in no parameter group: .*predictor"):
        method_param_groups(m, 0.1, 0.0, True)
    m.param_groups = lambda: [
        {"params": list(m.parameters())},
        {"name": "again", "params": list(m.predictor.parameters())},
    ]
    with pytest.raises(ValueError, match="'again' repeats"):
        method_param_groups(m, 0.1, 0.0, True)


def test_mmcr_on_a_vit_backbone():
    torch.manual_seed(0)
    m = MMCR(backbone={"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2}}, projector=[32, 8])
    assert m.num_features == 192
    out = m.training_loss(_batch(_views(b=4, v=2)))
    out["loss"].backward()
    assert m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_make_views_needs_the_engine():
    m = MMCR(backbone=TINY, projector=[16, 8])
    with pytest.raises(RuntimeError, match="once the engine has bound"):
        m.make_views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0)
    m.bind_view_maker(lambda images, step: images[:, None].float() + step)
    assert m.make_views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 3).shape == (2, 1, 3, 8, 8)
