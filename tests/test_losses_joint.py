"""VICReg, Barlow Twins, MoCo v3 and SimSiam losses: hand-derived values, float64 references written from the
formulas, gradients (gradcheck, stop-gradients), input errors, dtypes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from selfsup.losses.barlow_twins import barlow_twins_loss
from selfsup.losses.moco_v3 import moco_v3_loss
from selfsup.losses.simsiam import simsiam_loss
from selfsup.losses.vicreg import vicreg_loss


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ======================================================================== VICReg: exact values


def test_vicreg_anti_parallel_rows_covariance_only() -> None:
    # z1 = z2 = [[1, 1], [−1, −1]]: mean 0, unbiased variance (1 + 1)/(2 − 1) = 2 per feature, std = sqrt(2 + 1e-4) > 1,
    # so relu(1 − std) = 0. C = zᵀz / (N − 1) = [[2, 2], [2, 2]]: off-diagonal squares 4 + 4 = 8, / D = 2 -> 4 per
    # branch, 8 for both. Invariance 0. loss = 1 · 8.
    z = _t([[1, 1], [-1, -1]])
    loss, parts = vicreg_loss(z, z, return_parts=True)
    assert loss.item() == pytest.approx(8.0, rel=1e-6)
    assert parts["invariance"].item() == 0.0
    assert parts["variance"].item() == 0.0
    assert parts["covariance"].item() == pytest.approx(8.0, rel=1e-6)
    for v in parts.values():
        assert v.dim() == 0 and not v.requires_grad


def test_vicreg_invariance_on_raw_rows_and_centring() -> None:
    # z1 = [[1, 1], [−1, −1]] + [3, 0] = [[4, 1], [2, −1]], z2 = [[1, −1], [−1, 1]].
    # inv = mean of squared differences [3, 2], [3, −2] = (9 + 4 + 9 + 4)/4 = 6.5 (the shift counts: MSE on raw rows).
    # Centred z1 = [[1, 1], [−1, −1]] (the shift is gone): std > 1, off-diagonal term 4 (as above).
    # z2: C = [[2, −2], [−2, 2]] -> (4 + 4)/2 = 4; std > 1. loss = 25 · 6.5 + 25 · 0 + 1 · 8 = 170.5.
    z1, z2 = _t([[4, 1], [2, -1]]), _t([[1, -1], [-1, 1]])
    loss, parts = vicreg_loss(z1, z2, return_parts=True)
    assert loss.item() == pytest.approx(170.5, rel=1e-6)
    assert parts["invariance"].item() == pytest.approx(6.5, rel=1e-6)
    assert parts["covariance"].item() == pytest.approx(8.0, rel=1e-6)
    # Coefficients weight the unweighted parts: 1 · 6.5 + 2 · 0 + 3 · 8 = 30.5.
    assert vicreg_loss(z1, z2, sim_coeff=1, std_coeff=2, cov_coeff=3).item() == pytest.approx(30.5, rel=1e-6)


def test_vicreg_rows_plus_minus_e_k() -> None:
    # Rows e1, −e1, e2, −e2 (N = 4, D = 2): column means 0, unbiased variance (1 + 1)/3 = 2/3, std s = sqrt(2/3 + 1e-4)
    # < 1: variance term 1 − s per feature and branch (½ + ½ of it = 1 − s). Σ_n x_n1 x_n2 = 0: covariance 0.
    # loss = 25 (1 − s) = 4.5860546...
    e = _t([[1, 0], [-1, 0], [0, 1], [0, -1]])
    s = math.sqrt(2 / 3 + 1e-4)
    loss, parts = vicreg_loss(e, e, return_parts=True)
    assert loss.item() == pytest.approx(25 * (1 - s), rel=1e-6)
    assert 25 * (1 - s) == pytest.approx(4.5860546, abs=1e-7)
    assert parts["variance"].item() == pytest.approx(1 - s, rel=1e-6)
    assert parts["covariance"].item() == 0.0
    # Rows ±2e_k: variance 8/3 -> std > 1 and everything vanishes.
    assert vicreg_loss(2 * e, 2 * e).item() == 0.0
    # z1 = ±e_k, z2 = ±2e_k: inv = four differences of 1 over 8 entries = 0.5; variance ½ (1 − s) + ½ · 0 (each
    # branch counts half, as the official "/ 2" each); covariance 0. loss = 25 · 0.5 + 25 · (1 − s)/2.
    loss, parts = vicreg_loss(e, 2 * e, return_parts=True)
    assert parts["variance"].item() == pytest.approx((1 - s) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(12.5 + 12.5 * (1 - s), rel=1e-6)


def test_vicreg_full_collapse() -> None:
    # Every row the same vector: centred rows are 0, std = sqrt(0 + 1e-4) = 0.01, variance term 0.99 per branch
    # (average 0.99), covariance 0, invariance 0: loss = 25 · 0.99 = 24.75.
    z = _rand(3, seed=1).expand(5, 3).clone()
    loss, parts = vicreg_loss(z, z, return_parts=True)
    assert loss.item() == pytest.approx(24.75, rel=1e-5)
    assert parts["covariance"].item() == pytest.approx(0.0, abs=1e-10)


def _vicreg_reference(z1: torch.Tensor, z2: torch.Tensor, lam=25.0, mu=25.0, nu=1.0, eps=1e-4) -> float:
    """float64, explicit sums over rows and feature pairs, written from the formula."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    inv = sum(float((z1[i, j] - z2[i, j]) ** 2) for i in range(n) for j in range(d)) / (n * d)
    var, cov = 0.0, 0.0
    for z in (z1, z2):
        m = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        x = [[float(z[i, j]) - m[j] for j in range(d)] for i in range(n)]
        for j in range(d):
            std = math.sqrt(sum(x[i][j] ** 2 for i in range(n)) / (n - 1) + eps)
            var += 0.5 * max(0.0, 1 - std) / d
        for a in range(d):
            for b in range(d):
                if a != b:
                    cov += (sum(x[i][a] * x[i][b] for i in range(n)) / (n - 1)) ** 2 / d
    return lam * inv + mu * var + nu * cov


