r"""DINO: self-distillation with a centred, sharpened teacher.

Follows ``facebookresearch/dino``, ``main_dino.py``: ``DINOLoss.forward`` (the loss) and
``DINOLoss.update_center`` (the centre's EMA), with the teacher temperature of the current epoch passed in by the
caller (the official warm-up schedule ``teacher_temp_schedule[epoch]`` lives with the method, not here).

Notation: ``B`` images, ``Vs`` student views, ``Vt ≤ Vs`` teacher views (the global crops only), ``K`` output
dimensions, ``c ∈ R^K`` the centre, ``τs`` / ``τt`` the student / teacher temperatures. Tensors are
**sample-major**: ``student[b, v]`` is view ``v`` of image ``b`` and teacher view ``i`` is student view ``i``
(the official code's view-major ``[V·B, K]`` output is ``out.view(V, B, K).transpose(0, 1)`` here)::

    t_{b,i} = softmax((teacher_{b,i} − c) / τt)          (centre subtracted before the temperature; no gradient)
    log s_{b,v} = log_softmax(student_{b,v} / τs)
    H(i, v) = (1/B) Σ_b −Σ_k t_{b,i,k} log s_{b,v,k}
    loss = (1 / (Vt·Vs − Vt)) Σ_{i < Vt} Σ_{v ≠ i} H(i, v)

i.e. the mean over the ``Vt·Vs − Vt`` pairs of a teacher view and a *different* student view (``n_loss_terms``),
each pair's cross-entropy averaged over the batch. The centre's update (:func:`dino_center_update`) is::

    c ← m·c + (1 − m)·mean_{b, i} teacher_{b,i}          (the mean over every row of every teacher view)

Distributed training: the loss is per-sample (a batch mean of per-image terms), so no gather is needed; with equal
local batches DDP's gradient averaging of the per-rank means is the single-process gradient of the global mean.
The centre's batch mean, however, is over the **global** batch: the official code all-reduces the sum and divides
by ``len · world_size``. :func:`dino_batch_mean` does that (a collective: every rank calls it) and its result goes
to ``dino_center_update(..., batch_mean=...)``; without ``batch_mean`` the update uses this process's rows only.

float32 inside (float64 stays float64), autocast off; non-finite inputs raise :class:`FloatingPointError` naming
the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.distributed import all_reduce_, world_size
from selfsup.losses.checks import check_floating, check_positive, compute_dtype

__all__ = ["dino_batch_mean", "dino_center_update", "dino_loss"]


def _check_center(center: Tensor, teacher: Tensor, loss: str) -> None:
    check_floating(center, "center", loss, "[K]")
    if center.shape[0] != teacher.shape[-1]:
        raise ValueError(
            f"center must have shape [K] with K = {teacher.shape[-1]} (teacher {tuple(teacher.shape)} [B, Vt, K]); "
            f"got {tuple(center.shape)}"
        )


def dino_loss(
    student: Tensor, teacher: Tensor, center: Tensor, *, student_temp: float = 0.1, teacher_temp: float = 0.04
) -> Tensor:
    r"""DINO's cross-entropy of the centred, sharpened teacher against the student, over pairs of different views.

    ``loss = mean_{i < Vt, v ≠ i} mean_b −Σ_k softmax((teacher_{b,i} − c)/τt)_k · log_softmax(student_{b,v}/τs)_k``
    (see the module docstring); follows ``DINOLoss.forward`` in ``facebookresearch/dino/main_dino.py``.

    Args:
        student: ``[B, Vs, K]`` student logits, sample-major, every view (global crops first, then local crops).
        teacher: ``[B, Vt, K]`` teacher logits of the first ``Vt ≤ Vs`` views (the global crops); used without
            gradient.
        center: ``[K]`` the running centre of the teacher logits (without gradient; see :func:`dino_center_update`).
        student_temp: ``τs > 0``.
        teacher_temp: ``τt > 0`` (the caller applies the official warm-up schedule).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64); the gradient reaches ``student`` only.

    Raises:
        ValueError: wrong ranks, ``B`` or ``K`` differ, ``Vt > Vs``, no pair of different views (``Vs < 2``),
            a temperature ``<= 0``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_positive(student_temp, "student_temp")
    check_positive(teacher_temp, "teacher_temp")
    check_floating(student, "student", "dino_loss", "[B, Vs, K]")
    check_floating(teacher, "teacher", "dino_loss", "[B, Vt, K]")
    _check_center(center, teacher, "dino_loss")
    (b, vs, k), (bt, vt, kt) = student.shape, teacher.shape
    if (b, k) != (bt, kt):
        raise ValueError(
            f"student [B, Vs, K] and teacher [B, Vt, K] must agree on B and K; "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if vt > vs:
        raise ValueError(f"teacher has more views ({vt}) than student ({vs}): teacher view i must be student view i")
    if vs < 2:
        raise ValueError(f"dino_loss needs at least 2 student views (pairs of different views); got Vs = {vs}")
    dtype = compute_dtype(student, teacher, center)
    with torch.autocast(device_type=student.device.type, enabled=False):
        t = F.softmax((teacher.detach().to(dtype) - center.detach().to(dtype)) / teacher_temp, dim=-1)
        log_s = F.log_softmax(student.to(dtype) / student_temp, dim=-1)
        ce = -torch.einsum("bik,bvk->iv", t, log_s) / b  # [Vt, Vs]: batch-mean cross-entropy of each pair
        other = ~torch.eye(vt, vs, dtype=torch.bool, device=ce.device)  # skip teacher view i vs student view i
        return ce[other].mean()  # the n_loss_terms = Vt·Vs − Vt pairs


@torch.no_grad()
def dino_batch_mean(teacher: Tensor) -> Tensor:
    """``[K]`` mean of the teacher logits over every row and view of the **global** batch.

    Under ``torch.distributed`` the ``[K]`` sum is all-reduced (SUM) and divided by ``B·Vt·world_size`` (the
    official ``update_center``: ``all_reduce(sum) / (len(teacher_output) · world_size)``), so every rank gets the
    same value: a collective, every rank must call it. Without a process group it is the local mean. Assumes equal
    local batches (as the official code does). No gradient; float32 (float64 stays float64), autocast off.
    """
    check_floating(teacher, "teacher", "dino_batch_mean", "[B, Vt, K]")
    with torch.autocast(device_type=teacher.device.type, enabled=False):
        total = teacher.detach().to(compute_dtype(teacher)).sum(dim=(0, 1))
        all_reduce_(total)
        return total / (teacher.shape[0] * teacher.shape[1] * world_size())


@torch.no_grad()
def dino_center_update(
    center: Tensor, teacher: Tensor, momentum: float = 0.9, *, batch_mean: Tensor | None = None
) -> Tensor:
    """The new centre ``m·center + (1 − m)·batch_mean``: DINO's EMA of the teacher logits' batch mean.

    Follows ``DINOLoss.update_center`` in ``facebookresearch/dino/main_dino.py``; a pure function (returns the new
    ``[K]`` centre, never modifies ``center``), no gradient, float32 (float64 stays float64), autocast off.

    Args:
        center: ``[K]`` the current centre.
        teacher: ``[B, Vt, K]`` this step's teacher logits (every teacher view).
        momentum: ``m ∈ [0, 1]`` (official default 0.9).
        batch_mean: ``[K]`` the mean over the **global** batch, already reduced across ranks
            (:func:`dino_batch_mean`, which every rank must call). ``None``: the mean of ``teacher`` over its rows
            and views, this process only: correct without DDP; under DDP pass ``batch_mean`` (the caller's duty).

    Raises:
        ValueError: wrong ranks, ``K`` differs, ``momentum`` outside ``[0, 1]``.
        TypeError / FloatingPointError: as the other losses (non-floating or non-finite input, named).
    """
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    check_floating(teacher, "teacher", "dino_center_update", "[B, Vt, K]")
    _check_center(center, teacher, "dino_center_update")
    if batch_mean is not None:
        check_floating(batch_mean, "batch_mean", "dino_center_update", "[K]")
        if batch_mean.shape != center.shape:
            raise ValueError(f"batch_mean must have the centre's shape {tuple(center.shape)}; got {batch_mean.shape}")
    dtype = compute_dtype(center, teacher, *([] if batch_mean is None else [batch_mean]))
    with torch.autocast(device_type=center.device.type, enabled=False):
        mean = teacher.to(dtype).mean(dim=(0, 1)) if batch_mean is None else batch_mean.to(dtype)
        return center.to(dtype) * momentum + mean * (1.0 - momentum)
