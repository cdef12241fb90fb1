"""Teacher-student methods away from initialisation, where teacher and student differ.

At initialisation a declared teacher (:class:`~selfsup.methods.base.EMATeacher`) is an exact copy of the student
modules it names, so a loss that reads an online module where it should read the teacher's (BYOL's target through the
online projector, say) has the same value and gradient there: a test at initialisation cannot see it. These tests
first move teacher or student away from the other.

* :func:`test_teacher_is_used_and_steps_by_ema` runs over every registered method and ``tiny_variants`` entry that
  declares a teacher (derived from the registry, no hand-kept list): perturbing the teacher changes the loss and the
  student's gradient; perturbing each of the teacher's named modules alone changes the loss (a target that uses an
  online module instead fails here); no gradient reaches a teacher parameter nor does an optimiser group hold one; and
  ``on_train_step_end`` moves the teacher to ``τ·old + (1 − τ)·student``.
* BYOL, MEC and MMCR-momentum: the loss and the student's gradient at a perturbed student equal the documented
  formula evaluated on outputs computed here from ``method.teacher`` (constants) and the student modules, and differ
  from the same formula with the student's own (or the online projector's) outputs as targets.
* :func:`test_generic_check_catches_an_online_target` plants the bug (BYOL's target through the online projector)
  and checks that the generic check fails.

Determinism: fixed seeds for weights, perturbations and views; every method runs in train mode, where BatchNorm
normalises with the statistics of the batch it is given, so the same module on the same batch gives the same output
whatever its running buffers hold (the recomputations below therefore match the method's own passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from method_cases import make_batch, method_cases, random_views, step_outputs
from torch import nn

from selfsup.losses import byol_loss, mec_loss, mmcr_momentum_loss
from selfsup.methods import Batch, Method, available_methods, get_method

B = 8  # images per batch (every BatchNorm sees at least 8 rows)
STEP, MAX_STEPS, STEPS_PER_EPOCH = 3, 10, 5
# A loss or gradient "changes" when it moves by more than this: float32 recomputation noise on these tiny models is
# below 1e-6, and the perturbations below move the losses by 1e-2 or more (a planted online target: exactly 0).
CHANGED = 1e-4


def _build(name: str, variant: str = "", **overrides) -> Method:
    """The tiny config (with the variant's and then ``overrides``), same weights on every call, in train mode."""
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(**{**cls.tiny, **(cls.tiny_variants[variant] if variant else {}), **overrides}).train()


def _views(method: Method, seed: int = 1) -> torch.Tensor:
    return random_views(type(method), b=B, seed=seed)


def _batch(views: torch.Tensor, step: int = STEP) -> Batch:
    return make_batch(views, step=step, max_steps=MAX_STEPS, seed=0, steps_per_epoch=STEPS_PER_EPOCH)


def _student_params(method: Method) -> dict[str, nn.Parameter]:
    teachers = tuple(f"{t}." for t in method.teacher_names)
    return {k: p for k, p in method.named_parameters() if not k.startswith(teachers)}


def _loss_and_grads(
    method: Method, views: torch.Tensor, step: int = STEP
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss on ``views`` and the gradient of every student parameter (zeros where none arrives).

    A planned-epoch method (``epoch_plan()`` not None: IMLE-SSL today, no teacher) first prepares the epoch on the
    same views with a fixed generator, as the engine does before the epoch's first step; redone on every call so the
    per-epoch state follows the current weights."""
    method.zero_grad(set_to_none=True)
    loss = step_outputs(method, _batch(views, step))["loss"]
    loss.backward()
    grads = {
        k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for k, p in _student_params(method).items()
    }
    return loss.detach(), grads


@torch.no_grad()
def _perturb(modules: Iterable[nn.Module], seed: int) -> None:
    """Move every parameter of ``modules`` by a seeded relative (20 %) and absolute (0.02) Gaussian step."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _teacher_modules(method: Method) -> list[tuple[str, nn.Module]]:
    """``("teacher.backbone", module), ...``: every named copy of every declared teacher."""
    out = []
    for t in method.teacher_names:
        teacher = getattr(method, t)
        out += [(f"{t}.{name}", getattr(teacher, name)) for name in teacher.names]
    return out


def check_teacher(build: Callable[[], Method]) -> None:
    """The generic teacher checks on fresh methods from ``build()`` (same weights each call); raises AssertionError."""
    method = build()
    label = type(method).__name__
    views = _views(method)
    loss0, grads0 = _loss_and_grads(method, views)
    assert max(g.abs().max().item() for g in grads0.values()) > CHANGED, f"{label}: no student gradient"

    # No gradient reaches a teacher, and no optimiser group holds a teacher parameter.
    student_ids = {id(p) for p in _student_params(method).values()}
    for name, p in method.named_parameters():
        if id(p) not in student_ids:
            assert not p.requires_grad and p.grad is None, f"{label}: gradient reaches teacher parameter {name}"
    grouped = {id(p) for group in method.param_groups() for p in group["params"]}
    assert grouped.isdisjoint(id(p) for _, m in _teacher_modules(method) for p in m.parameters()), (
        f"{label}: a parameter group holds teacher parameters"
    )

    # The whole teacher moved: the loss and the student's gradient move.
    moved = build()
    _perturb([m for _, m in _teacher_modules(moved)], seed=10)
    loss1, grads1 = _loss_and_grads(moved, views)
    assert abs(loss1 - loss0).item() > CHANGED, f"{label}: the loss ignores the teacher ({loss0} vs {loss1})"
    assert _max_diff(grads1, grads0) > CHANGED * max(g.abs().max().item() for g in grads0.values()), (
        f"{label}: the student's gradient ignores the teacher"
    )

    # Each named module of the teacher alone: a target that reads an online module instead ignores its copy.
    for i, (name, _) in enumerate(_teacher_modules(method)):
        one = build()
        _perturb([dict(_teacher_modules(one))[name]], seed=20 + i)
        loss2, _ = _loss_and_grads(one, views)
        assert abs(loss2 - loss0).item() > CHANGED, f"{label}: the loss ignores {name} ({loss0} vs {loss2})"

    # EMA step from a teacher that differs from the student, after an optimiser step of the student.
    ema = build()
    _perturb([m for _, m in _teacher_modules(ema)], seed=30)
    _loss_and_grads(ema, views)
    torch.optim.SGD(list(_student_params(ema).values()), lr=0.1).step()
    old = {name: [p.detach().clone() for p in m.parameters()] for name, m in _teacher_modules(ema)}
    ema.on_train_step_end(STEP, MAX_STEPS)
    for t in ema.teacher_names:
        teacher = getattr(ema, t)
        tau = teacher.tau_at(STEP, MAX_STEPS)
        assert 0.0 < tau < 1.0, f"{label}: tau {tau} makes the EMA check vacuous"
        for name in teacher.names:
            student = list(getattr(ema, name).parameters())
            new = list(getattr(teacher, name).parameters())
            assert len(student) == len(new) == len(old[f"{t}.{name}"])
            for k, (pt, po, ps) in enumerate(zip(new, old[f"{t}.{name}"], student)):
                assert not torch.equal(po, ps.detach())  # teacher and student differed before the step
                torch.testing.assert_close(
                    pt, tau * po + (1 - tau) * ps.detach(), msg=f"{label}: {t}.{name} parameter {k} is not the EMA"
                )


TEACHER_CASES = [c for c in method_cases() if c.build().teacher_names]


def test_the_registry_declares_teachers() -> None:
    assert TEACHER_CASES, "no registered method declares a teacher: the teacher tests below test nothing"


@pytest.mark.parametrize("case", TEACHER_CASES, ids=lambda c: c.id)
def test_teacher_is_used_and_steps_by_ema(one_thread, case) -> None:
    check_teacher(lambda: case.build().train())


def test_planned_epoch_methods_run_through_the_helper(one_thread) -> None:
    """The generic check prepares planned epochs (``epoch_plan()``); no such method declares a teacher today, so this
    only shows the helper's path runs (and stays ready for one that does)."""
    planned = [n for n in available_methods() if _build(n).epoch_plan() is not None]
    for name in planned:
        method = _build(name)
        loss, grads = _loss_and_grads(method, _views(method))
        assert torch.isfinite(loss) and max(g.abs().max().item() for g in grads.values()) > 0


def test_generic_check_catches_an_online_target(one_thread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: BYOL's target through the ONLINE projector (teacher backbone, student projector)."""

    def buggy() -> Method:
        method = _build("BYOL")
        teacher = method.teacher
        monkeypatch.setattr(teacher, "forward", lambda x: method.projector(teacher.backbone(x)))
        return method

    with pytest.raises(AssertionError, match=r"ignores teacher\.projector"):
        check_teacher(buggy)


# ---------------------------------------------------------------------------------------- formulas, per method


def _named_grads(method: Method, names: Iterable[str]) -> dict[str, torch.Tensor]:
    params = dict(method.named_parameters())
    return {k: params[k].grad.detach().clone() for k in names}


def _method_loss_and_grads(method: Method, views: torch.Tensor, names, step: int = STEP):
    method.zero_grad(set_to_none=True)
    out = method.training_loss(_batch(views, step))
    out["loss"].backward()
    grads = _named_grads(method, names)
    method.zero_grad(set_to_none=True)
    return out["loss"].detach(), grads


def _assert_formula(method, loss, grads, expected, names, others: dict[str, torch.Tensor]) -> None:
    """``loss`` equals ``expected`` (a graph on the student), the gradients equal its gradients, and each of
    ``others`` (the formula with other targets) differs from it. Tolerances: the same float32 operations on the same
    inputs; assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) allow for reordered reductions only."""
    torch.testing.assert_close(loss, expected.detach())
    expected.backward()
    ref = _named_grads(method, names)
    for k in names:
        assert ref[k].abs().max() > CHANGED, f"{k}: a trivial gradient"
        torch.testing.assert_close(grads[k], ref[k], msg=f"gradient of {k} differs from the formula's")
    for what, value in others.items():
        assert abs(value - loss).item() > 1e-3, f"the loss equals the formula with {what} as the target"


def _perturbed_student(name: str, variant: str, modules: tuple[str, ...], **overrides) -> Method:
    """The tiny method with its student ``modules`` moved, so that teacher != student."""
    method = _build(name, variant, **overrides)
    _perturb([getattr(method, m) for m in modules], seed=40)
    return method


BYOL_GRADS = ("projector.3.weight", "predictor.3.weight", "predictor.0.weight", "backbone.layer1.0.conv1.weight")


def test_byol_formula_with_the_teacher_as_target(one_thread) -> None:
    """``byol_loss(p1, z2) + byol_loss(p2, z1)``, ``p = q(g(f(x)))`` student, ``z = g_ξ(f_ξ(x))`` teacher."""
    m = _perturbed_student("BYOL", "", ("backbone", "projector", "predictor"))
    views = _views(m)
    loss, grads = _method_loss_and_grads(m, views, BYOL_GRADS)
    x1, x2 = views[:, 0], views[:, 1]
    with torch.no_grad():
        z1, z2 = m.teacher.projector(m.teacher.backbone(x1)), m.teacher.projector(m.teacher.backbone(x2))
        y1, y2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))  # the student's own projections
        mixed1, mixed2 = m.projector(m.teacher.backbone(x1)), m.projector(m.teacher.backbone(x2))  # the planted bug
    p1, p2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    with torch.no_grad():
        others = {
            "student projections": byol_loss(p1, y2) + byol_loss(p2, y1),
            "online projector on the teacher backbone": byol_loss(p1, mixed2) + byol_loss(p2, mixed1),
        }
    _assert_formula(m, loss, grads, byol_loss(p1, z2) + byol_loss(p2, z1), BYOL_GRADS, others)


MEC_GRADS = ("projector.6.weight", "predictor.3.weight", "predictor.0.weight", "backbone.layer1.0.conv1.weight")
# ε² = 4 instead of the tiny config's 64: λm = d/ε² = 4 makes the series' higher orders (where λ acts) visible in the
# loss at the 1e-3 level; a 2-epoch warm-up of 5 steps each = 10 steps.
MEC_FORMULA = {"eps_sq": 4.0, "warmup_epochs": 2.0}


@pytest.mark.parametrize("step", [0, 4, 9, 20])
def test_mec_formula_with_the_teacher_as_target(one_thread, step: int) -> None:
    """``mec_loss(z1, z2, p1, p2, lamda_inv)``: student predictions ``z``, teacher projections ``p``; ``lamda_inv``
    warmed up per step linearly from ``8·m·ε²/d`` (step 0) to ``m·ε²/d`` (step ``warmup - 1``, the end point included
    as ``np.linspace``), ``warmup = warmup_epochs · steps_per_epoch``, then constant (step 20)."""
    m = _perturbed_student("MEC", "", ("backbone", "projector", "predictor"), **MEC_FORMULA)
    views = _views(m)
    loss, grads = _method_loss_and_grads(m, views, MEC_GRADS, step=step)
    base = B * m.eps_sq / m.dim  # m·ε²/d with m = B rows (not distributed)
    warmup = round(m.warmup_epochs * STEPS_PER_EPOCH)
    assert (base, warmup) == (2.0, 10)  # the numbers the steps above are chosen for
    lamda_inv = 8 * base + (base - 8 * base) * step / (warmup - 1) if step < warmup else base
    wrong = 8 * base if step >= warmup - 1 else base  # the warm-up skipped, or never finished
    x1, x2 = views[:, 0], views[:, 1]
    with torch.no_grad():
        p1, p2 = m.teacher(x1), m.teacher(x2)
        torch.testing.assert_close(p1, m.teacher.projector(m.teacher.backbone(x1)), rtol=0, atol=0)
        y1, y2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        mixed1, mixed2 = m.projector(m.teacher.backbone(x1)), m.projector(m.teacher.backbone(x2))
    z1, z2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    kw = dict(eps_sq=m.eps_sq, order=m.order, lamda_inv=lamda_inv)
    with torch.no_grad():
        others = {
            "student projections": mec_loss(z1, z2, y1, y2, **kw),
            "online projector on the teacher backbone": mec_loss(z1, z2, mixed1, mixed2, **kw),
            f"lamda_inv {wrong} instead of {lamda_inv:.3f}": mec_loss(z1, z2, p1, p2, **{**kw, "lamda_inv": wrong}),
        }
    _assert_formula(m, loss, grads, mec_loss(z1, z2, p1, p2, **kw), MEC_GRADS, others)


MMCR_GRADS = ("projector.3.weight", "projector.0.weight", "backbone.layer1.0.conv1.weight", "backbone.conv1.weight")


def test_mmcr_momentum_formula_with_the_teacher_branch(one_thread) -> None:
    """``mmcr_momentum_loss(z, z_ema)``: all ``B·V`` views in one pass (sample-major) through the student and the
    teacher, the centroid half student, half teacher."""
    m = _perturbed_student("MMCR", "momentum", ("backbone", "projector"))
    views = _views(m)
    b, v = views.shape[:2]
    loss, grads = _method_loss_and_grads(m, views, MMCR_GRADS)
    x = views.flatten(0, 1)
    with torch.no_grad():
        z_ema = m.teacher.projector(m.teacher.backbone(x)).view(b, v, -1)
        mixed = m.projector(m.teacher.backbone(x)).view(b, v, -1)
    z = m.projector(m.backbone(x)).view(b, v, -1)
    with torch.no_grad():
        others = {
            "student projections": mmcr_momentum_loss(z, z),
            "online projector on the teacher backbone": mmcr_momentum_loss(z, mixed),
        }
    _assert_formula(m, loss, grads, mmcr_momentum_loss(z, z_ema, m.lmbda), MMCR_GRADS, others)
