"""MEC, InfoNCE, BYOL losses and spectrum diagnostics: hand-derived values, invariances, dtypes, gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import (
    byol_loss,
    effective_rank,
    info_nce_loss,
    mec_lamda_inv,
    mec_loss,
    mec_warmup_lamda_inv,
    rankme,
    singular_values,
)
from selfsup.losses.mec import choose_form


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _forced(z1, z2, p1=None, p2=None, *, form, eps_sq=64.0, order=4, lamda_inv=None, return_parts=False):
    return mec_loss(
        z1, z2, p1, p2, eps_sq=eps_sq, order=order, lamda_inv=lamda_inv, return_parts=return_parts, form=form
    )


def _brutemec_loss(z1, z2, p1, p2, lamda_inv: float, order: int) -> float:
    """float64, the m×m form with explicit matrix powers, as OFF-MEC writes it."""

    def T(p, z):
        m = (F.normalize(p.double(), dim=1) @ F.normalize(z.double(), dim=1).T) / lamda_inv
        return sum((-1) ** (k + 1) * torch.trace(torch.linalg.matrix_power(m, k)) / k for k in range(1, order + 1))

    m = z1.shape[0]
    return float(-lamda_inv * (T(p1, z2) + T(p2, z1)) / (2 * m))


# ======================================================================== MEC: exact values


def test_mec_orthonormal_aligned_rows() -> None:
    # m = 4, d = 8, Z = P = first 4 rows of I_8 (rows rescaled: normalisation undoes it).
    # Defaults: lamda_inv = m ε²/d = 4·64/8 = 32, λ = 1/32. P̂Ẑᵀ = I_4, so
    # T = tr Σ_k (−1)^{k+1} (λ I)^k / k = 4 (λ − λ²/2 + λ³/3 − λ⁴/4) for both pairs,
    # mec = 2T / (2·4) = λ − λ²/2 + λ³/3 − λ⁴/4 = 0.0307716528...,
    # loss = −32·mec = −(1 − λ/2 + λ²/3 − λ³/4) = −(1 − 1/64 + 1/3072 − 1/131072) = −0.98469289144.
    eye = torch.eye(8)[:4]
    z = eye * torch.tensor([[2.0], [0.5], [3.0], [1.0]])
    lam = 1 / 32
    expected = -(1 - lam / 2 + lam**2 / 3 - lam**3 / 4)
    assert expected == pytest.approx(-0.98469289144, abs=1e-11)
    loss, parts = mec_loss(z, z, eye, eye, return_parts=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    mec = lam - lam**2 / 2 + lam**3 / 3 - lam**4 / 4
    assert parts["mec"].item() == pytest.approx(mec, rel=1e-6)
    assert parts["coding_length"].item() == pytest.approx((4 + 8) / 2 * mec, rel=1e-6)
    assert parts["lamda_inv"].item() == 32.0
    for v in parts.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    # Teacher omitted: the same student rows stand in, same value.
    assert mec_loss(z, z).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "m,d,eps_sq",
    [
        (6, 3, 3.0),  # lamda_inv = 6·3/3 = 6, x = λm = 1: loss = −(1 − 1/2 + 1/3 − 1/4) = −7/12
        (8, 32, 1.0),  # x = d/ε² = 32 (the OFF-MEC default ratio 2048/64): loss = +7865.67
        (16, 8, 64.0),  # x = 8/64 = 1/8
    ],
)
def test_mec_full_collapse(m: int, d: int, eps_sq: float) -> None:
    # Every row the same unit vector: P̂Ẑᵀ = 1 1ᵀ (all ones) has eigenvalues {m, 0, ...}, so
    # T = Σ_k (−1)^{k+1} (λm)^k / k, mec = T/m, loss = −(lamda_inv/m)·T = −(1 − x/2 + x²/3 − x³/4), x = λm.
    u = _rand(d, seed=3)
    z = u.expand(m, d).clone()
    lamda_inv = m * eps_sq / d
    x = m / lamda_inv
    assert x == pytest.approx(d / eps_sq)
    series = sum((-1) ** (k + 1) * x**k / k for k in range(1, 5))
    expected = -(lamda_inv / m) * series
    assert expected == pytest.approx(-(1 - x / 2 + x**2 / 3 - x**3 / 4), rel=1e-12)
    if (m, d) == (6, 3):
        assert expected == pytest.approx(-7 / 12, rel=1e-12)
    if d / eps_sq == 32:
        assert expected == pytest.approx(7865.6666667, rel=1e-9)  # collapse is heavily penalised
    for form in ("mm", "dd"):
        got = _forced(z, z, 2.0 * z, 0.1 * z, form=form, eps_sq=eps_sq).item()
        assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("m,d", [(5, 9), (9, 5), (6, 6), (12, 3)])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
def test_mec_mm_and_dd_forms_agree_with_brute_force(m: int, d: int, order: int) -> None:
    z1, z2, p1, p2 = (_rand(m, d, seed=s) for s in range(4))
    # Spectral radius of λP̂Ẑᵀ comparable to 1 so every order matters.
    lamda_inv = 0.7 * math.sqrt(m)
    ref = _brutemec_loss(z1, z2, p1, p2, lamda_inv, order)
    mm = _forced(z1, z2, p1, p2, form="mm", order=order, lamda_inv=lamda_inv).item()
    dd = _forced(z1, z2, p1, p2, form="dd", order=order, lamda_inv=lamda_inv).item()
    auto = mec_loss(z1, z2, p1, p2, order=order, lamda_inv=lamda_inv).item()
    assert mm == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert dd == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert auto == (mm if m <= d else dd)


def test_mec_automatic_form_is_the_smaller_matrix() -> None:
    assert choose_form(1024, 2048) == "mm"
    assert choose_form(4096, 512) == "dd"
    assert choose_form(64, 64) == "mm"


def test_mec_series_is_the_log_det_for_small_lambda() -> None:
    # High order, small radius: T(P, Z) -> log det(I + λP̂Ẑᵀ); checks the brute force and the maths together.
    z, p = _rand(6, 10, seed=1, dtype=torch.float64), _rand(6, 10, seed=2, dtype=torch.float64)
    lamda_inv = 20.0
    mat = F.normalize(p, dim=1) @ F.normalize(z, dim=1).T / lamda_inv
    logdet = torch.linalg.slogdet(torch.eye(6, dtype=torch.float64) + mat)[1].item()
    loss = mec_loss(z, z, p, p, order=12, lamda_inv=lamda_inv).item()
    assert loss == pytest.approx(-lamda_inv * logdet / 6, rel=1e-12)


@pytest.mark.parametrize("form", ["mm", "dd"])
@pytest.mark.parametrize("lamda_inv", [0.3, 20.0])
def test_mec_exact_log_det_in_both_forms(form: str, lamda_inv: float) -> None:
    # order=None is -lamda_inv/(2m)·[log|det(I_m + λP̂1Ẑ2ᵀ)| + log|det(I_m + λP̂2Ẑ1ᵀ)|], also outside the series' radius
    # (λ = 1/0.3): the d×d form gives the same value by Sylvester's determinant identity.
    m, d = (6, 10) if form == "mm" else (10, 6)
    z1, z2, p1, p2 = (_rand(m, d, seed=s, dtype=torch.float64) for s in range(20, 24))
    n = F.normalize

    def logdet(p, z):
        return torch.linalg.slogdet(torch.eye(m, dtype=torch.float64) + n(p, dim=1) @ n(z, dim=1).T / lamda_inv)[1]

    expected = -lamda_inv * (logdet(p1, z2) + logdet(p2, z1)) / (2 * m)
    got = _forced(z1, z2, p1, p2, form=form, order=None, lamda_inv=lamda_inv)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    z1.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: mec_loss(a, z2, p1, p2, order=None, lamda_inv=lamda_inv), (z1,))


def test_mec_rotated_low_rank_student_is_unbounded_for_the_series_not_for_the_log_det() -> None:
    # Teacher rows evenly on a circle in 2 of d dims, student rows the same circle turned by θ = 45°: P̂Ẑᵀ has the two
    # eigenvalues (m/2)e^{±iθ}; with x = λm/2, tr((λP̂Ẑᵀ)^k) = 2 x^k cos(kθ), so by hand
    #   order 4:  loss = -(2/(λm)) Σ_{k<=4} (-1)^{k+1} x^k cos(kθ)/k      (λm = 8: x = 4, loss = -12.936)
    #   exact:    loss = -(2/(λm)) log|1 + x e^{iθ}|                      (λm = 8: -0.390)
    # against about -1 for healthy, aligned, full-rank rows: the series rewards this degenerate solution.
    m, d, lam_m, theta = 256, 64, 8.0, math.pi / 4
    ang = torch.arange(m, dtype=torch.float64) * 2 * math.pi / m
    p, z = torch.zeros(m, d, dtype=torch.float64), torch.zeros(m, d, dtype=torch.float64)
    p[:, 0], p[:, 1] = ang.cos(), ang.sin()
    z[:, 0], z[:, 1] = (ang + theta).cos(), (ang + theta).sin()
    x = lam_m / 2
    series = -(2 / lam_m) * sum((-1) ** (k + 1) * x**k * math.cos(k * theta) / k for k in range(1, 5))
    exact = -(2 / lam_m) * math.log(abs(1 + x * complex(math.cos(theta), math.sin(theta))))
    assert series == pytest.approx(-12.936, abs=1e-3) and exact == pytest.approx(-0.390, abs=1e-3)
    assert mec_loss(z, z, p, p, order=4, lamda_inv=m / lam_m).item() == pytest.approx(series, rel=1e-9)
    assert mec_loss(z, z, p, p, order=None, lamda_inv=m / lam_m).item() == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("lamda_inv", [0.05, 1.0, 32.0, 1000.0])
def test_mec_order_one_is_minus_mean_cosine(lamda_inv: float) -> None:
    z1, z2, p1, p2 = (_rand(7, 5, seed=s) for s in range(10, 14))
    cos = lambda a, b: F.cosine_similarity(a, b, dim=1).mean()
    expected = -0.5 * (cos(p1, z2) + cos(p2, z1))
    got = mec_loss(z1, z2, p1, p2, order=1, lamda_inv=lamda_inv)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mec_default_lamda_inv_uses_rows_passed_in() -> None:
    z1, z2 = _rand(12, 6, seed=1), _rand(12, 6, seed=2)
    assert mec_lamda_inv(1024, 2048, 64.0) == 32.0
    _, parts = mec_loss(z1, z2, eps_sq=3.0, return_parts=True)
    assert parts["lamda_inv"].item() == pytest.approx(12 * 3.0 / 6)
    torch.testing.assert_close(mec_loss(z1, z2, eps_sq=3.0), mec_loss(z1, z2, lamda_inv=6.0))


def test_mec_invariances() -> None:
    z1, z2, p1, p2 = (_rand(6, 4, seed=s) for s in range(4))
    ref = mec_loss(z1, z2, p1, p2, lamda_inv=2.0)
    scale = torch.rand(6, 1) * 5 + 0.1
    torch.testing.assert_close(mec_loss(z1 * scale, z2, p1, p2 / scale, lamda_inv=2.0), ref)
    perm = torch.randperm(6)  # permuting the batch (pairs kept) does not change traces
    torch.testing.assert_close(mec_loss(z1[perm], z2[perm], p1[perm], p2[perm], lamda_inv=2.0), ref)
    # Swapping the views swaps the two pairs of the symmetrised objective.
    torch.testing.assert_close(mec_loss(z2, z1, p2, p1, lamda_inv=2.0), ref)


def test_mec_teacher_omitted_equals_teacher_equal_to_student() -> None:
    z1 = _rand(5, 7, seed=4).requires_grad_(True)
    z2 = _rand(5, 7, seed=5).requires_grad_(True)
    a = mec_loss(z1, z2, lamda_inv=1.5)
    ga = torch.autograd.grad(a, (z1, z2))
    b = mec_loss(z1, z2, z1, z2, lamda_inv=1.5)
    gb = torch.autograd.grad(b, (z1, z2))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


# ============================================================= MEC: gradients, dtypes, errors


@pytest.mark.parametrize("m,d", [(3, 5), (5, 3)])  # one case per automatic form
def test_mec_gradcheck_float64(m: int, d: int) -> None:
    inputs = tuple(_rand(m, d, seed=20 + s, dtype=torch.float64).requires_grad_(True) for s in range(4))
    fn = lambda z1, z2, p1, p2: mec_loss(z1, z2, p1, p2, lamda_inv=0.8)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
    fn_self = lambda z1, z2: mec_loss(z1, z2, eps_sq=2.0, order=5)
    assert torch.autograd.gradcheck(fn_self, inputs[:2], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mec_half_inputs_compute_in_fp32(dtype: torch.dtype) -> None:
    z1, z2, p1, p2 = (_rand(16, 8, seed=s) for s in range(4))
    half = [t.to(dtype) for t in (z1, z2, p1, p2)]
    out = mec_loss(*half, eps_sq=4.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mec_loss(*[t.float() for t in half], eps_sq=4.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, mec_loss(z1, z2, p1, p2, eps_sq=4.0), rtol=2e-2, atol=2e-2)


def test_mec_collapse_does_not_overflow_in_fp16() -> None:
    # At collapse with x = 32, tr(M⁴) = 32⁴ ≈ 1.05e6 > fp16 max: the fp32 inside keeps it finite.
    z = _rand(32, 1, seed=1).expand(32, 32).clone().half()
    out = mec_loss(z, z, eps_sq=1.0)
    assert torch.isfinite(out) and out.item() == pytest.approx(7865.6666667, rel=1e-5)


def test_mec_autocast_is_disabled_inside_and_float64_stays() -> None:
    z1, z2 = _rand(8, 16, seed=1), _rand(8, 16, seed=2)
    ref = mec_loss(z1, z2, eps_sq=8.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mec_loss(z1, z2, eps_sq=8.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert mec_loss(z1.double(), z2.double()).dtype == torch.float64


@pytest.mark.parametrize("name", ["z1", "z2", "p1", "p2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mec_non_finite_raises_naming_the_tensor(name: str, bad: float) -> None:
    t = {n: _rand(4, 3, seed=i) for i, n in enumerate(["z1", "z2", "p1", "p2"])}
    t[name][2, 1] = bad
    with pytest.raises(FloatingPointError, match=rf"^{name} contains NaN or Inf .*1 of 4 rows"):
        mec_loss(t["z1"], t["z2"], t["p1"], t["p2"])


def test_mec_argument_errors() -> None:
    z = _rand(4, 3)
    with pytest.raises(ValueError, match=r"same shape.*p2 \(4, 2\)"):
        mec_loss(z, z, z, _rand(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        mec_loss(z, _rand(5, 3))
    with pytest.raises(ValueError, match=r"\[rows, features\].*3-D"):
        mec_loss(z[None], z[None])
    with pytest.raises(ValueError, match="both teacher outputs"):
        mec_loss(z, z, z)
    with pytest.raises(ValueError, match="order"):
        mec_loss(z, z, order=0)
    with pytest.raises(ValueError, match="eps_sq"):
        mec_loss(z, z, eps_sq=0.0)
    with pytest.raises(ValueError, match="eps_sq"):
        mec_loss(z, z, eps_sq=-1.0)
    with pytest.raises(ValueError, match="lamda_inv"):
        mec_loss(z, z, lamda_inv=0.0)
    with pytest.raises(TypeError, match="floating"):
        mec_loss(z.long(), z.long())


# ==================================================================== MEC: warm-up schedule


@pytest.mark.parametrize("warmup_steps", [2, 5, 1250])
def test_mec_warmup_schedule(warmup_steps: int) -> None:
    lamda_inv = 32.0
    assert mec_warmup_lamda_inv(0, warmup_steps, lamda_inv) == 256.0  # 8·lamda_inv
    assert mec_warmup_lamda_inv(warmup_steps - 1, warmup_steps, lamda_inv) == 32.0
    for after in (warmup_steps, warmup_steps + 1, 10**6):
        assert mec_warmup_lamda_inv(after, warmup_steps, lamda_inv) == 32.0
    ref = np.linspace(8 * lamda_inv, lamda_inv, warmup_steps)
    got = [mec_warmup_lamda_inv(s, warmup_steps, lamda_inv) for s in range(warmup_steps)]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert all(a > b for a, b in itertools.pairwise(got))  # strictly decreasing


def test_mec_warmup_edge_cases() -> None:
    assert mec_warmup_lamda_inv(0, 0, 4.0) == 4.0  # no warm-up
    assert mec_warmup_lamda_inv(0, 1, 4.0) == 32.0  # np.linspace(32, 4, 1) == [32]
    assert mec_warmup_lamda_inv(1, 1, 4.0) == 4.0
    assert mec_warmup_lamda_inv(5, 11, 1.0) == pytest.approx(4.5)  # half way from 8 to 1
    with pytest.raises(ValueError):
        mec_warmup_lamda_inv(-1, 10, 4.0)


# ================================================================================= InfoNCE


def _brute_info_nce(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    u = [F.normalize(r.double(), dim=0) for r in torch.cat([z1, z2])]
    n, b = len(u), z1.shape[0]
    total = 0.0
    for a in range(n):
        pos = (a + b) % n
        denom = sum(math.exp(float(u[a] @ u[c]) / t) for c in range(n) if c != a)
        total += -math.log(math.exp(float(u[a] @ u[pos]) / t) / denom)
    return total / n


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 2.0])
def test_info_nce_hand_case(t: float) -> None:
    # B = 2, z1 = z2 = [e1; e2]. Anchor e1 (any of the 4): positive cosine 1, the two
    # other candidates (e2, e2) cosine 0 -> −log(e^{1/T} / (e^{1/T} + 2 e^0)) = log(1 + 2 e^{−1/T}).
    z = torch.eye(2)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert info_nce_loss(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if t == 0.5:
        assert expected == pytest.approx(0.2395447, abs=1e-6)  # log(1 + 2e^{-2})


def test_info_nce_temperature_divides_the_cosine() -> None:
    # B = 2, D = 4: z1 = [e1; e2], z2 = [c e1 + s e3; c e2 + s e4]. Every anchor has positive
    # cosine c and two negatives of cosine 0: loss = log(1 + 2 e^{−c/T}), a function of c/T only.
    def case(theta: float, t: float) -> float:
        c, s = math.cos(theta), math.sin(theta)
        z1 = torch.eye(4)[:2]
        z2 = torch.tensor([[c, 0, s, 0], [0, c, 0, s]])
        got = info_nce_loss(z1, z2, temperature=t).item()
        assert got == pytest.approx(math.log(1 + 2 * math.exp(-c / t)), rel=1e-5, abs=1e-6)  # fp32 logsumexp
        return got

    c1 = math.cos(0.4)
    t2 = 0.3
    theta2 = math.acos(c1 * t2 / 0.5)  # same c/T as (0.4, 0.5)
    assert case(0.4, 0.5) == pytest.approx(case(theta2, t2), rel=1e-5)
    assert case(0.4, 0.1) < case(0.4, 0.5)  # sharper temperature, aligned positives: lower loss


def test_info_nce_invariances_and_symmetry() -> None:
    z1, z2 = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    ref = info_nce_loss(z1, z2, 0.2)
    scale = torch.rand(6, 1) * 4 + 0.1
    torch.testing.assert_close(info_nce_loss(z1 * scale, z2 / scale, 0.2), ref)
    torch.testing.assert_close(info_nce_loss(z2, z1, 0.2), ref)
    perm = torch.randperm(6)
    torch.testing.assert_close(info_nce_loss(z1[perm], z2[perm], 0.2), ref)


@pytest.mark.parametrize("b,d,t", [(1, 3, 0.1), (5, 4, 0.1), (8, 16, 0.5), (3, 2, 1.5)])
def test_info_nce_matches_brute_force(b: int, d: int, t: float) -> None:
    z1, z2 = _rand(b, d, seed=b), _rand(b, d, seed=b + 100)
    assert info_nce_loss(z1, z2, temperature=t).item() == pytest.approx(_brute_info_nce(z1, z2, t), rel=1e-5)


def test_info_nce_dtypes_gradients_errors() -> None:
    z1, z2 = _rand(4, 6, seed=1), _rand(4, 6, seed=2)
    out = info_nce_loss(z1.half(), z2.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, info_nce_loss(z1.half().float(), z2.bfloat16().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(info_nce_loss(z1, z2), info_nce_loss(z1, z2), rtol=0, atol=0)
        assert info_nce_loss(z1, z2).dtype == torch.float32
    a, b = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: info_nce_loss(x, y, 0.3), (a, b), eps=1e-6, atol=1e-6)
    bad = z1.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="^z1 contains NaN"):
        info_nce_loss(bad, z2)
    with pytest.raises(FloatingPointError, match="^z2 contains NaN"):
        info_nce_loss(z2, bad)
    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(z1, z2[:3])
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z1, z2, temperature=0.0)


# ==================================================================================== BYOL


def test_byol_hand_values() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    same = p * torch.tensor([[5.0], [0.1], [2.0]])
    orth = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.2], [7.0, 0.0, 0.0]])
    assert byol_loss(p, same).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -same).item() == pytest.approx(4.0, abs=1e-6)
    assert byol_loss(p, orth).item() == pytest.approx(2.0, abs=1e-6)
    mixed = torch.stack([same[0], -same[1], orth[2]])  # 0, 4, 2 -> mean 2
    assert byol_loss(p, mixed).item() == pytest.approx(2.0, abs=1e-6)
    # At an angle θ: 2 − 2 cos θ.
    th = 0.7
    got = byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.cos(th), math.sin(th)]])).item()
    assert got == pytest.approx(2 - 2 * math.cos(th), abs=1e-6)


def test_byol_gradient_dtypes_errors() -> None:
    p = _rand(5, 4, seed=1, dtype=torch.float64).requires_grad_(True)
    z = _rand(5, 4, seed=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: byol_loss(x, z), (p,), eps=1e-6, atol=1e-6)
    ref = byol_loss(p.detach().float(), z.float())
    assert byol_loss(p.detach().half(), z.half()).dtype == torch.float32
    torch.testing.assert_close(byol_loss(p.detach().half(), z.half()), ref, rtol=1e-2, atol=1e-2)
    bad = z.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="^z contains NaN or Inf"):
        byol_loss(p, bad)
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(p, z[:, :3])


# ================================================================================ spectrum


def _directions(r: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows ±a·q_k for k < r, q_k orthonormal in R^d (random rotation), per-row scales a > 0.

    Column means are zero (each direction appears with both signs) and after row
    normalisation every direction has the same energy: r equal singular values sqrt(2).
    """
    q, _ = torch.linalg.qr(_rand(d, d, seed=seed, dtype=torch.float64))
    q = q.float()
    rows = []
    for k in range(r):
        rows += [(1 + k) * q[k], -(2 + k) * q[k]]
    return torch.stack(rows)


