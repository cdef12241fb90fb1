r"""Maximum Entropy Coding (MEC) loss, as OFF-MEC, without its distributed mistakes.

Notation: ``m`` rows (the **global** batch: gather across ranks before calling),
``d`` features, ``nrm(x) = x / max(||x||_2, 1e-12)`` applied to each row,
``ε²`` the squared distortion bound (OFF-MEC's ``--eps``, default 64),
``lamda_inv = m·ε²/d`` and ``λ = 1/lamda_inv``.

For a pair of ``[m, d]`` matrices ``(P, Z)``:

1. rows are L2-normalised: ``P̂ = nrm(P)``, ``Ẑ = nrm(Z)``;
2. ``T(P, Z) = tr( Σ_{k=1}^{K} (−1)^{k+1} (λ P̂ Ẑᵀ)^k / k )``, the Taylor series
   of ``log det(I + λ P̂ Ẑᵀ)`` truncated after order ``K`` (OFF-MEC: K = 4).

With student outputs ``z1, z2`` and teacher outputs ``p1, p2`` of the two views::

    mec  = [T(p1, z2) + T(p2, z1)] / (2m)          (cross-view, symmetrised)
    loss = −lamda_inv · mec
    coding length (display only) = μ · mec,  μ = (m + d)/2

Consequences worth knowing (all tested):

* ``lamda_inv · mec = (1/2m) Σ_k (−1)^{k+1} λ^{k−1} tr((P̂Ẑᵀ)^k)/k``: the order-1
  part is ``−½ (mean_i cos(p1_i, z2_i) + mean_i cos(p2_i, z1_i))`` whatever λ
  is (a BYOL-style alignment term); orders 2..K are the anti-collapse regulariser.
* Orthonormal, aligned rows (``P̂Ẑᵀ = I_m``, needs m <= d):
  ``loss = −(1 − λ/2 + λ²/3 − λ³/4)`` (≈ −0.9847 at λ = 1/32).
* Full collapse (every row the same vector, ``P̂Ẑᵀ`` all ones, eigenvalue m):
  with ``x = λm`` (= d/ε² at the default λ), ``loss = −(1 − x/2 + x²/3 − x³/4)``;
  the even order makes collapse expensive (``x = 32`` gives loss ≈ +7866).

**The cheaper of two equal forms.** ``tr((P̂Ẑᵀ)^k) = tr((ẐᵀP̂)^k)`` by cyclicity,
so the series is computed on the ``m×m`` matrix ``λ P̂Ẑᵀ`` when ``m <= d`` and on
the ``d×d`` matrix ``λ ẐᵀP̂`` otherwise. Only the powers up to ``h = ⌈K/2⌉`` are
formed, and ``tr(M^k) = Σ_ij (M^a)_ij (M^b)_ji`` with ``a + b = k``; K = 4 therefore
costs one ``n×n`` matrix product after forming ``M`` (OFF-MEC: three).

**The truncated series is unbounded below.** ``P̂Ẑᵀ`` is not symmetric (student
and teacher rows differ), so it can have complex eigenvalues ``ρe^{±iθ}``. Rows
spread evenly on a circle in an ``r``-dimensional subspace, student rotated by θ
from teacher, give ``tr((λP̂Ẑᵀ)^k) = r·x^k·cos(kθ)`` with ``x = λm/r``, and
``loss = −(r/(λm)) Σ_k (−1)^{k+1} x^k cos(kθ)/k``: at θ = 45° the order-4 term
alone contributes ``−(r/(λm))·x⁴/4``, so for ``x > 1`` the loss falls without
bound (``λm = 8, r = 2``: −12.9, against about −1 for healthy aligned rows). A
predictor can learn that rotation; small, short runs at OFF-MEC's ``λm = d/ε²``
(16–32) do (loss −6…−12, features collapsed). ``order=None`` uses the exact
``log |det(I + λP̂Ẑᵀ)| = Σ log|1 + λμ|``, which grows only logarithmically: the
same configuration scores ``−(r/(λm))·log|1 + x e^{iθ}|`` (−0.39 for ``λm = 8, r = 2``), worse than healthy rows, so full rank wins again.

**Numerics.** The maths runs in float32 (float64 inputs stay float64) with
autocast disabled: at collapse ``tr(M⁴) = (λm)⁴`` overflows fp16. Non-finite
inputs raise ``FloatingPointError`` instead of being dropped.

**Gradients.** Every input is used as given: a caller detaches its teacher
outputs (OFF-MEC computes them under ``no_grad``). When ``p1, p2`` are omitted
the student outputs take their place and the gradient flows through both slots.
For the exact distributed gradient gather each tensor with
:func:`selfsup.distributed.gather` first (one gather per tensor, not OFF-MEC's four
per step); ``m`` is then the gathered row count, which fixes OFF-MEC's per-node ``m``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_rows, compute_dtype, same_shapes

__all__ = ["choose_form", "mec_lamda_inv", "mec_loss", "mec_warmup_lamda_inv"]

Form = Literal["auto", "mm", "dd"]


# ---------------------------------------------------------------------- schedule


def mec_lamda_inv(m: int, d: int, eps_sq: float = 64.0) -> float:
    """``lamda_inv = m·ε²/d`` (OFF-MEC defaults m = 1024, d = 2048, ε² = 64 give 32).

    ``m`` is the row count the loss sees, i.e. the **global** (gathered) batch.
    """
    if m < 1 or d < 1:
        raise ValueError(f"m and d must be positive, got m={m}, d={d}")
    if not (math.isfinite(eps_sq) and eps_sq > 0):
        raise ValueError(f"eps_sq (ε², the squared distortion) must be finite and > 0, got {eps_sq}")
    return m * float(eps_sq) / d


def mec_warmup_lamda_inv(step: int, warmup_steps: int, lamda_inv: float) -> float:
    """OFF-MEC's per-iteration ``lamda_inv`` schedule.

    ``np.linspace(8·lamda_inv, lamda_inv, warmup_steps)[step]`` for
    ``step < warmup_steps`` (both end points included: ``8·lamda_inv`` at step 0,
    ``lamda_inv`` at step ``warmup_steps − 1``), then ``lamda_inv``. The effective
    λ therefore starts 8× smaller, which keeps the Taylor series convergent early on.
    ``warmup_steps <= 0`` means no warm-up; ``warmup_steps == 1`` follows
    ``np.linspace`` (step 0 gets ``8·lamda_inv``).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= warmup_steps:
        return float(lamda_inv)
    start = 8.0 * lamda_inv
    if warmup_steps == 1:
        return float(start)
    if step == warmup_steps - 1:
        return float(lamda_inv)  # exact end point, as np.linspace
    return float(start + (lamda_inv - start) * (step / (warmup_steps - 1)))


