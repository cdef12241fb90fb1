r"""MoCo v3's symmetrised contrastive loss of queries against momentum-encoder keys.

Follows facebookresearch/moco-v3, ``moco/builder.py``, ``MoCo.contrastive_loss`` and ``MoCo.forward`` (with
``concat_all_gather`` of the same file).

Queries ``q [N, D]`` (online encoder + predictor, this rank's rows) and keys ``k [M, D]`` (momentum encoder, all
ranks' rows gathered, ``M >= N``); rows L2-normalised, ``nrm(x) = x / max(||x||, 1e-12)``; the positive of query
``i`` is key ``offset + i``::

    ctr(q, k) = 2τ · (1/N) Σ_i −log( exp(<nrm q_i, nrm k_{offset+i}> / τ) / Σ_{m<M} exp(<nrm q_i, nrm k_m> / τ) )
    loss      = ctr(q1, k2) + ctr(q2, k1)

(``nn.CrossEntropyLoss`` of the ``[N, M]`` logits ``q kᵀ / τ`` with labels ``offset + i``, times ``2τ``.)
Hand case: ``q1 = q2 = k1 = k2 = [e1; e2]`` gives ``ctr = 2τ log(1 + e^{−1/τ})`` and ``loss = 4τ log(1 + e^{−1/τ})``.

The keys carry no gradient: the official code computes them under ``torch.no_grad()`` and gathers them with a
gradient-free all-gather; here ``k1`` and ``k2`` are detached inside, so a caller may pass any tensor.

Distributed: the caller gathers the keys without gradient (``selfsup.distributed.all_gather_variable``, or
``.detach()`` then ``gather``) and passes this rank's row offset ``offset = rank · N`` (the official labels
``arange(N) + N · rank``); the queries stay local. Each rank's loss is then the mean over its ``N`` queries,
and DDP averages the ranks' gradients: with equal local batches the result is the gradient of
``(1/W) Σ_r loss_r``, which is this function on the whole global batch (all queries, ``offset = 0``), i.e. the
single-process gradient at the same global batch. float32 inside (float64 stays float64), autocast off.

The temperature default 0.2 is the official ViT recipes' ``--moco-t=.2``; the official ``main_moco.py`` default,
used by its ResNet-50 recipe, is 1.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_positive, check_rows, compute_dtype, same_shapes

__all__ = ["moco_v3_loss"]


def _ctr(q: Tensor, k: Tensor, temperature: float, offset: int) -> Tensor:
    """``2τ ·`` cross-entropy of ``nrm(q) nrm(k)ᵀ / τ`` with positives at ``k[offset + i]`` (fp32, no autocast)."""
    qn = F.normalize(q, dim=1, eps=NORM_EPS)
    kn = F.normalize(k, dim=1, eps=NORM_EPS)
    logits = (qn @ kn.mT) / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_loss(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    *,
    temperature: float = 0.2,
    offset: int = 0,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``ctr(q1, k2) + ctr(q2, k1)`` of queries ``[N, D]`` and (gathered) keys ``[M, D]`` (module docstring).

    Args:
        q1, q2: ``[N, D]`` queries (predictor outputs) of views 1 and 2, this rank's rows.
        k1, k2: ``[M, D]`` keys (momentum-encoder outputs) of views 1 and 2, ``M >= offset + N``; detached here.
        temperature: ``τ > 0``.
        offset: row of ``k`` holding the positive of query 0 (``rank · N`` with gathered keys; 0 when
            ``k`` holds exactly the queries' images).
        return_parts: also return ``{"ctr_q1_k2": ctr(q1, k2), "ctr_q2_k1": ctr(q2, k1)}`` (detached 0-d tensors).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64), or ``(loss, parts)``.

    Raises:
        ValueError: ``q1, q2`` (or ``k1, k2``) differ in shape, not ``[rows, D]``, queries and keys differ in
            ``D``, ``offset`` out of range, ``temperature <= 0``.
        TypeError: non-tensor or non-floating input, non-integer ``offset``.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_positive(temperature, "temperature")
    for name, t in (("q1", q1), ("q2", q2), ("k1", k1), ("k2", k2)):
        check_rows(t, name, "moco_v3_loss")
    same_shapes({"q1": q1, "q2": q2})
    same_shapes({"k1": k1, "k2": k2})
    (n, d), m = q1.shape, k1.shape[0]
    if k1.shape[1] != d:
        raise ValueError(f"queries and keys must have the same width D; got q1 {tuple(q1.shape)}, k1 {tuple(k1.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= m - n:
        raise ValueError(
            f"offset must be in [0, M − N] = [0, {m - n}] (positives at k[offset + i] for N = {n} queries, "
            f"M = {m} keys); got {offset}"
        )
    dtype = compute_dtype(q1, q2, k1, k2)
    with torch.autocast(device_type=q1.device.type, enabled=False):
        a = _ctr(q1.to(dtype), k2.detach().to(dtype), temperature, offset)
        b = _ctr(q2.to(dtype), k1.detach().to(dtype), temperature, offset)
        loss = a + b
    if not return_parts:
        return loss
    return loss, {"ctr_q1_k2": a.detach(), "ctr_q2_k1": b.detach()}
