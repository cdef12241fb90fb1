"""Optimisers, lr scaling and per-step schedules."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

from selfsup.engine.optim import (
    LARS,
    WarmupSchedule,
    build_optimizer,
    build_scheduler,
    param_groups,
    scaled_lr,
    warmup_cosine,
)

# ------------------------------------------------------------------------- LARS


def _two_params() -> tuple[nn.Parameter, nn.Parameter]:
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    return w, b


def _set_grads(w: nn.Parameter, b: nn.Parameter) -> None:
    w.grad = torch.tensor([[0.7, 0.0], [0.0, -0.4]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)


def test_lars_hand_computed_two_steps() -> None:
    lr, wd, eta, mom = 0.5, 0.1, 0.01, 0.9
    w, b = _two_params()
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mom, eta=eta)

    # Step 1. Weight: g = grad + wd·w = [[1, 0], [0, 0]] (||g|| = 1), q = eta·5/1 = 0.05,
    # mu = 0.05·g, w -= 0.5·mu -> w[0,0] = 3 - 0.025. Bias (1-D): plain momentum SGD,
    # no decay, no trust ratio: mu = [0.5, 0.5], b -= 0.5·mu -> [0.75, -2.25].
    _set_grads(w, b)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.975, 0.0], [0.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, -2.25], dtype=torch.float64))

    # Step 2, same raw gradients. Weight: g = [[0.7 + 0.2975, 0], [0, -0.4 + 0.4]] = [[0.9975, 0], [0, 0]],
    # q·g = eta·||w||·[[1, 0], [0, 0]], mu = 0.9·0.05 + 0.01·||w|| in the (0,0) entry.
    _set_grads(w, b)
    opt.step()
    w_norm = math.sqrt(2.975**2 + 4.0**2)
    mu00 = mom * 0.05 + eta * w_norm
    torch.testing.assert_close(w.detach(), torch.tensor([[2.975 - lr * mu00, 0.0], [0.0, 4.0]], dtype=torch.float64))
    # Bias: mu = 0.9·0.5 + 0.5 = 0.95; b -= 0.475.
    torch.testing.assert_close(b.detach(), torch.tensor([0.275, -2.725], dtype=torch.float64))


def test_lars_1d_excluded_from_decay_and_adaptation() -> None:
    # A 1-D parameter with a huge weight decay and tiny eta moves exactly by lr·grad.
    b = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    b.grad = torch.tensor([0.1, -0.2, 0.3])
    LARS([b], lr=0.1, weight_decay=100.0, eta=1e-6).step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.99, 2.02, 2.97]))


def test_lars_group_override_forces_adaptation() -> None:
    b = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||b|| = 5
    b.grad = torch.tensor([0.0, 1.0])
    opt = LARS([{"params": [b], "lars_exclude": False}], lr=1.0, weight_decay=0.0, eta=0.1)
    opt.step()  # q = 0.1·5/1 = 0.5 -> b -= 0.5·[0, 1]
    torch.testing.assert_close(b.detach(), torch.tensor([3.0, 3.5]))


def test_lars_zero_norm_uses_unit_trust_ratio() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, weight_decay=0.5, eta=1e-3).step()  # ||w|| = 0 -> q = 1
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


# ----------------------------------------------------------- groups and builder


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))


def test_param_groups_split() -> None:
    m = _model()
    groups = param_groups(m, 1e-4, exclude_1d_from_wd=True)
    assert len(groups) == 2
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 1e-4
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and len(groups[1]["params"]) == 3
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"] is True
    single = param_groups(m, 1e-4, exclude_1d_from_wd=False)
    assert len(single) == 1 and len(single[0]["params"]) == 5


def test_build_optimizer_variants() -> None:
    m = _model()
    lars = build_optimizer(m, "lars", lr=4.8, weight_decay=1e-6)
    assert isinstance(lars, LARS)
    assert [g["weight_decay"] for g in lars.param_groups] == [1e-6, 0.0]
    assert lars.param_groups[1]["lars_exclude"] is True

    adam = build_optimizer(m, "Adam", lr=1e-3, weight_decay=1e-6)
    assert isinstance(adam, torch.optim.Adam) and len(adam.param_groups) == 1
    assert adam.param_groups[0]["weight_decay"] == 1e-6  # BN and biases decayed too

    sgd = build_optimizer(m.parameters(), "sgd", lr=0.1, weight_decay=1e-5, exclude_1d=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-5, 0.0]
    assert sgd.param_groups[0]["momentum"] == 0.9

    adamw = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)


def test_unknown_optimiser_name() -> None:
    with pytest.raises(ValueError, match=r"unknown optimiser 'rmsprop'.*adam, adamw, sgd, lars"):
        build_optimizer(_model(), "rmsprop", lr=0.1)


# ------------------------------------------------------------------ lr scaling


def test_scaled_lr() -> None:
    assert scaled_lr(0.6, 2048) == pytest.approx(4.8)  # OFF-MMCR ImageNet
    assert scaled_lr(0.5, 1024) == pytest.approx(2.0)  # OFF-MEC
    assert scaled_lr(1.0, 1024, rule="sqrt") == pytest.approx(2.0)
    assert scaled_lr(1e-3, 4096, rule="none") == 1e-3
    assert scaled_lr(0.1, 512, reference=128) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="rule"):
        scaled_lr(0.1, 256, rule="cube")


# ------------------------------------------------------------------- schedules


def test_warmup_cosine_values() -> None:
    peak, total, warm, r = 2.0, 111, 10, 0.001
    assert warmup_cosine(0, total, warm, peak, r) == pytest.approx(peak / warm)  # nonzero first step
    assert warmup_cosine(4, total, warm, peak, r) == pytest.approx(peak * 5 / warm)
    assert warmup_cosine(warm - 1, total, warm, peak, r) == pytest.approx(peak)  # end of warm-up
    assert warmup_cosine(warm, total, warm, peak, r) == pytest.approx(peak)  # cosine starts at 1
    # Cosine span = total - 1 - warm = 100 steps; step 60 is half-way: ½(1 + cos(π/2)) = ½.
    assert warmup_cosine(60, total, warm, peak, r) == pytest.approx(peak * (r + (1 - r) * 0.5))
    assert warmup_cosine(35, total, warm, peak, r) == pytest.approx(
        peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    )
    assert warmup_cosine(total - 1, total, warm, peak, r) == pytest.approx(peak * r)  # last step
    assert warmup_cosine(total + 5, total, warm, peak, r) == pytest.approx(peak * r)
    assert warmup_cosine(0, 10, 0, 1.0) == pytest.approx(1.0)  # no warm-up
    assert warmup_cosine(9, 10, 0, 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 11, 1.0)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_scheduler_matches_function_and_constant() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, final_lr_ratio=0.1)
    assert _lrs(sched, 20) == pytest.approx([warmup_cosine(s, 20, 5, 2.0, 0.1) for s in range(20)])

    opt = torch.optim.SGD([p], lr=1.0)
    const = build_scheduler(opt, total_steps=10, warmup_steps=4, schedule="constant")
    assert _lrs(const, 10) == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 6)
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, 10, 2, schedule="step")


def test_scheduler_state_dict_round_trip() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    sched = build_scheduler(opt, total_steps=30, warmup_steps=6, final_lr_ratio=0.01)
    _lrs(sched, 12)
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = _lrs(sched, 18)

    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    sched2 = build_scheduler(opt2, total_steps=30, warmup_steps=1)  # overwritten by the load
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.lr_lambdas[0].warmup_steps == 6
    assert _lrs(sched2, 18) == pytest.approx(expected)
    # The factor itself pickles (needed e.g. for spawn-based launchers).
    fac = pickle.loads(pickle.dumps(WarmupSchedule(30, 6, 0.01)))
    assert fac(29) == pytest.approx(0.01)


def test_timm_lars_is_the_larc_form_not_the_seeds() -> None:
    """Why LARS is our own (see its docstring): timm's Lars, given the same exclusion by groups, takes a different
    first step when wd > 0 (trust ratio η||w|| / (||g|| + wd||w||) instead of η||w|| / ||g + wd·w||), and the same
    one at wd = 0."""
    from timm.optim import Lars

    for wd, same in ((0.1, False), (0.0, True)):
        ours, theirs = _two_params(), _two_params()
        opt_ours = LARS(list(ours), lr=0.5, weight_decay=wd, momentum=0.9, eta=0.01)
        groups = [
            {"params": [theirs[0]], "weight_decay": wd, "always_adapt": True},
            {"params": [theirs[1]], "weight_decay": 0.0, "always_adapt": False},  # 1-D: no decay, no adaptation
        ]
        opt_timm = Lars(groups, lr=0.5, momentum=0.9, trust_coeff=0.01, eps=0.0)
        _set_grads(*ours)
        _set_grads(*theirs)
        opt_ours.step()
        opt_timm.step()
        torch.testing.assert_close(ours[1].detach(), theirs[1].detach())  # the excluded bias agrees
        # weight, by hand: g + wd·w = [[1, 0], [0, 0]]; ours q = 0.01·5/1, timm q = 0.01·5/(||g|| + 0.1·5)
        g_norm = math.hypot(0.7, 0.4)
        q_timm = 0.01 * 5 / (g_norm + wd * 5)
        expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        expected_timm = expected - 0.5 * q_timm * torch.tensor(
            [[0.7 + wd * 3, 0.0], [0.0, -0.4 + wd * 4]], dtype=torch.float64
        )
        torch.testing.assert_close(theirs[0].detach(), expected_timm)
        assert torch.allclose(ours[0].detach(), theirs[0].detach()) is same


def test_a_fixed_lr_group_keeps_its_peak_while_the_others_follow_the_schedule() -> None:
    """SimSiam's fix_pred_lr: a param_groups() entry with "fixed_lr": True keeps its lr through warm-up and decay."""
    from selfsup.engine.optim import build_scheduler, method_param_groups

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def param_groups(self):
            return [
                {"name": "a", "params": list(self.a.parameters())},
                {"name": "pred", "params": list(self.b.parameters()), "fixed_lr": True},
            ]

    groups = method_param_groups(TwoHeads(), lr=0.1, weight_decay=0.0, exclude=False)
    assert [g["fixed_lr"] for g in groups] == [False, True]
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, final_lr_ratio=0.0, schedule="cosine")
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [a for a, _ in seen][:4] == pytest.approx([0.05, 0.1, 0.1, 0.1 * (1 + math.cos(math.pi / 7)) / 2])
    assert all(b == pytest.approx(0.1) for _, b in seen)  # warm-up and cosine leave the fixed group alone
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # picklable
