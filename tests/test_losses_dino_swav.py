"""DINO and SwAV losses and SwAV's Sinkhorn-Knopp: hand-derived values, pairings and averaging counts, gradients,
float64 reference loops written from the official formulas, input errors, dtypes.

Hand values use ``ln 2 = 0.69314718056`` and, for a two-way distribution ``(3/4, 1/4)``:
``H(3/4, 1/4) = −(3/4 ln 3/4 + 1/4 ln 1/4) = 0.56233514459`` (its entropy) and
``CE((1/2, 1/2), (3/4, 1/4)) = −(1/2 ln 3/4 + 1/2 ln 1/4) = (ln 4/3 + ln 4)/2 = 0.83698821679``.
A logit pair ``[τ ln 3, 0]`` divided by ``τ`` is ``[ln 3, 0]``, whose softmax is ``(3/4, 1/4)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses.dino import dino_batch_mean, dino_center_update, dino_loss
from selfsup.losses.swav import sinkhorn_knopp, swav_loss

LN2 = math.log(2)
LN3 = math.log(3)
H_31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.56233514459
CE_UNIFORM_31 = (math.log(4 / 3) + math.log(4)) / 2  # 0.83698821679


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _pair(x: float) -> list[float]:
    """Logits ``[x, 0]``."""
    return [x, 0.0]


# ================================================================================ DINO: reference loop


def _dino_reference(student, teacher, center, student_temp=0.1, teacher_temp=0.04) -> torch.Tensor:
    """float64, ``DINOLoss.forward`` written out: view-major chunks, the (iq, v) loop, skip v == iq, n_loss_terms."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    s_chunks = [student[:, v] / student_temp for v in range(student.shape[1])]
    t_chunks = [F.softmax((teacher[:, i] - center) / teacher_temp, dim=-1) for i in range(teacher.shape[1])]
    total, n_terms = 0.0, 0
    for iq, q in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


# ================================================================================ DINO: values by hand


