"""Barlow Twins and VICReg: losses on the methods' own outputs (separate passes per view), the official parameter
groups (Barlow's bias lr, 1-D parameters out of weight decay and the LARS trust ratio), the gather flags, two views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_cases import make_batch

from selfsup.engine.optim import build_optimizer, method_param_groups
from selfsup.losses import barlow_twins_loss, vicreg_loss
from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.vicreg import VICReg
from selfsup.models import TINY_RESNET

B = 6


def _views(b=B, v=2, seed=0, size=16):
    x = torch.randn(b, v, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, 1:] = 2 * x[:, 1:] + 1  # the two views have different statistics: per-view BN is then visible
    return x


def _build(cls, **kw):
    torch.manual_seed(0)
    return cls(**{"backbone": TINY_RESNET, "projector": [16, 16, 8], **kw}).train()


def _linears(mlp):
    return [(m.in_features, m.out_features, m.bias is not None) for m in mlp if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("cls", [BarlowTwins, VICReg])
def test_projector_is_the_official_shape(cls):
    """Linear BN ReLU Linear BN ReLU Linear, no biases (Barlow: as the official; VICReg: its last layer has none,
    its hidden biases precede BN and are omitted); the output is the last linear (no final BN or ReLU)."""
    m = _build(cls)
    f = m.num_features
    assert _linears(m.projector) == [(f, 16, False), (16, 16, False), (16, 8, False)]
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert cls.num_views == 2 and cls.tiny["projector"] == [16, 8]


@pytest.mark.parametrize("cls", [BarlowTwins, VICReg])
def test_exactly_two_views(cls):
    m = _build(cls)
    with pytest.raises(ValueError, match=f"{cls.__name__} takes exactly 2 views per image, got 3"):
        m.training_loss(make_batch(_views(v=3)))
    with pytest.raises(ValueError, match=f"{cls.__name__} takes exactly 2 views per image, got 1"):
        m.training_loss(make_batch(_views(v=1)))


# ---------------------------------------------------------------------------------------------------- Barlow
def test_barlow_loss_equals_barlow_twins_loss_of_its_own_separate_passes():
    m = _build(BarlowTwins, lambd=0.02, scale_loss=0.1)
    views = _views()
    out = m.training_loss(make_batch(views))
    h1, h2 = m.backbone(views[:, 0]), m.backbone(views[:, 1])
    z1, z2 = m.projector(h1), m.projector(h2)
    expected, parts = barlow_twins_loss(z1, z2, lambd=0.02, return_parts=True)
    torch.testing.assert_close(out["loss"], 0.1 * expected)
    torch.testing.assert_close(out["on_diag"], parts["on_diag"])  # the parts are logged unscaled, unweighted
    torch.testing.assert_close(out["off_diag"], parts["off_diag"])
    torch.testing.assert_close(out["loss"], 0.1 * (parts["on_diag"] + 0.02 * parts["off_diag"]))
    # one pass over both views (BN statistics of the mixed batch) gives another loss: the passes are separate
    z = m.projector(m.backbone(views.flatten(0, 1))).view(B, 2, -1)
    assert not torch.allclose(out["loss"], 0.1 * barlow_twins_loss(z[:, 0], z[:, 1], lambd=0.02))
    emb = out["embeddings"]
    assert [t.shape for t in emb["backbone"]] == [(B, m.num_features)] * 2
    assert [t.shape for t in emb["projector"]] == [(B, 8)] * 2
    assert not any(t.requires_grad for t in (*emb["backbone"], *emb["projector"]))
    out["loss"].backward()
    assert m.projector[0].weight.grad.abs().sum() > 0 and m.backbone.conv1.weight.grad.abs().sum() > 0


def test_barlow_defaults_are_the_official_ones():
    m = BarlowTwins(backbone=TINY_RESNET, projector=[16, 8])
    assert (m.lambd, m.scale_loss, m.bias_lr_mult) == (0.0051, 1.0, pytest.approx(0.0048 / 0.2))
    assert (m.gather_distributed, m.gather_grad) == (True, "all")
    assert BarlowTwins.tiny_variants == {"seed_gather": {"gather_grad": "local"}}


def test_barlow_param_groups_bias_lr_no_decay_no_trust_ratio():
    """The official groups: 2-D weights at lr with weight decay and the trust ratio; every 1-D parameter (biases,
    BatchNorm) at lr x 0.024 (0.0048 / 0.2), without weight decay and trust ratio (plain momentum SGD)."""
    m = _build(BarlowTwins)
    groups = method_param_groups(m, lr=0.2, weight_decay=1e-6, exclude=True)
    assert [g["name"] for g in groups] == ["weights", "biases/no_decay"]
    weights, biases = groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(m.parameters()))
    assert weights["lr"] == pytest.approx(0.2) and weights["weight_decay"] == 1e-6
    assert biases["lr"] == pytest.approx(0.0048) and biases["weight_decay"] == 0.0 and biases["lars_exclude"]
    bn = m.projector[1]
    assert any(p is bn.weight for p in biases["params"]) and any(p is bn.bias for p in biases["params"])

    # one LARS step (zero momentum buffer): the 1-D parameters take p - 0.0048 g, the weights the trust-ratio step
    opt = build_optimizer(groups, "lars", lr=0.2, weight_decay=1e-6, eta=0.001)
    m.training_loss(make_batch(_views()))["loss"].backward()
    w, b = m.projector[0].weight, bn.bias
    w0, gw, b0, gb = w.detach().clone(), w.grad.clone(), b.detach().clone(), b.grad.clone()
    opt.step()
    torch.testing.assert_close(b.detach(), b0 - 0.0048 * gb)
    d = gw + 1e-6 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.2 * (0.001 * w0.norm() / d.norm()) * d)

    one = method_param_groups(_build(BarlowTwins, bias_lr_mult=1.0), lr=0.3, weight_decay=1e-4, exclude=True)
    assert [g["lr"] for g in one] == [pytest.approx(0.3)] * 2  # solo-learn: one lr for every parameter


def test_barlow_gather_grad_flag_is_accepted_and_validated():
    views = _views()
    local = _build(BarlowTwins, gather_grad="local")
    assert local.gather_grad == "local"
    # one process: the flag changes nothing (the gather is the identity)
    torch.testing.assert_close(
        local.training_loss(make_batch(views))["loss"], _build(BarlowTwins).training_loss(make_batch(views))["loss"]
    )
    with pytest.raises(ValueError, match="gather_grad must be 'all' or 'local', got 'none'"):
        _build(BarlowTwins, gather_grad="none")
    with pytest.raises(ValueError, match="lambd must be >= 0"):
        _build(BarlowTwins, lambd=-1.0)
    with pytest.raises(ValueError, match="scale_loss must be > 0"):
        _build(BarlowTwins, scale_loss=0.0)
    with pytest.raises(ValueError, match="bias_lr_mult must be >= 0"):
        _build(BarlowTwins, bias_lr_mult=float("nan"))


def test_barlow_gathers_both_views(monkeypatch):
    """Under DDP the loss sees every rank's rows of both views: ``gather`` replaced by ``[t; t]`` (two ranks holding
    the same rows) gives the loss of the doubled batch for each view."""
    import selfsup.distributed

    m = _build(BarlowTwins)
    calls = []

    def fake_gather(t, group=None, grad="all"):
        calls.append(grad)
        return torch.cat([t, t.flip(0)])

    monkeypatch.setattr(selfsup.distributed, "gather", fake_gather)
    views = _views()
    out = m.training_loss(make_batch(views))
    z1, z2 = m.projector(m.backbone(views[:, 0])), m.projector(m.backbone(views[:, 1]))
    expected = barlow_twins_loss(torch.cat([z1, z1.flip(0)]), torch.cat([z2, z2.flip(0)]))
    torch.testing.assert_close(out["loss"], expected)
    assert calls == ["all", "all"]


# ---------------------------------------------------------------------------------------------------- VICReg
def test_vicreg_loss_equals_vicreg_loss_of_its_own_separate_passes():
    m = _build(VICReg, sim_coeff=10.0, std_coeff=50.0, cov_coeff=2.0)
    views = _views()
    out = m.training_loss(make_batch(views))
    h1, h2 = m.backbone(views[:, 0]), m.backbone(views[:, 1])
    z1, z2 = m.projector(h1), m.projector(h2)
    expected, parts = vicreg_loss(z1, z2, sim_coeff=10.0, std_coeff=50.0, cov_coeff=2.0, return_parts=True)
    torch.testing.assert_close(out["loss"], expected)
    for name in ("invariance", "variance", "covariance"):
        torch.testing.assert_close(out[name], parts[name])
    z = m.projector(m.backbone(views.flatten(0, 1))).view(B, 2, -1)
    assert not torch.allclose(out["loss"], vicreg_loss(z[:, 0], z[:, 1], sim_coeff=10.0, std_coeff=50.0, cov_coeff=2.0))
    assert [t.shape for t in out["embeddings"]["projector"]] == [(B, 8)] * 2
    out["loss"].backward()
    assert m.projector[0].weight.grad.abs().sum() > 0


def test_vicreg_defaults_groups_and_validation():
    m = VICReg(backbone=TINY_RESNET, projector=[16, 8])
    assert m.coeffs == {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0} and m.gather_distributed
    groups = method_param_groups(m, lr=1.6, weight_decay=1e-6, exclude=True)  # one lr; 1-D out of wd and LARS
    assert [g["name"] for g in groups] == ["all", "all/no_decay"]
    assert [g["lr"] for g in groups] == [pytest.approx(1.6)] * 2
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["lars_exclude"]
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-6
    with pytest.raises(ValueError, match="std_coeff must be >= 0"):
        VICReg(backbone=TINY_RESNET, projector=[16, 8], std_coeff=-1.0)


def test_vicreg_gathered_invariance_has_the_official_per_rank_gradient():
    """The module docstring's argument, by autograd, for W = 2 ranks of 4 rows: the official rank r back-propagates
    ``25 mse(x_r, y_r)`` locally plus ``var + cov`` of the gathered rows through FullGatherLayer (its backward sums
    the W ranks' identical gradients: W x); here rank r back-propagates the whole loss on the gathered rows through
    the same sum. The gradients reaching rank r's rows are equal."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    w, n = 2, 4
    for r in range(w):
        rows = slice(r * n, (r + 1) * n)
        xs = x.clone().requires_grad_(True)
        (ours,) = torch.autograd.grad(w * vicreg_loss(xs, y), xs)  # every rank's identical loss, summed
        xo = x.clone().requires_grad_(True)
        official = 25.0 * F.mse_loss(xo[rows], y[rows]) + w * vicreg_loss(xo, y, sim_coeff=0.0)
        (theirs,) = torch.autograd.grad(official, xo)
        torch.testing.assert_close(ours[rows], theirs[rows])
