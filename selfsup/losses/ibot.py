r"""iBOT's masked-patch self-distillation and DINOv2's Sinkhorn-Knopp teacher over masked patches.

Follows ``bytedance/ibot`` (the official iBOT code), ``main_ibot.py``: ``iBOTLoss.forward`` (the ``v == q`` term,
``loss2``) and ``iBOTLoss.update_center`` (``center2``); and ``facebookresearch/dinov2``,
``dinov2/loss/ibot_patch_loss.py``: ``iBOTPatchLoss.forward_masked`` (the same per-image weighting) and
``iBOTPatchLoss.sinkhorn_knopp_teacher`` (:func:`masked_sinkhorn_knopp`).

Notation: ``B`` crops (rows; the method passes every global crop of every image, ``B·V`` rows), ``N`` patches per
crop, ``K`` patch prototypes, ``m_{b,n} ∈ {0, 1}`` the mask (1 = the student saw the mask token at patch ``n``),
``c ∈ R^K`` the patch centre (``center2``), ``τs`` / ``τt`` the student / teacher temperatures::

    t_{b,n}   = softmax((teacher_{b,n} − c) / τt)                      (no gradient)
    H_{b,n}   = −Σ_k t_{b,n,k} · log_softmax(student_{b,n} / τs)_k
    L_b       = Σ_n m_{b,n} H_{b,n} / max(Σ_n m_{b,n}, 1)                (0 for a crop without masked patches)
    loss      = (1/B) Σ_b L_b

As iBOT computes it per global crop ``v`` and averages over ``v`` (``total_loss2 / n_loss_terms2``), which with
equal crops per view is the mean over all ``B·V`` rows; DINOv2's ``forward_masked`` weights each masked patch by
``1 / Σ_n m_{b,n}`` and divides by the number of crops: the same number.

The patch centre follows ``update_center``: the mean of the teacher's patch logits over **every** patch (masked or
not) of every crop of the global batch, ``c ← m·c + (1 − m)·mean``: that is :func:`selfsup.losses.dino_batch_mean`
of the ``[B, N, K]`` logits (its sum over the first two axes, all-reduced, divided by ``B·N·world``) passed to
:func:`selfsup.losses.dino_center_update`; this module adds nothing for it.

Distributed training: ``ibot_patch_loss`` is a per-crop mean, so no gather is needed: with equal local batches DDP's
averaging gives the gradient of the global mean (as the official code). float32 inside (float64 stays float64),
autocast off; non-finite inputs raise :class:`FloatingPointError` naming the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.distributed import all_reduce_
from selfsup.losses.checks import check_floating, check_positive, compute_dtype

__all__ = ["ibot_patch_loss", "masked_patch_cross_entropy", "masked_sinkhorn_knopp"]


def _check_mask(mask: Tensor, student: Tensor, loss: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{loss}: mask must be a bool tensor [B, N] (True = masked), got {getattr(mask, 'dtype', mask)}"
        )
    if tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"{loss}: mask must have shape [B, N] = {tuple(student.shape[:2])} (student {tuple(student.shape)}); "
            f"got {tuple(mask.shape)}"
        )


def masked_patch_cross_entropy(student: Tensor, targets: Tensor, mask: Tensor, *, student_temp: float = 0.1) -> Tensor:
    r"""``(1/B) Σ_b Σ_n m_{b,n} (−Σ_k targets_{b,n,k} log_softmax(student_{b,n}/τs)_k) / max(Σ_n m_{b,n}, 1)``.

    The patch term of :func:`ibot_patch_loss` with the teacher's distributions given (``targets``, e.g. the
    Sinkhorn-Knopp codes of DINOv2's ``centering: sinkhorn_knopp``, scattered to their masked positions; values at
    unmasked positions are ignored).

    Args:
        student: ``[B, N, K]`` student patch logits.
        targets: ``[B, N, K]`` teacher distributions (used without gradient).
        mask: ``[B, N]`` bool, True where the student's input held the mask token.
        student_temp: ``τs > 0``.

    Returns:
        A 0-d float32 tensor (float64 for float64 input); the gradient reaches ``student`` only.
    """
    check_positive(student_temp, "student_temp")
    check_floating(student, "student", "masked_patch_cross_entropy", "[B, N, K]")
    check_floating(targets, "targets", "masked_patch_cross_entropy", "[B, N, K]")
    if targets.shape != student.shape:
        raise ValueError(
            f"student and targets must both be [B, N, K]; got {tuple(student.shape)}, {tuple(targets.shape)}"
        )
    _check_mask(mask, student, "masked_patch_cross_entropy")
    dtype = compute_dtype(student, targets)
    with torch.autocast(device_type=student.device.type, enabled=False):
        log_s = F.log_softmax(student.to(dtype) / student_temp, dim=-1)
        ce = -(targets.detach().to(dtype) * log_s).sum(-1)  # [B, N]
        m = mask.to(dtype)
        per_crop = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]; 0 without masked patches
        return per_crop.mean()


def ibot_patch_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    center: Tensor,
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    r"""iBOT's masked-patch loss of one view pair: the centred, sharpened teacher against the student at the masked
    patches, a mean over each crop's masked patches (0 for a crop with none), then over crops.

    ``loss = (1/B) Σ_b Σ_n m_{b,n} H_{b,n} / max(Σ_n m_{b,n}, 1)``, ``H_{b,n} = −Σ_k softmax((t_{b,n} − c)/τt)_k
    log_softmax(s_{b,n}/τs)_k`` (module docstring); follows the ``v == q`` branch of ``iBOTLoss.forward`` in
    ``bytedance/ibot/main_ibot.py``.

    Args:
        student: ``[B, N, K]`` student patch logits (of the masked input).
        teacher: ``[B, N, K]`` teacher patch logits of the same crops (clean input); used without gradient.
        mask: ``[B, N]`` bool, True where the student's input held the mask token.
        center: ``[K]`` the patch centre (``center2``; no gradient).
        student_temp: ``τs > 0`` (0.1).
        teacher_temp: ``τt > 0`` (the caller applies the warm-up schedule; iBOT ``teacher_patch_temp`` 0.07).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64); the gradient reaches ``student`` only.

    Raises:
        ValueError: wrong ranks or shapes, a temperature ``<= 0``.
        TypeError: non-tensor / non-floating input, a mask that is not bool.
        FloatingPointError: NaN or Inf in an input (named).
    """
    check_positive(teacher_temp, "teacher_temp")
    check_floating(teacher, "teacher", "ibot_patch_loss", "[B, N, K]")
    check_floating(center, "center", "ibot_patch_loss", "[K]")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student and teacher must both be [B, N, K]; got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    if center.shape[0] != teacher.shape[-1]:
        raise ValueError(f"center must have shape [K] with K = {teacher.shape[-1]}; got {tuple(center.shape)}")
    dtype = compute_dtype(student, teacher, center)
    with torch.autocast(device_type=teacher.device.type, enabled=False):
        t = F.softmax((teacher.detach().to(dtype) - center.detach().to(dtype)) / teacher_temp, dim=-1)
    return masked_patch_cross_entropy(student, t, mask, student_temp=student_temp)


@torch.no_grad()
def masked_sinkhorn_knopp(scores: Tensor, *, teacher_temp: float, iters: int = 3) -> Tensor:
    r"""DINOv2's Sinkhorn-Knopp teacher over a **variable** number of rows per rank (the masked patches), ``[M, K]``.

    Follows ``iBOTPatchLoss.sinkhorn_knopp_teacher`` in ``facebookresearch/dinov2/dinov2/loss/ibot_patch_loss.py``:
    ``Q = exp(scores/τt)ᵀ`` (``[K, M]``), ``Q /= ΣQ`` (all-reduced), then ``iters`` times: each prototype's row
    to ``1/K`` (row sums all-reduced), each column (a patch) to ``1/M_tot``; returns ``(M_tot·Q)ᵀ``, each row a
    distribution. ``M_tot = Σ_ranks M_r`` is all-reduced, as the official ``dist.all_reduce(n_masked_patches)``:
    the masked-patch count differs between ranks, which is why :func:`selfsup.losses.sinkhorn_knopp` (it takes
    ``N = B·world_size`` from the local rows, right for DINOv2's class tokens, not here) is not used for patches.

    Same maths as ``sinkhorn_knopp(scores, epsilon=teacher_temp, iters=iters)`` when every rank has the same ``M``;
    the one (exact) departure shared with it: scores are shifted by their global maximum before ``exp``, which the
    first normalisation divides out again. A collective under ``torch.distributed``: every rank calls it, a rank
    with no masked patch with an empty ``[0, K]`` tensor.

    Args:
        scores: ``[M, K]`` teacher logits of this rank's masked patches (``M`` may be 0).
        teacher_temp: ``τt > 0``, the Sinkhorn ``ε``.
        iters: iterations ``>= 1`` (official 3).

    Returns:
        ``[M, K]`` float32 (float64 for float64 input) rows summing to 1.
    """
    check_positive(teacher_temp, "teacher_temp")
    if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"masked_sinkhorn_knopp: scores must be a floating [M, K] tensor; got {scores!r:.80}")
    if scores.shape[0] > 0:
        check_floating(scores, "scores", "masked_sinkhorn_knopp", "[M, K]")
    m, k = scores.shape
    dtype = compute_dtype(scores)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.detach().to(dtype) / teacher_temp
        local_max = s.max() if m > 0 else torch.tensor(float("-inf"), dtype=dtype, device=s.device)
        shift = all_reduce_(local_max.clone(), "max")
        q = torch.exp(s - shift).T.contiguous()  # [K, M]
        total = all_reduce_(torch.tensor(float(m), dtype=dtype, device=s.device))  # M_tot over ranks
        q /= all_reduce_(q.sum())
        for _ in range(iters):
            q /= all_reduce_(q.sum(dim=1, keepdim=True))
            q /= k
            if m > 0:
                q /= q.sum(dim=0, keepdim=True)
            q /= total
        q *= total
        if m > 0 and not bool(torch.isfinite(q).all()):
            raise FloatingPointError(
                "masked_sinkhorn_knopp: the codes are not finite: exp((scores − max)/teacher_temp) underflowed to 0 "
                "for a whole patch or prototype; normalise the head's output or raise the temperature."
            )
        return q.T