def test_dino_hand_case_k2() -> None:
    # B = 1, Vt = Vs = 2, K = 2, centre 0, τs = 0.1, τt = 0.04.
    # teacher view 0 [0.04 ln 3, 0] / 0.04 = [ln 3, 0] -> t0 = (3/4, 1/4); teacher view 1 [0, 0] -> t1 = (1/2, 1/2).
    # student view 0 [0, 0] -> s0 = (1/2, 1/2); student view 1 [0.1 ln 3, 0] / 0.1 -> s1 = (3/4, 1/4).
    # pairs (i, v≠i): (0, 1): −(3/4 ln 3/4 + 1/4 ln 1/4) = H(3/4, 1/4) = 0.56233514
    #                 (1, 0): −(1/2 ln 1/2 + 1/2 ln 1/2) = ln 2          = 0.69314718
    # loss = (0.56233514 + 0.69314718) / 2 = 0.62774116.
    teacher = torch.tensor([[_pair(0.04 * LN3), _pair(0.0)]])
    student = torch.tensor([[_pair(0.0), _pair(0.1 * LN3)]])
    loss = dino_loss(student, teacher, torch.zeros(2))
    assert loss.item() == pytest.approx((H_31 + LN2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.62774116, abs=1e-6)
    # Pairing teacher view i with student view i instead would give
    # (0, 0): −(3/4 + 1/4) ln 1/2 = ln 2, (1, 1): CE((1/2, 1/2), (3/4, 1/4)) = 0.83698822; mean 0.76506770.
    assert abs(loss.item() - (LN2 + CE_UNIFORM_31) / 2) > 0.1


def test_dino_teacher_view_i_is_not_paired_with_student_view_i() -> None:
    # Vt = 1, Vs = 2: the only pair is (teacher 0, student 1); student view 0 does not enter the loss.
    teacher = _rand(3, 1, 5, seed=1)
    student = _rand(3, 2, 5, seed=2).requires_grad_(True)
    loss = dino_loss(student, teacher, torch.zeros(5))
    loss.backward()
    assert torch.all(student.grad[:, 0] == 0) and student.grad[:, 1].abs().sum() > 0
    moved = student.detach().clone()
    moved[:, 0] += 7.0 * _rand(3, 5, seed=3)
    assert dino_loss(moved, teacher, torch.zeros(5)).item() == loss.item()
    # Vt = Vs = 2: ∂loss/∂student_view0 = (1/n_terms)(1/B)(softmax(s0/τs) − t1)/τs involves teacher view 1 only.
    teacher2 = _rand(3, 2, 5, seed=4)
    student2 = _rand(3, 2, 5, seed=5).requires_grad_(True)
    dino_loss(student2, teacher2, torch.zeros(5)).backward()
    t1 = F.softmax(teacher2[:, 1] / 0.04, dim=-1)
    expected = (F.softmax(student2.detach()[:, 0] / 0.1, dim=-1) - t1) / 0.1 / (2 * 3)
    torch.testing.assert_close(student2.grad[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_dino_pair_count_vt2_vs4() -> None:
    # Both teacher views uniform ([0, 0] -> (1/2, 1/2)); student views 0, 1 [0, 0] -> CE c = ln 2,
    # student views 2, 3 [0.1 ln 3, 0] -> (3/4, 1/4), CE c = 0.83698822.
    # Pairs: i = 0 with v ∈ {1, 2, 3}, i = 1 with v ∈ {0, 2, 3}: 2·4 − 2 = 6 terms,
    # loss = (c0 + c1 + 2 c2 + 2 c3) / 6 = (2 ln 2 + 4·0.83698822) / 6 = 0.78904120.
    # (Averaging over all 8 pairs would give (4 ln 2 + 4·0.83698822)/8 = 0.76506770.)
    teacher = torch.zeros(1, 2, 2)
    student = torch.tensor([[_pair(0.0), _pair(0.0), _pair(0.1 * LN3), _pair(0.1 * LN3)]])
    loss = dino_loss(student, teacher, torch.zeros(2))
    assert loss.item() == pytest.approx((2 * LN2 + 4 * CE_UNIFORM_31) / 6, abs=1e-6)
    assert loss.item() == pytest.approx(0.78904120, abs=1e-6)


def test_dino_gradient_reaches_the_student_only() -> None:
    student = _rand(4, 3, 6, seed=6).requires_grad_(True)
    teacher = _rand(4, 2, 6, seed=7).requires_grad_(True)
    center = _rand(6, seed=8).requires_grad_(True)
    loss = dino_loss(student, teacher, center)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and center.grad is None
    # the student's gradient over a row sums to 0 (softmax minus a distribution) for every view
    torch.testing.assert_close(student.grad.sum(-1), torch.zeros(4, 3), rtol=0, atol=1e-6)


def test_dino_centering_subtracts_before_the_temperature() -> None:
    # teacher [1, 0], centre [1 − 0.04 ln 3, 0]: (teacher − c)/τt = [ln 3, 0] -> (3/4, 1/4).
    # (teacher/τt − c = [25 − 1 + 0.04 ln 3, 0] would be almost one-hot.) Student views [0, 0] and [0.1 ln 3, 0]
    # with a second teacher view [0, 0] reproduce the hand case: (H(3/4, 1/4) + ln 2)/2 = 0.62774116.
    teacher = torch.tensor([[_pair(1.0), _pair(0.0)]])
    center = torch.tensor([1.0 - 0.04 * LN3, 0.0])
    student = torch.tensor([[_pair(0.0), _pair(0.1 * LN3)]])
    teacher[0, 1] = center  # the second teacher view is the centre itself: [0, 0] after centring -> (1/2, 1/2)
    assert dino_loss(student, teacher, center).item() == pytest.approx((H_31 + LN2) / 2, abs=1e-6)
    # a centre equal in every coordinate changes nothing (softmax is shift invariant)
    t2, s2 = _rand(3, 2, 4, seed=9), _rand(3, 4, 4, seed=10)
    torch.testing.assert_close(
        dino_loss(s2, t2, torch.full((4,), 2.5)), dino_loss(s2, t2, torch.zeros(4)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(("vt", "vs"), [(1, 2), (2, 2), (2, 4), (2, 10)])
def test_dino_matches_the_reference_loop_float64(vt: int, vs: int) -> None:
    student = _rand(5, vs, 7, seed=11, dtype=torch.float64)
    teacher = _rand(5, vt, 7, seed=12, dtype=torch.float64)
    center = 0.3 * _rand(7, seed=13, dtype=torch.float64)
    for st, tt in [(0.1, 0.04), (0.2, 0.07)]:
        got = dino_loss(student, teacher, center, student_temp=st, teacher_temp=tt)
        assert got.dtype == torch.float64
        ref = _dino_reference(student, teacher, center, st, tt)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_dino_center_update_by_hand() -> None:
    # centre (1, 2); teacher B = 2, Vt = 2 rows (0, 0), (2, 4), (4, 8), (2, 0): mean over the 4 rows (2, 3).
    # new = 0.9·(1, 2) + 0.1·(2, 3) = (1.1, 2.1); momentum 0.5: (1.5, 2.5); momentum 1: unchanged; 0: the mean.
    center = torch.tensor([1.0, 2.0])
    teacher = torch.tensor([[[0.0, 0.0], [2.0, 4.0]], [[4.0, 8.0], [2.0, 0.0]]])
    torch.testing.assert_close(dino_center_update(center, teacher), torch.tensor([1.1, 2.1]))
    torch.testing.assert_close(dino_center_update(center, teacher, 0.5), torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(dino_center_update(center, teacher, 1.0), center)
    torch.testing.assert_close(dino_center_update(center, teacher, 0.0), torch.tensor([2.0, 3.0]))
    # an already-reduced batch mean replaces the local one: 0.9·(1, 2) + 0.1·(11, 12) = (2, 3)
    got = dino_center_update(center, teacher, batch_mean=torch.tensor([11.0, 12.0]))
    torch.testing.assert_close(got, torch.tensor([2.0, 3.0]))
    # without a process group the batch mean is the local mean; the input centre is never modified
    torch.testing.assert_close(dino_batch_mean(teacher), torch.tensor([2.0, 3.0]))
    assert torch.equal(center, torch.tensor([1.0, 2.0]))
    assert not dino_center_update(center, teacher.requires_grad_(True)).requires_grad


# ================================================================================ Sinkhorn-Knopp


def _sinkhorn_reference(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """float64, ``distributed_sinkhorn`` on one process with explicit element loops (no shift of the scores)."""
    s = scores.double().tolist()
    n, k = len(s), len(s[0])
    q = [[math.exp(s[b][j] / epsilon) for b in range(n)] for j in range(k)]  # [K][N]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        for j in range(k):  # every prototype's mass to 1/K
            r = sum(q[j])
            q[j] = [x / r / k for x in q[j]]
        for b in range(n):  # every sample's mass to 1/N
            c = sum(q[j][b] for j in range(k))
            for j in range(k):
                q[j][b] = q[j][b] / c / n
    return torch.tensor([[q[j][b] * n for j in range(k)] for b in range(n)], dtype=torch.float64)


def test_sinkhorn_hand_case_b2_k2() -> None:
    # exp(scores/ε) = M = [[1, 1], [1, 3]] (scores [[0, 0], [0, ε ln 3]]), Q = Mᵀ / 6 = [[1, 1], [1, 3]] / 6 ([K, B]).
    # iteration 1: rows to 1/2: [[1/4, 1/4], [1/8, 3/8]]; columns (sums 3/8, 5/8) to 1/2: [[1/3, 1/5], [1/6, 3/10]];
    #   ×N = 2, transposed: sample 0 (2/3, 1/3), sample 1 (2/5, 3/5).
    # iteration 2: row sums 8/15, 7/15 -> [[5/16, 3/16], [5/28, 9/28]]; column sums 55/112, 57/112 ->
    #   sample 0 (7/11, 4/11), sample 1 (7/19, 12/19).
    # limit: diagonal scalings keep the cross ratio P00·P11/(P01·P10) = 1·3/(1·1) = 3, and row and column sums are
    #   1, so P = [[x, 1 − x], [1 − x, x]] with x/(1 − x) = √3: x = √3/(1 + √3) = 0.6339746.
    eps = 0.05
    scores = torch.tensor([[0.0, 0.0], [0.0, eps * LN3]], dtype=torch.float64)
    torch.testing.assert_close(
        sinkhorn_knopp(scores, epsilon=eps, iters=1), torch.tensor([[2 / 3, 1 / 3], [2 / 5, 3 / 5]]).double()
    )
    torch.testing.assert_close(
        sinkhorn_knopp(scores, epsilon=eps, iters=2), torch.tensor([[7 / 11, 4 / 11], [7 / 19, 12 / 19]]).double()
    )
    x = math.sqrt(3) / (1 + math.sqrt(3))
    torch.testing.assert_close(
        sinkhorn_knopp(scores, epsilon=eps, iters=100), torch.tensor([[x, 1 - x], [1 - x, x]]).double()
    )
    # a symmetric kernel [[e^a, 1], [1, e^a]] is already balanced: codes (σ(a), 1 − σ(a)); a = ln 3: (3/4, 1/4)
    sym = eps * LN3 * torch.eye(2)
    torch.testing.assert_close(sinkhorn_knopp(sym, epsilon=eps), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_sinkhorn_marginals() -> None:
    b, k = 64, 8
    scores = 0.05 * _rand(b, k, seed=20)  # scores/ε ~ N(0, 1)
    for iters in (1, 3, 100):
        q = sinkhorn_knopp(scores, iters=iters)
        assert q.shape == (b, k) and q.dtype == torch.float32 and bool((q >= 0).all())
        # each sample's code is a distribution after every iteration (the column step comes last)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=0, atol=1e-5)
    # every prototype receives B/K = 8 samples' worth: roughly after 3 iterations, tightly after 100
    torch.testing.assert_close(sinkhorn_knopp(scores, iters=3).sum(dim=0), torch.full((k,), b / k), rtol=0.05, atol=0)
    torch.testing.assert_close(sinkhorn_knopp(scores, iters=100).sum(dim=0), torch.full((k,), b / k), rtol=1e-4, atol=0)
    # (not after a single step of the raw kernel: the prototypes' masses still differ by more than 5% there)
    assert (sinkhorn_knopp(2 * scores, iters=1).sum(dim=0) / (b / k) - 1).abs().max() > 0.05


@pytest.mark.parametrize(("eps", "iters"), [(0.05, 3), (0.1, 1), (0.5, 10)])
def test_sinkhorn_matches_the_reference_loop_float64(eps: float, iters: int) -> None:
    scores = (
        F.normalize(_rand(12, 16, seed=21, dtype=torch.float64), dim=1)
        @ F.normalize(_rand(5, 16, seed=22, dtype=torch.float64), dim=1).T
    )  # cosine scores [12, 5]
    got = sinkhorn_knopp(scores, epsilon=eps, iters=iters)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _sinkhorn_reference(scores, eps, iters), rtol=1e-12, atol=1e-12)


def test_sinkhorn_invariant_to_a_constant_and_no_gradient() -> None:
    scores = F.normalize(_rand(10, 6, seed=23, dtype=torch.float64), dim=1).requires_grad_(True)
    q = sinkhorn_knopp(scores)
    assert not q.requires_grad and q.grad_fn is None
    # exp((s + c)/ε) = e^{c/ε} exp(s/ε): the first normalisation divides the factor out. With c = 100,
    # e^{2000} overflows even float64: the shift by the maximum keeps it finite. (float64 here: in float32,
    # s + 100 itself rounds s to about 1e-5.)
    for c in (100.0, -3.0, 1e-3):
        torch.testing.assert_close(sinkhorn_knopp(scores.detach() + c), q, rtol=1e-10, atol=1e-12)
    q32 = sinkhorn_knopp(scores.detach().float())
    torch.testing.assert_close(sinkhorn_knopp(scores.detach().float() - 3.0), q32, rtol=1e-5, atol=1e-6)


def test_sinkhorn_underflow_raises() -> None:
    # a sample 100 below the others: exp(−100/0.05) is 0 for every prototype -> 0/0
    scores = torch.zeros(3, 2)
    scores[1] = -100.0
    with pytest.raises(FloatingPointError, match="underflowed"):
        sinkhorn_knopp(scores)


# ================================================================================ SwAV loss


def _swav_reference(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """float64, the official loop: for each assigned crop, the other crops' mean, then over the assigned crops."""
    scores, codes = scores.double(), codes.double()
    n_crops, assigned = scores.shape[1], codes.shape[1]
    loss = 0.0
    for crop_id in range(assigned):
        q = codes[:, crop_id]
        subloss = 0.0
        for v in [v for v in range(n_crops) if v != crop_id]:
            x = scores[:, v] / temperature
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / assigned


def test_swav_hand_case_v2_vq2() -> None:
    # B = 1, K = 2, T = 0.1. codes q0 = (3/4, 1/4), q1 = (1/2, 1/2).
    # scores view 0 [0.1 ln 3, 0] -> p0 = (3/4, 1/4); view 1 [0, 0] -> p1 = (1/2, 1/2).
    # q0 predicted from view 1: −(3/4 + 1/4) ln 1/2 = ln 2; q1 from view 0: −(1/2 ln 3/4 + 1/2 ln 1/4) = 0.83698822.
    # each subloss / (V − 1) = /1, sum / Vq = 2: (0.69314718 + 0.83698822)/2 = 0.76506770.
    scores = torch.tensor([[_pair(0.1 * LN3), _pair(0.0)]])
    codes = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    loss = swav_loss(scores, codes)
    assert loss.item() == pytest.approx((LN2 + CE_UNIFORM_31) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.76506770, abs=1e-6)
    # each code against its own view instead: q0 vs p0 = H(3/4, 1/4), q1 vs p1 = ln 2: (0.562 + 0.693)/2 = 0.628
    assert abs(loss.item() - (H_31 + LN2) / 2) > 0.1


def test_swav_averaging_counts_v4_vq2() -> None:
    # Uniform codes for crops 0 and 1; scores of crops 0, 1 [0, 0] (CE c = ln 2), crops 2, 3 [0.1 ln 3, 0] (c = 0.83698822).
    # q = 0: (c1 + c2 + c3)/3; q = 1: (c0 + c2 + c3)/3; loss = their mean = (2 ln 2 + 4·0.83698822)/6 = 0.78904120.
    scores = torch.tensor([[_pair(0.0), _pair(0.0), _pair(0.1 * LN3), _pair(0.1 * LN3)]])
    codes = torch.full((1, 2, 2), 0.5)
    assert swav_loss(scores, codes).item() == pytest.approx((2 * LN2 + 4 * CE_UNIFORM_31) / 6, abs=1e-6)
    assert swav_loss(scores, codes).item() == pytest.approx(0.78904120, abs=1e-6)
    # Vq = 3 adds q = 2, predicted from crops 0, 1, 3: (2 ln 2 + c)/3; the mean of the three sublosses is
    # (2 (ln 2 + 2c)/3 + (2 ln 2 + c)/3)/3 = (4 ln 2 + 5c)/9 = 0.77305912.
    three = swav_loss(scores, torch.full((1, 3, 2), 0.5))
    assert three.item() == pytest.approx((4 * LN2 + 5 * CE_UNIFORM_31) / 9, abs=1e-6)
    assert three.item() == pytest.approx(0.77305912, abs=1e-6)


def test_swav_no_gradient_to_codes() -> None:
    scores = _rand(6, 4, 5, seed=30).requires_grad_(True)
    codes = sinkhorn_knopp(_rand(6, 5, seed=31)).unsqueeze(1).repeat(1, 2, 1).requires_grad_(True)
    swav_loss(scores, codes).backward()
    assert codes.grad is None
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # the gradient per crop sums to 0 over prototypes (softmax minus a distribution, the codes sum to 1)
    torch.testing.assert_close(scores.grad.sum(-1), torch.zeros(6, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("v", "vq", "temperature"), [(2, 1, 0.1), (2, 2, 0.1), (4, 2, 0.1), (8, 2, 0.3), (3, 3, 1.0)])
def test_swav_matches_the_reference_loop_float64(v: int, vq: int, temperature: float) -> None:
    scores = _rand(7, v, 6, seed=32, dtype=torch.float64)
    codes = torch.stack([sinkhorn_knopp(scores[:, q]) for q in range(vq)], dim=1)
    got = swav_loss(scores, codes, temperature=temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _swav_reference(scores, codes, temperature), rtol=1e-12, atol=1e-12)


# ================================================================================ input errors and dtypes


def test_input_errors() -> None:
    s, t, c = _rand(2, 3, 4), _rand(2, 2, 4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"student must have shape \[B, Vs, K\]"):
        dino_loss(s[:, 0], t, c)
    with pytest.raises(ValueError, match=r"teacher must have shape \[B, Vt, K\]"):
        dino_loss(s, t[:, 0], c)
    with pytest.raises(ValueError, match=r"center must have shape \[K\]"):
        dino_loss(s, t, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"center must have shape \[K\] with K = 4"):
        dino_loss(s, t, torch.zeros(5))
    with pytest.raises(ValueError, match="must agree on B and K"):
        dino_loss(s, _rand(3, 2, 4), c)
    with pytest.raises(ValueError, match="teacher has more views"):
        dino_loss(s[:, :1], t, c)
    with pytest.raises(ValueError, match="at least 2 student views"):
        dino_loss(s[:, :1], t[:, :1], c)
    with pytest.raises(ValueError, match="teacher_temp must be finite and > 0"):
        dino_loss(s, t, c, teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp must be finite and > 0"):
        dino_loss(s, t, c, student_temp=float("nan"))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        dino_center_update(c, t, 1.5)
    with pytest.raises(ValueError, match="batch_mean must have the centre's shape"):
        dino_center_update(c, t, batch_mean=torch.zeros(3))
    with pytest.raises(TypeError, match="student must be a floating-point tensor"):
        dino_loss(s.long(), t, c)
    nan = torch.full((2, 3, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="student contains NaN"):
        dino_loss(nan, t, c)
    with pytest.raises(FloatingPointError, match="teacher contains NaN"):
        dino_loss(s, nan[:, :2], c)
    with pytest.raises(FloatingPointError, match="center contains NaN"):
        dino_loss(s, t, torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(FloatingPointError, match="teacher contains NaN"):
        dino_center_update(c, nan)
    with pytest.raises(FloatingPointError, match="batch_mean contains NaN"):
        dino_center_update(c, t, batch_mean=torch.full((4,), float("nan")))

    with pytest.raises(ValueError, match=r"scores must have shape \[B, K\]"):
        sinkhorn_knopp(s)
    with pytest.raises(ValueError, match="epsilon must be finite and > 0"):
        sinkhorn_knopp(s[:, 0], epsilon=-0.05)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        sinkhorn_knopp(s[:, 0], iters=0)
    with pytest.raises(FloatingPointError, match="scores contains NaN"):
        sinkhorn_knopp(nan[:, 0])

    codes = torch.full((2, 2, 4), 0.25)
    with pytest.raises(ValueError, match=r"scores must have shape \[B, V, K\]"):
        swav_loss(s[:, 0], codes)
    with pytest.raises(ValueError, match=r"codes must have shape \[B, Vq, K\]"):
        swav_loss(s, codes[:, 0])
    with pytest.raises(ValueError, match="must agree on B and K"):
        swav_loss(s, torch.full((2, 2, 5), 0.2))
    with pytest.raises(ValueError, match="codes has more views"):
        swav_loss(s[:, :1], codes)
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss(s[:, :1], codes[:, :1])
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        swav_loss(s, codes, temperature=0)
    with pytest.raises(FloatingPointError, match="scores contains NaN"):
        swav_loss(nan, codes)
    with pytest.raises(FloatingPointError, match="codes contains NaN"):
        swav_loss(s, nan[:, :2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    # The same (rounded) values in float32 give the same result: the maths runs in float32, also under autocast.
    s, t, c = _rand(4, 4, 6, seed=40).to(dtype), _rand(4, 2, 6, seed=41).to(dtype), (0.1 * _rand(6, seed=42)).to(dtype)
    scores, codes = _rand(4, 3, 6, seed=43).to(dtype), sinkhorn_knopp(_rand(4, 6, seed=44)).unsqueeze(1).to(dtype)
    cases = [
        (lambda *a: dino_loss(*a), (s, t, c)),
        (lambda *a: dino_center_update(*a), (c, t)),
        (lambda x: sinkhorn_knopp(x), (scores[:, 0],)),
        (lambda *a: swav_loss(*a), (scores, codes)),
    ]
    for fn, args in cases:
        ref = fn(*(a.float() for a in args))
        got = fn(*args)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fn(*(a.float() for a in args))
        assert auto.dtype == torch.float32
        torch.testing.assert_close(auto, ref, rtol=1e-6, atol=1e-6)