@pytest.mark.parametrize("scale", [0.4, 1.0, 3.0])  # std mostly below 1, around 1, above 1
def test_vicreg_random_against_reference(scale: float) -> None:
    z1, z2 = scale * _rand(10, 6, seed=2, dtype=torch.float64), scale * _rand(10, 6, seed=3, dtype=torch.float64)
    z1 = z1 + 0.5 * torch.linspace(0, 1, 6, dtype=torch.float64)  # a per-feature offset: centring matters
    got = vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.7)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_vicreg_reference(z1, z2, 2.0, 3.0, 0.7), rel=1e-12)
    assert vicreg_loss(z1.float(), z2.float()).item() == pytest.approx(_vicreg_reference(z1, z2), rel=1e-5)


def test_vicreg_gradcheck_float64() -> None:
    # 0.5 · randn: every std below 1, away from the relu kink; both inputs get gradients.
    z1 = (0.5 * _rand(6, 4, seed=4, dtype=torch.float64)).requires_grad_()
    z2 = (0.5 * _rand(6, 4, seed=5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b), (z1, z2), eps=1e-6, atol=1e-6)


def test_vicreg_errors() -> None:
    z = _rand(4, 3)
    with pytest.raises(ValueError, match="z1 must have shape"):
        vicreg_loss(z[0], z)
    with pytest.raises(ValueError, match="must all have the same shape"):
        vicreg_loss(z, _rand(4, 2))
    with pytest.raises(FloatingPointError, match="z2 contains NaN"):
        vicreg_loss(z, torch.full_like(z, float("nan")))
    with pytest.raises(ValueError, match="N >= 2"):
        vicreg_loss(z[:1], z[:1])
    with pytest.raises(TypeError, match="floating"):
        vicreg_loss(z.long(), z.long())


# ======================================================================== Barlow Twins: exact values

# Columns a = [1, 1, −1, −1] and b = [1, −1, 1, −1]: mean 0, biased variance 1, a · b = 0.
_A = [1.0, 1.0, -1.0, -1.0]
_B = [1.0, -1.0, 1.0, -1.0]


def _cols(*cols: list[float]) -> torch.Tensor:
    return torch.tensor(cols, dtype=torch.float32).T.contiguous()


