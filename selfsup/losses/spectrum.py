r"""Spectrum diagnostics of a batch of embeddings: singular values, effective rank, RankMe.

For ``z`` of shape ``[N, D]`` let ``Ẑ`` be ``z`` with rows L2-normalised (optional)
and then columns centred (optional), and ``s`` its ``min(N, D)`` singular values.

* :func:`singular_values` returns ``s`` (descending).
* :func:`effective_rank` is ``exp(H(p))`` with ``p = s / Σ s`` and
  ``H(p) = −Σ p log p`` (Roy & Vetterli 2007). ``r`` orthogonal directions of equal
  energy give ``r``; one direction gives 1. Singular values at rounding level,
  ``s_k <= max(N, D)·ε_dtype·||Z||_F`` (``Z`` before centring, cf.
  ``torch.linalg.matrix_rank``), count as zero, so a fully collapsed batch (every
  row the same, which centring turns into rounding noise) gives 0, not the
  effective rank of that noise.
* :func:`rankme` is RankMe (Garrido et al. 2023): ``exp(H(p))`` with
  ``p_k = s_k / ||s||_1 + ε``, by default on the raw embeddings as in the paper
  (no normalisation, no centring); a collapsed batch gives ≈ 1.

Pure functions without gradient, in float32 (float64 stays float64) with autocast
off. Each returns a 0-d tensor on ``z``'s device (``.item()`` it for logging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.mec import _compute_dtype, _validate_rows

__all__ = ["singular_values", "effective_rank", "rankme"]

_NORM_EPS = 1e-12


def _prepare(z: Tensor, center: bool, normalize: bool, name: str) -> tuple[Tensor, Tensor]:
    """``(Ẑ, ||Z||_F)``: normalised-then-centred matrix and the norm before centring."""
    _validate_rows(z, "z", name)
    x = z.detach().to(_compute_dtype(z))
    if normalize:
        x = F.normalize(x, dim=1, eps=_NORM_EPS)
    scale = torch.linalg.vector_norm(x)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    return x, scale


def _entropy_exp(p: Tensor) -> Tensor:
    return torch.exp(-torch.xlogy(p, p).sum())


@torch.no_grad()
def singular_values(z: Tensor, center: bool = True, normalize: bool = True) -> Tensor:
    """Singular values (descending, ``min(N, D)`` of them) of row-normalised, column-centred ``z``.

    Args:
        z: ``[N, D]`` embeddings, any floating dtype.
        center: subtract the column means (after normalising).
        normalize: L2-normalise each row first.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        x, _ = _prepare(z, center, normalize, "singular_values")
        return torch.linalg.svdvals(x)


@torch.no_grad()
def effective_rank(z: Tensor, center: bool = True, normalize: bool = True) -> Tensor:
    """``exp(entropy(s / Σ s))`` of :func:`singular_values` (rounding-level values dropped).

    Between 1 and ``min(N, D)``, except 0 when nothing is left (e.g. every row the
    same direction and ``center=True``).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        x, scale = _prepare(z, center, normalize, "effective_rank")
        s = torch.linalg.svdvals(x)
        tol = max(x.shape) * torch.finfo(x.dtype).eps * scale
        s = torch.where(s > tol, s, torch.zeros_like(s))
        total = s.sum()
        if not bool(total > 0):
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return _entropy_exp(s / total)


@torch.no_grad()
def rankme(z: Tensor, eps: float = 1e-7, center: bool = False, normalize: bool = False) -> Tensor:
    """RankMe (Garrido et al. 2023): ``exp(−Σ_k p_k log p_k)``, ``p_k = s_k / ||s||_1 + eps``.

    ``s`` are the singular values of the raw embeddings by default (the paper's
    definition); ``center``/``normalize`` apply the same preprocessing as
    :func:`singular_values`. About 1 for a collapsed batch, ``r`` for ``r``
    orthogonal directions of equal energy (up to ``O(eps·log eps)`` terms).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        x, _ = _prepare(z, center, normalize, "rankme")
        s = torch.linalg.svdvals(x)
        p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
        return _entropy_exp(p)