@pytest.mark.parametrize("r", [1, 2, 3, 5, 8])
def test_spectrum_rank_r_equal_energy(r: int) -> None:
    z = _directions(r)
    s = singular_values(z)
    assert s.shape == (min(z.shape),)
    torch.testing.assert_close(s[:r], torch.full((r,), math.sqrt(2.0)), rtol=1e-5, atol=1e-5)
    if r < len(s):
        assert s[r:].abs().max().item() < 1e-5
    assert effective_rank(z).item() == pytest.approx(r, rel=1e-5)
    n = len(s)
    # RankMe: p_k = 1/r + eps (r of them) and eps (n − r): exp(entropy), about r.
    eps = 1e-7
    p = [1 / r + eps] * r + [eps] * (n - r)
    expected = math.exp(-sum(x * math.log(x) for x in p))
    assert rankme(z, center=True, normalize=True).item() == pytest.approx(expected, rel=1e-4)
    # The paper's RankMe works on the raw rows: give it unit rows (already centred, equal energy).
    unit = F.normalize(z, dim=1)
    assert rankme(unit).item() == pytest.approx(expected, rel=1e-4)
    assert rankme(unit).item() == pytest.approx(r, rel=1e-4)
    if r > 1:
        assert rankme(z).item() < r  # raw rows of unequal lengths: less than r


