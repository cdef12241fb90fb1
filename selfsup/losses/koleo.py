r"""KoLeo: the Kozachenko-Leonenko differential-entropy regulariser (Sablayrolles et al., 2019), as DINOv2 uses it.

Follows ``facebookresearch/dinov2``, ``dinov2/loss/koleo_loss.py`` (``KoLeoLoss``), called from
``dinov2/train/ssl_meta_arch.py`` (``koleo_loss_weight · Σ_{global crop} koleo(student class tokens of that crop)``,
before the head, each crop's rows on their own and each rank's rows on their own: no gather).

For ``N`` rows ``x_i ∈ R^D``, first L2-normalised (``x_i / max(||x_i||, eps)``, ``F.normalize`` as the official)::

    nn(i)  = argmax_{j ≠ i} <x_i, x_j>              (nearest other row: on the sphere, max inner product = min distance)
    d_i    = || x_i − x_nn(i) + δ·1 ||_2             (torch.nn.PairwiseDistance(p=2, eps=δ), δ = 1e-8: δ is added to
                                                     every coordinate of the difference, as torch's pairwise_distance)
    loss   = −(1/N) Σ_i log(d_i + eps)

Minimising it spreads the rows over the sphere (it grows as two rows approach each other). The nearest neighbour is
picked without gradient (an index); the gradient flows through ``d_i`` into both ``x_i`` and ``x_nn(i)``.

One departure, only in a degenerate case: the diagonal of the inner products is set to ``−inf`` where the official
code fills it with ``−1``; for unit rows the two differ only when every other row of some row is exactly antipodal to
it (inner product ``−1``), where the official ``argmax`` may pick the row itself (a distance of ``δ·sqrt(D)``).

Distributed training: per rank, as the official (DINOv2 never gathers the class tokens for KoLeo); the DDP gradient
is the mean over ranks of each rank's KoLeo gradient. float32 inside (float64 stays float64), autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.checks import check_floating, check_positive, compute_dtype

__all__ = ["koleo_loss"]

PAIRWISE_EPS = 1e-8  # torch.nn.PairwiseDistance(2, eps=1e-8) in dinov2/loss/koleo_loss.py


def koleo_loss(x: Tensor, *, eps: float = 1e-8) -> Tensor:
    r"""``−mean_i log(||x̂_i − x̂_nn(i) + δ||_2 + eps)`` over the L2-normalised rows ``x̂`` of ``x [N, D]``.

    ``nn(i)`` is the other row of largest inner product; ``δ = 1e-8`` is ``PairwiseDistance``'s eps (see the module
    docstring). Follows ``KoLeoLoss.forward`` in ``facebookresearch/dinov2/dinov2/loss/koleo_loss.py`` (``eps`` is
    both the normalisation's and the logarithm's, as there).

    Args:
        x: ``[N, D]`` rows (DINOv2: one global crop's student class tokens), ``N >= 2``; normalised here (rows that
            already have unit norm are unchanged).
        eps: ``> 0``, in the normalisation and inside the logarithm (official 1e-8).

    Returns:
        A 0-d float32 tensor (float64 for float64 input).

    Raises:
        ValueError: ``x`` not 2-D, fewer than 2 rows, ``eps <= 0``.
        TypeError / FloatingPointError: non-floating or non-finite input (named).
    """
    check_positive(eps, "eps")
    check_floating(x, "x", "koleo_loss", "[N, D]")
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs x of shape [N, D] with N >= 2 (a nearest other row); got {tuple(x.shape)}")
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.to(dtype), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = z @ z.T
            dots.fill_diagonal_(float("-inf"))  # never the row itself
            nn_index = dots.argmax(dim=1)
        d = F.pairwise_distance(z, z[nn_index], p=2, eps=PAIRWISE_EPS)  # [N]
        return -torch.log(d + eps).mean()