# -------------------------------------------------------------------------- maths


def choose_form(m: int, d: int) -> Literal["mm", "dd"]:
    """The cheaper form: ``m×m`` when ``m <= d``, else ``d×d`` (cost ∝ n²·(other) + n³)."""
    return "mm" if m <= d else "dd"


def _trace_series(p_hat: Tensor, z_hat: Tensor, lam: float, order: int | None, form: Literal["mm", "dd"]) -> Tensor:
    """``tr Σ_{k=1..order} (−1)^{k+1} (λ P̂Ẑᵀ)^k / k`` computed on the ``form`` matrix
    (``order=None``: ``log |det(I + λ P̂Ẑᵀ)|``, the function the series truncates)."""
    if form == "mm":
        mat = lam * (p_hat @ z_hat.mT)  # [m, m]
    elif form == "dd":
        mat = lam * (z_hat.mT @ p_hat)  # [d, d], same traces of powers, same det(I + .) (Sylvester)
    else:
        raise ValueError(f"form must be 'mm' or 'dd', got {form!r}")
    if order is None:
        eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
        return torch.linalg.slogdet(eye + mat).logabsdet
    half = (order + 1) // 2
    powers = [mat]  # powers[j] = M^(j+1)
    for _ in range(half - 1):
        powers.append(powers[-1] @ mat)
    total = mat.new_zeros(())
    for k in range(1, order + 1):
        a = (k + 1) // 2
        b = k - a
        if b == 0:
            tr = torch.diagonal(powers[a - 1]).sum()
        else:
            tr = (powers[a - 1] * powers[b - 1].mT).sum()  # tr(M^a M^b)
        total = total + ((1.0 if k % 2 else -1.0) / k) * tr
    return total