def test_spectrum_unequal_energies_hand_value() -> None:
    # Rows 3 e1 and 4 e2, no preprocessing: s = (4, 3), p = (4/7, 3/7).
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    torch.testing.assert_close(singular_values(z, center=False, normalize=False), torch.tensor([4.0, 3.0]))
    h = -(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7))
    assert effective_rank(z, center=False, normalize=False).item() == pytest.approx(math.exp(h), rel=1e-6)
    assert rankme(z, eps=0.0).item() == pytest.approx(math.exp(h), rel=1e-6)
    # Normalised rows: equal energy, effective rank 2.
    assert effective_rank(z, center=False).item() == pytest.approx(2.0, rel=1e-6)


def test_spectrum_collapse() -> None:
    # Every row the same direction (different lengths): centring leaves rounding noise only.
    z = _rand(7, seed=5).expand(64, 7) * torch.linspace(0.5, 3.0, 64)[:, None]
    assert effective_rank(z).item() == 0.0
    assert effective_rank(z, center=False).item() == pytest.approx(1.0, abs=1e-5)
    assert rankme(z).item() == pytest.approx(1.0, abs=1e-4)
    assert rankme(torch.zeros(4, 3)).item() == pytest.approx(1.0, abs=1e-4)  # no NaN


def test_spectrum_no_grad_dtypes_errors() -> None:
    z = _rand(16, 6, seed=2).requires_grad_(True)
    for out in (singular_values(z), effective_rank(z), rankme(z)):
        assert not out.requires_grad and out.dtype == torch.float32
    assert effective_rank(z.detach().half()).dtype == torch.float32
    assert effective_rank(z.detach().double()).dtype == torch.float64
    assert 1.0 < effective_rank(z).item() <= 6.0
    # Random rotations do not change the spectrum.
    q, _ = torch.linalg.qr(_rand(6, 6, seed=3))
    assert effective_rank(z @ q).item() == pytest.approx(effective_rank(z).item(), rel=1e-4)
    bad = z.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="^z contains NaN"):
        effective_rank(bad)