def test_barlow_twins_identity_correlation_gives_zero() -> None:
    # z1 = z2 = [a, b]: bn leaves them as they are (eps = 0), c = zᵀz / 4 = I -> loss 0.
    z = _cols(_A, _B)
    assert barlow_twins_loss(z, z, eps=0.0).item() == 0.0
    # Default eps: bn divides by sqrt(1 + 1e-5) on each side, c = I / (1 + 1e-5): loss = 2 (1/(1 + 1e-5) − 1)².
    expected = 2 * (1 / (1 + 1e-5) - 1) ** 2
    assert barlow_twins_loss(z, z).item() == pytest.approx(expected, rel=1e-3)
    # Per-feature affine maps of one branch are undone by the batch normalisation.
    z1 = z * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -2.0])
    assert barlow_twins_loss(z1, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-10)


def test_barlow_twins_known_off_diagonals() -> None:
    lam = 0.0051
    z1 = _cols(_A, _B)
    # z2 = [a, a]: c = [[a·a, a·a], [b·a, b·a]] / 4 = [[1, 1], [0, 0]]: on = 0 + 1, off = 1² + 0² -> 1 + λ.
    loss, parts = barlow_twins_loss(z1, _cols(_A, _A), eps=0.0, return_parts=True)
    assert loss.item() == pytest.approx(1 + lam, rel=1e-6)
    assert parts["on_diag"].item() == pytest.approx(1.0) and parts["off_diag"].item() == pytest.approx(1.0)
    # z2 = [b, a] (features swapped): c = [[0, 1], [1, 0]]: on = 2, off = 2 -> 2 + 2λ.
    assert barlow_twins_loss(z1, _cols(_B, _A), eps=0.0).item() == pytest.approx(2 + 2 * lam, rel=1e-6)
    # z2 = −z1: c = −I: on = 2 · (−1 − 1)² = 8 = 4D, off 0.
    assert barlow_twins_loss(z1, -z1, eps=0.0).item() == pytest.approx(8.0, rel=1e-6)
    # z2 = [a, (a + b)/√2]: the second column is [√2, 0, 0, −√2], mean 0, biased variance 1, and correlates 1/√2 with
    # a and b. c = [[1, 1/√2], [0, 1/√2]]: on = (1/√2 − 1)², off = 1/2 -> (1 − 1/√2)² + λ/2 = 0.0883364...
    r = 1 / math.sqrt(2)
    z2 = _cols(_A, [r * (x + y) for x, y in zip(_A, _B)])
    loss, parts = barlow_twins_loss(z1, z2, eps=0.0, return_parts=True)
    assert loss.item() == pytest.approx((1 - r) ** 2 + lam / 2, rel=1e-6)
    assert parts["off_diag"].item() == pytest.approx(0.5, rel=1e-6)
    assert barlow_twins_loss(z1, z2, lambd=1.0, eps=0.0).item() == pytest.approx((1 - r) ** 2 + 0.5, rel=1e-6)


