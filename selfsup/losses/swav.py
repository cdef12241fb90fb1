r"""SwAV: online codes from a distributed Sinkhorn-Knopp and the swapped-prediction loss.

Follows ``facebookresearch/swav``, ``main_swav.py``: ``distributed_sinkhorn`` (:func:`sinkhorn_knopp`) and the
"swav loss" block of ``train`` (:func:`swav_loss`), current main branch (the version that normalises
``Q``'s rows and columns directly rather than through the ``u, r, c`` vectors of the first release).

Notation: ``B`` local samples, ``W`` ranks, ``N = B·W`` the global batch, ``K`` prototypes, ``ε`` the entropic
regularisation, ``T`` the temperature, scores ``s_{b,k} = <z_b, c_k>`` (normalised features against normalised
prototypes, computed by the caller).

Sinkhorn-Knopp (``[B, K] → [B, K]``, no gradient)::

    Q = exp(s / ε)ᵀ                                   [K, B] on each rank (global: [K, N])
    Q ← Q / Σ_{k,b} Q                                  (sum all-reduced over ranks)
    repeat iters times:
        Q_{k,·} ← Q_{k,·} / (K · Σ_b Q_{k,b})          (each prototype's mass 1/K; row sums all-reduced)
        Q_{·,b} ← Q_{·,b} / (N · Σ_k Q_{k,b})          (each sample's mass 1/N; local)
    return (N · Q)ᵀ                                    [B, K]: each row (a sample's code) sums to 1

After enough iterations every prototype receives ``N/K`` of the global batch's unit codes (an equipartition); each
rank's output is its own rows of the result of the whole global batch (the all-reduces make it so). The constant
factors (the total, ``1/K``, ``1/N``) only fix the scale of the intermediate ``Q`` and cancel in the result; what
makes the codes global is that the shift, the total and the row sums are the same on every rank.

Swapped prediction: ``scores [B, V, K]`` of every crop, ``codes [B, Vq, K]`` computed from crops ``0 .. Vq − 1``
(``crops_for_assign``), ``p_{b,v} = log_softmax(scores_{b,v} / T)``::

    loss = (1/Vq) Σ_{q < Vq} (1/(V − 1)) Σ_{v ≠ q} (1/B) Σ_b −Σ_k codes_{b,q,k} · p_{b,v,k}

Per-sample given the codes, so no gather is needed: with codes from the distributed Sinkhorn and equal local
batches, DDP's averaging of the per-rank means is the single-process gradient of the global batch.

The one departure, exact in exact arithmetic: the scores are shifted by their global maximum (all-reduced MAX)
before the exponential. The first normalisation divides any constant factor ``exp(−max/ε)`` out again, so the
result is unchanged, but ``exp`` can no longer overflow (the official code returns NaN once ``s/ε > 88`` in
float32). float32 inside (float64 stays float64), autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.distributed import all_reduce_, world_size
from selfsup.losses.checks import check_floating, check_positive, compute_dtype

__all__ = ["sinkhorn_knopp", "swav_loss"]


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, *, epsilon: float = 0.05, iters: int = 3) -> Tensor:
    r"""SwAV's codes: ``iters`` Sinkhorn-Knopp steps on ``exp(scores/ε)`` over the global batch, ``[B, K]``.

    Follows ``distributed_sinkhorn`` in ``facebookresearch/swav/main_swav.py`` (formula in the module docstring):
    a total normalisation, then ``iters`` times the prototype (row) normalisation to ``1/K`` with row sums
    all-reduced and the sample (column) normalisation to ``1/N``, ``N = B·world_size``; returns ``N·Qᵀ``.

    Runs under ``torch.no_grad`` (the codes are targets; ``scores`` may require grad, the result never does).
    A collective under ``torch.distributed`` (``selfsup.distributed.is_dist``): every rank calls it with its own
    ``B`` rows (equal ``B`` on every rank, as the official ``B = Q.shape[1] * world_size`` assumes) and gets its
    rows of the global result. Identity communication without a process group. With SwAV's queue, the caller
    concatenates the queue's scores before the batch and keeps the last ``B`` rows, as the official code does.

    Args:
        scores: ``[B, K]`` prototype scores of one crop (any floating dtype).
        epsilon: ``ε > 0`` (official default 0.05).
        iters: the number of Sinkhorn iterations, ``>= 1`` (official default 3).

    Returns:
        ``[B, K]`` float32 codes (float64 for float64 input): every row sums to 1; after many iterations every
        column sums to ``N/K`` over the global batch. Invariant to adding a constant to all scores.

    Raises:
        ValueError: ``scores`` not 2-D or empty, ``epsilon <= 0``, ``iters < 1``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in ``scores``; or codes that are not finite (``exp((s − max s)/ε)``
            underflowed to 0 for a whole sample or prototype: scores spread over more than about ``87·ε``).
    """
    check_positive(epsilon, "epsilon")
    if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    check_floating(scores, "scores", "sinkhorn_knopp", "[B, K]")
    b, k = scores.shape
    n = b * world_size()  # the global batch
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.detach().to(compute_dtype(scores)) / epsilon
        shift = all_reduce_(s.max(), "max")  # the same constant on every rank
        q = torch.exp(s - shift).T.contiguous()  # [K, B]
        q /= all_reduce_(q.sum())
        for _ in range(iters):
            q /= all_reduce_(q.sum(dim=1, keepdim=True))  # prototypes: all-reduced row sums ...
            q /= k  # ... to 1/K each
            q /= q.sum(dim=0, keepdim=True)  # samples: local column sums ...
            q /= n  # ... to 1/N each
        q *= n  # every sample's code sums to 1
        if not bool(torch.isfinite(q).all()):
            raise FloatingPointError(
                f"sinkhorn_knopp: the codes are not finite: exp((scores − max)/epsilon) underflowed to 0 for a whole "
                f"sample or prototype (scores spread {float(s.max() - s.min()) * epsilon:.3g}, epsilon {epsilon}); "
                "normalise the features and prototypes or raise epsilon."
            )
        return q.T


def swav_loss(scores: Tensor, codes: Tensor, *, temperature: float = 0.1) -> Tensor:
    r"""SwAV's swapped prediction: each code predicted from every *other* crop's scores.

    ``loss = (1/Vq) Σ_{q<Vq} (1/(V−1)) Σ_{v≠q} mean_b −Σ_k codes_{b,q,k} log_softmax(scores_{b,v}/T)_k``;
    follows the "swav loss" block of ``train`` in ``facebookresearch/swav/main_swav.py``
    (``subloss / (sum(nmb_crops) − 1)`` per assigned crop, then ``/ len(crops_for_assign)``).

    Args:
        scores: ``[B, V, K]`` prototype scores of every crop, sample-major (``scores[b, v]`` is crop ``v`` of image
            ``b``; the official view-major ``[V·B, K]`` output is ``out.view(V, B, K).transpose(0, 1)``).
        codes: ``[B, Vq, K]`` codes of crops ``0 .. Vq − 1`` (``Vq ≤ V``), e.g. :func:`sinkhorn_knopp` of
            ``scores[:, q]``; used without gradient.
        temperature: ``T > 0`` (official default 0.1).

    Returns:
        A 0-d float32 tensor (float64 when an input is float64); the gradient reaches ``scores`` only.

    Raises:
        ValueError: wrong ranks, ``B`` or ``K`` differ, ``Vq > V``, ``V < 2``, ``temperature <= 0``.
        TypeError: non-tensor or non-floating input.
        FloatingPointError: NaN or Inf in an input (the message names it).
    """
    check_positive(temperature, "temperature")
    check_floating(scores, "scores", "swav_loss", "[B, V, K]")
    check_floating(codes, "codes", "swav_loss", "[B, Vq, K]")
    (b, v, k), (bq, vq, kq) = scores.shape, codes.shape
    if (b, k) != (bq, kq):
        raise ValueError(
            f"scores [B, V, K] and codes [B, Vq, K] must agree on B and K; "
            f"got {tuple(scores.shape)} and {tuple(codes.shape)}"
        )
    if vq > v:
        raise ValueError(f"codes has more views ({vq}) than scores ({v}): code q is of crop q")
    if v < 2:
        raise ValueError(f"swav_loss needs at least 2 crops (a code is predicted from the other crops); got V = {v}")
    dtype = compute_dtype(scores, codes)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_p = F.log_softmax(scores.to(dtype) / temperature, dim=-1)
        ce = -torch.einsum("bqk,bvk->qv", codes.detach().to(dtype), log_p) / b  # [Vq, V] batch means
        other = ~torch.eye(vq, v, dtype=torch.bool, device=ce.device)  # crop q does not predict its own code
        # every q has exactly V − 1 other crops, so the mean over pairs is mean_q (Σ_{v≠q} / (V − 1))
        return ce[other].mean()
