r"""Spectrum diagnostics of a batch of embeddings: singular values, effective rank, RankMe,
alignment and uniformity.

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

* :func:`alignment` and :func:`uniformity` (Wang & Isola 2020) are computed on the
  L2-normalised rows ``ẑ``: alignment ``E ||ẑ_a − ẑ_b||^α`` over pairs of views of the
  same image (0 = every view maps to the same point, 4 = antipodal for ``α = 2``);
  uniformity ``log E_{i≠j} exp(−t ||ẑ_i − ẑ_j||²)`` over pairs of distinct images
  (−4t for two antipodal points; lower = more uniform on the sphere, 0 = collapse).

Pure functions without gradient, in float32 (float64 stays float64) with autocast
off. Each returns a 0-d tensor on ``z``'s device (``.item()`` it for logging).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import NORM_EPS, check_rows, compute_dtype

__all__ = ["alignment", "effective_rank", "rankme", "singular_values", "uniformity"]


def _prepare(z: Tensor, center: bool, normalize: bool, name: str) -> tuple[Tensor, Tensor]:
    """``(Ẑ, ||Z||_F)``: normalised-then-centred matrix and the norm before centring."""
    check_rows(z, "z", name)
    x = z.detach().to(compute_dtype(z))
    if normalize:
        x = F.normalize(x, dim=1, eps=NORM_EPS)
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


@torch.no_grad()
def alignment(views: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Alignment of views (Wang & Isola 2020): ``mean_{b, v<w} ||ẑ_{b,v} − ẑ_{b,w}||^α``.

    Args:
        views: ``[B, V, D]`` embeddings, sample-major (``views[b, v]`` is view ``v`` of image ``b``),
            ``V >= 2``; each row is L2-normalised first.
        alpha: exponent (2 in the paper).

    Returns 0 when all views of an image coincide, 4 (``α = 2``) when two views are antipodal.
    """
    if views.dim() != 3 or views.shape[1] < 2:
        raise ValueError(f"alignment needs views [B, V, D] with V >= 2, got shape {tuple(views.shape)}")
    with torch.autocast(device_type=views.device.type, enabled=False):
        check_rows(views.flatten(0, 1), "views", "alignment")
        x = F.normalize(views.detach().to(compute_dtype(views)), dim=2, eps=NORM_EPS)
        v = x.shape[1]
        a, b = torch.triu_indices(v, v, offset=1, device=x.device)
        d = (x[:, a] - x[:, b]).norm(dim=2)  # [B, pairs]
        return d.pow(alpha).mean()


@torch.no_grad()
def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    r"""Uniformity (Wang & Isola 2020): ``log mean_{i≠j} exp(−t ||ẑ_i − ẑ_j||²)`` over rows of ``z``.

    Args:
        z: ``[N, D]`` embeddings of ``N >= 2`` distinct images; each row is L2-normalised first.
        t: temperature (2 in the paper).

    Two antipodal rows give ``−4t``; identical rows give 0 (collapse). Computed with
    ``logsumexp`` so it never underflows.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        check_rows(z, "z", "uniformity")
        if z.shape[0] < 2:
            raise ValueError(f"uniformity needs at least 2 rows, got shape {tuple(z.shape)}")
        x = F.normalize(z.detach().to(compute_dtype(z)), dim=1, eps=NORM_EPS)
        n = x.shape[0]
        sq = (2.0 - 2.0 * (x @ x.T)).clamp_min(0.0)  # ||x_i - x_j||^2 of unit rows
        off = ~torch.eye(n, dtype=torch.bool, device=x.device)
        return torch.logsumexp(-t * sq[off], dim=0) - math.log(n * (n - 1))