def _barlow_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> float:
    """float64, explicit sums, written from the formula."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape

    def bn(z: torch.Tensor) -> list[list[float]]:
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mu = sum(float(z[i, j]) for i in range(n)) / n
            var = sum((float(z[i, j]) - mu) ** 2 for i in range(n)) / n
            for i in range(n):
                out[i][j] = (float(z[i, j]) - mu) / math.sqrt(var + eps)
        return out

    a, b = bn(z1), bn(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (c - 1) ** 2 if i == j else lambd * c**2
    return loss


def test_barlow_twins_random_against_reference() -> None:
    z1 = 2.0 * _rand(9, 5, seed=6, dtype=torch.float64) + 1.0
    z2 = z1 + _rand(9, 5, seed=7, dtype=torch.float64)  # correlated views
    got = barlow_twins_loss(z1, z2, lambd=0.3, eps=1e-3)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_barlow_reference(z1, z2, 0.3, 1e-3), rel=1e-12)
    assert barlow_twins_loss(z1.float(), z2.float()).item() == pytest.approx(_barlow_reference(z1, z2), rel=1e-5)


def test_barlow_twins_matches_batchnorm1d_train_mode() -> None:
    # bn is BatchNorm1d(affine=False) in train mode: the same c through the torch module.
    z1, z2 = _rand(7, 4, seed=8, dtype=torch.float64), _rand(7, 4, seed=9, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(4, affine=False).double().train()
    c = bn(z1).T @ bn(z2) / 7
    off = c - torch.diag(torch.diagonal(c))
    expected = ((torch.diagonal(c) - 1) ** 2).sum() + 0.0051 * (off**2).sum()
    torch.testing.assert_close(barlow_twins_loss(z1, z2), expected, rtol=1e-12, atol=1e-12)


def test_barlow_twins_gradcheck_float64() -> None:
    z1 = _rand(6, 3, seed=10, dtype=torch.float64).requires_grad_()
    z2 = _rand(6, 3, seed=11, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, lambd=0.5), (z1, z2), eps=1e-6, atol=1e-6)


def test_barlow_twins_errors() -> None:
    z = _rand(4, 3)
    with pytest.raises(ValueError, match="z2 must have shape"):
        barlow_twins_loss(z, z[None])
    with pytest.raises(ValueError, match="must all have the same shape"):
        barlow_twins_loss(z, _rand(5, 3))
    with pytest.raises(FloatingPointError, match="z1 contains NaN"):
        barlow_twins_loss(torch.full_like(z, float("inf")), z)
    with pytest.raises(ValueError, match="N >= 2"):
        barlow_twins_loss(z[:1], z[:1])


# ======================================================================== MoCo v3: exact values

TAU = 0.2


def test_moco_v3_orthogonal_rows() -> None:
    # q1 = q2 = k1 = k2 = [e1; e2] (rows rescaled: normalisation undoes it). Logits I / τ; the positive of each row
    # is on the diagonal: −log(e^{1/τ} / (e^{1/τ} + e^0)) = log(1 + e^{−1/τ}). ctr = 2τ log(1 + e^{−1/τ}), two
    # directions: loss = 4τ log(1 + e^{−1/τ}) = 0.8 log(1 + e^{−5}) = 0.0053722788...
    q = _t([[2, 0], [0, 0.5]])
    expected = 4 * TAU * math.log(1 + math.exp(-1 / TAU))
    assert expected == pytest.approx(0.0053722788, abs=1e-10)
    loss, parts = moco_v3_loss(q, q, 3 * q, q, return_parts=True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ctr_q1_k2"].item() == pytest.approx(expected / 2, rel=1e-5)
    # Keys of view 2 swapped, k2 = [e2; e1]: the positive logit is 0 and the negative 1/τ:
    # ctr(q1, k2) = 2τ log(1 + e^{1/τ}) = 0.4 log(1 + e^5) = 2.0026861...; ctr(q2, k1) as before.
    e = torch.eye(2)
    loss, parts = moco_v3_loss(e, e, e, e.flip(0), return_parts=True)
    assert parts["ctr_q1_k2"].item() == pytest.approx(2 * TAU * math.log(1 + math.exp(1 / TAU)), rel=1e-6)
    assert parts["ctr_q2_k1"].item() == pytest.approx(expected / 2, rel=1e-5)
    # Temperature 1 (the official ResNet default): 4 log(1 + e^{−1}).
    assert moco_v3_loss(e, e, e, e, temperature=1.0).item() == pytest.approx(4 * math.log(1 + math.exp(-1)), rel=1e-6)


def test_moco_v3_offset_by_hand() -> None:
    # M = 4 keys k = I_4 (gathered from two ranks of N = 2), queries of rank 1 q = [e3; e4], offset 2: each query
    # meets its positive (logit 1/τ) and three orthogonal keys (logit 0): CE = log(1 + 3 e^{−1/τ});
    # loss = 2 · 2τ · log(1 + 3 e^{−1/τ}).
    k = torch.eye(4)
    q = k[2:]
    expected = 4 * TAU * math.log(1 + 3 * math.exp(-1 / TAU))
    assert moco_v3_loss(q, q, k, k, offset=2).item() == pytest.approx(expected, rel=1e-5)
    assert moco_v3_loss(k[:2], k[:2], k, k).item() == pytest.approx(expected, rel=1e-5)  # rank 0, offset 0
    # Offset 1 points both queries at an orthogonal key (logit 0) while their own key (1/τ) is a negative:
    # CE = log(3 + e^{1/τ}) − 0.
    expected = 4 * TAU * math.log(3 + math.exp(1 / TAU))
    assert moco_v3_loss(q, q, k, k, offset=1).item() == pytest.approx(expected, rel=1e-6)


def _moco_rows_reference(q: torch.Tensor, k: torch.Tensor, offset: int, tau: float) -> list[float]:
    """float64 per-query cross-entropies (explicit log-sum-exp over the keys), before the 2τ factor."""
    out = []
    for i in range(q.shape[0]):
        qi = q[i].double() / q[i].double().norm()
        s = [float(qi @ (k[m].double() / k[m].double().norm())) / tau for m in range(k.shape[0])]
        top = max(s)
        out.append(top + math.log(sum(math.exp(x - top) for x in s)) - s[offset + i])
    return out


def test_moco_v3_random_against_reference_and_offsets() -> None:
    n, w, d, tau = 4, 2, 5, 0.3
    q1, q2 = _rand(n * w, d, seed=12, dtype=torch.float64), _rand(n * w, d, seed=13, dtype=torch.float64)
    k1, k2 = q1 + 0.3 * _rand(n * w, d, seed=14), q2 + 0.3 * _rand(n * w, d, seed=15)  # float32 keys: upcast
    rows_12 = _moco_rows_reference(q1, k2, 0, tau)
    rows_21 = _moco_rows_reference(q2, k1, 0, tau)
    full = moco_v3_loss(q1, q2, k1, k2, temperature=tau)
    assert full.dtype == torch.float64
    assert full.item() == pytest.approx(2 * tau * (sum(rows_12) + sum(rows_21)) / (n * w), rel=1e-12)
    per_rank = []
    for r in range(w):  # rank r: its own queries, every key, offset r · n
        sl = slice(r * n, (r + 1) * n)
        got = moco_v3_loss(q1[sl], q2[sl], k1, k2, temperature=tau, offset=r * n)
        # = the single-process value restricted to the rank's rows ...
        assert got.item() == pytest.approx(2 * tau * (sum(rows_12[sl]) + sum(rows_21[sl])) / n, rel=1e-12)
        # ... = the reference with the offset labels.
        local = _moco_rows_reference(q1[sl], k2, r * n, tau) + _moco_rows_reference(q2[sl], k1, r * n, tau)
        assert got.item() == pytest.approx(2 * tau * sum(local) / n, rel=1e-12)
        per_rank.append(got)
    # The mean over ranks of the local losses is the single-process loss of the global batch (what DDP optimises).
    assert (sum(per_rank) / w).item() == pytest.approx(full.item(), rel=1e-12)


def test_moco_v3_no_gradient_reaches_keys_and_gradcheck() -> None:
    q1 = _rand(3, 4, seed=16, dtype=torch.float64).requires_grad_()
    q2 = _rand(3, 4, seed=17, dtype=torch.float64).requires_grad_()
    k1 = _rand(5, 4, seed=18, dtype=torch.float64).requires_grad_()
    k2 = _rand(5, 4, seed=19, dtype=torch.float64).requires_grad_()
    moco_v3_loss(q1, q2, k1, k2, offset=2).backward()
    assert k1.grad is None and k2.grad is None
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    assert not moco_v3_loss(q1.detach(), q2.detach(), k1, k2).requires_grad  # keys alone: no graph
    fn = lambda a, b: moco_v3_loss(a, b, k1.detach(), k2.detach(), temperature=0.5, offset=1)
    assert torch.autograd.gradcheck(fn, (q1, q2), eps=1e-6, atol=1e-6)


def test_moco_v3_errors() -> None:
    q, k = _rand(2, 3), _rand(4, 3)
    with pytest.raises(ValueError, match="offset must be in"):
        moco_v3_loss(q, q, k, k, offset=3)
    with pytest.raises(ValueError, match="offset must be in"):
        moco_v3_loss(q, q, k, k, offset=-1)
    with pytest.raises(ValueError, match="offset must be in"):
        moco_v3_loss(k, k, q, q)  # M < N
    with pytest.raises(TypeError, match="offset must be an int"):
        moco_v3_loss(q, q, k, k, offset=1.0)
    with pytest.raises(ValueError, match="same width D"):
        moco_v3_loss(q, q, _rand(4, 5), _rand(4, 5))
    with pytest.raises(ValueError, match="must all have the same shape"):
        moco_v3_loss(q, q, k, k[:3])
    with pytest.raises(ValueError, match="must all have the same shape"):
        moco_v3_loss(q, q[:1], k, k)
    with pytest.raises(ValueError, match="k1 must have shape"):
        moco_v3_loss(q, q, k[0], k)
    with pytest.raises(FloatingPointError, match="k2 contains NaN"):
        moco_v3_loss(q, q, k, torch.full_like(k, float("nan")))
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_loss(q, q, k, k, temperature=0.0)


# ======================================================================== SimSiam: exact values


def test_simsiam_known_cosines() -> None:
    # cos(p1_i, z2_i): [1, 0]·[2, 0] -> 1; [1, 1]·[0, 3] -> 3 / (√2 · 3) = 1/√2; mean (1 + 1/√2)/2.
    # cos(p2_i, z1_i): [0, 1]·[0, 2] -> 1; [−1, 0]·[1, 0] -> −1; mean 0.
    # loss = −((1 + 1/√2)/2 + 0)/2 = −(1 + 1/√2)/4 = −0.4267766952...
    p1, z2 = _t([[1, 0], [1, 1]]), _t([[2, 0], [0, 3]])
    p2, z1 = _t([[0, 1], [-1, 0]]), _t([[0, 2], [1, 0]])
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 4, rel=1e-6)
    e = torch.eye(3)
    assert simsiam_loss(e, e, 2 * e, e).item() == pytest.approx(-1.0)  # aligned
    assert simsiam_loss(e, e, -e, -e).item() == pytest.approx(1.0)  # opposite
    assert simsiam_loss(e, e, e.roll(1, 0), e.roll(1, 0)).item() == pytest.approx(0.0)  # orthogonal


def test_simsiam_random_against_reference() -> None:
    p1, p2, z1, z2 = (_rand(6, 4, seed=s, dtype=torch.float64) for s in (20, 21, 22, 23))

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(sum(a[j] * b[j] for j in range(len(a))) / math.sqrt(float((a * a).sum() * (b * b).sum())))

    expected = -(sum(cos(p1[i], z2[i]) for i in range(6)) / 6 + sum(cos(p2[i], z1[i]) for i in range(6)) / 6) / 2
    got = simsiam_loss(p1, p2, z1, z2)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, rel=1e-12)
    # The official criterion: nn.CosineSimilarity(dim=1), −(mean + mean) · 0.5.
    cs = torch.nn.CosineSimilarity(dim=1)
    torch.testing.assert_close(got, -(cs(p1, z2).mean() + cs(p2, z1).mean()) * 0.5, rtol=1e-12, atol=1e-12)


def test_simsiam_stop_gradient_and_gradcheck() -> None:
    p1, p2, z1, z2 = (_rand(4, 3, seed=s, dtype=torch.float64).requires_grad_() for s in (24, 25, 26, 27))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert not simsiam_loss(p1.detach(), p2.detach(), z1, z2).requires_grad
    fn = lambda a, b: simsiam_loss(a, b, z1.detach(), z2.detach())
    assert torch.autograd.gradcheck(fn, (p1, p2), eps=1e-6, atol=1e-6)


def test_simsiam_errors() -> None:
    x = _rand(4, 3)
    with pytest.raises(ValueError, match="p2 must have shape"):
        simsiam_loss(x, x[None], x, x)
    with pytest.raises(ValueError, match="must all have the same shape"):
        simsiam_loss(x, x, x, _rand(4, 2))
    with pytest.raises(FloatingPointError, match="z1 contains NaN"):
        simsiam_loss(x, x, torch.full_like(x, float("nan")), x)


# ======================================================================== all four: dtypes and autocast

_CASES: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
    "vicreg": (vicreg_loss, 2),
    "barlow_twins": (barlow_twins_loss, 2),
    "moco_v3": (moco_v3_loss, 4),
    "simsiam": (simsiam_loss, 4),
}


def _inputs(name: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    _, k = _CASES[name]
    return [_rand(8, 6, seed=30 + i).to(dtype) for i in range(k)]


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    fn, _ = _CASES[name]
    xs = _inputs(name, dtype)
    out = fn(*xs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(*(x.float() for x in xs)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(_CASES))
def test_autocast_disabled_inside_and_float64_stays(name: str) -> None:
    fn, _ = _CASES[name]
    xs = _inputs(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*xs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(*xs), rtol=1e-6, atol=1e-6)
    assert fn(*(x.double() for x in xs)).dtype == torch.float64