def mec_loss(
    z1: Tensor,
    z2: Tensor,
    p1: Tensor | None = None,
    p2: Tensor | None = None,
    *,
    eps_sq: float = 64.0,
    order: int | None = 4,
    lamda_inv: float | Tensor | None = None,
    return_parts: bool = False,
    form: Form = "auto",
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""MEC loss ``−lamda_inv · [T(p1, z2) + T(p2, z1)] / (2m)`` (see the module docstring).

    Args:
        z1, z2: student outputs ``[m, d]`` of views 1 and 2, any floating dtype,
            already gathered across ranks when training distributed.
        p1, p2: teacher outputs ``[m, d]`` of views 1 and 2 (used as given: detach
            them in the caller). Both omitted: ``z1`` and ``z2`` stand in for them.
        eps_sq: ``ε²`` (> 0), used for the default ``lamda_inv``.
        order: Taylor order ``K >= 1`` (OFF-MEC: 4). Order 1 is the pure alignment
            ``−½ (mean cos(p1, z2) + mean cos(p2, z1))`` for any ``lamda_inv``. ``None``: the exact
            ``log |det(I + λ P̂Ẑᵀ)|`` (one LU factorisation of the smaller matrix), which the series
            approximates while ``λ·|eig(P̂Ẑᵀ)| < 1`` and which, unlike the truncated series, is bounded
            below (see "The truncated series is unbounded below").
        lamda_inv: ``1/λ`` (> 0), e.g. from :func:`mec_warmup_lamda_inv`; default
            ``m·eps_sq/d`` with ``m`` the rows passed in.
        return_parts: also return ``{"mec", "coding_length", "lamda_inv"}``:
            detached 0-d tensors, ``coding_length = (m + d)/2 · mec``.
        form: the matrix the traces are taken on: ``"mm"`` (``m×m``), ``"dd"`` (``d×d``), equal in exact
            arithmetic; ``"auto"`` takes the cheaper (:func:`choose_form`).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64), or ``(loss, parts)``.

    Raises:
        ValueError: a tensor is not ``[m, d]``, shapes differ, only one of ``p1, p2``
            is given, ``order < 1``, ``eps_sq <= 0`` or ``lamda_inv <= 0``.
        TypeError: a non-tensor or non-floating input.
        FloatingPointError: an input contains NaN or Inf (the message names it).
    """
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
        raise ValueError(
            f"order (the Taylor order K) must be an int >= 1, or None for the exact log det; got {order!r}"
        )
    if not isinstance(eps_sq, Real) or not (math.isfinite(eps_sq) and eps_sq > 0):
        raise ValueError(f"eps_sq (ε², the squared distortion) must be finite and > 0, got {eps_sq!r}")
    if (p1 is None) != (p2 is None):
        raise ValueError("give both teacher outputs p1 and p2, or neither")
    named = {"z1": z1, "z2": z2} if p1 is None else {"z1": z1, "z2": z2, "p1": p1, "p2": p2}
    for name, t in named.items():
        check_rows(t, name, "mec_loss")
    same_shapes(named)
    m, d = z1.shape
    if lamda_inv is None:
        lam_inv = mec_lamda_inv(m, d, eps_sq)
    else:
        lam_inv = float(lamda_inv)
        if not (math.isfinite(lam_inv) and lam_inv > 0):
            raise ValueError(f"lamda_inv must be finite and > 0, got {lamda_inv!r}")
    if form == "auto":
        form = choose_form(m, d)
    dtype = compute_dtype(*named.values())
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1h = F.normalize(z1.to(dtype), dim=1, eps=NORM_EPS)
        z2h = F.normalize(z2.to(dtype), dim=1, eps=NORM_EPS)
        if p1 is None:
            p1h, p2h = z1h, z2h
        else:
            p1h = F.normalize(p1.to(dtype), dim=1, eps=NORM_EPS)
            p2h = F.normalize(p2.to(dtype), dim=1, eps=NORM_EPS)
        lam = 1.0 / lam_inv
        mec = (_trace_series(p1h, z2h, lam, order, form) + _trace_series(p2h, z1h, lam, order, form)) / (2 * m)
        loss = -lam_inv * mec
    if not return_parts:
        return loss
    mec_d = mec.detach()
    parts = {
        "mec": mec_d,
        "coding_length": (m + d) / 2 * mec_d,
        "lamda_inv": torch.tensor(lam_inv, dtype=dtype, device=z1.device),
    }
    return loss, parts
