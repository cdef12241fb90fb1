r"""MEC: maximum entropy coding (Liu et al., NeurIPS 2022), spec §1.6 and §2 (OFF-MEC).

Student = backbone -> 3-layer projector -> predictor; teacher = an EMA copy of backbone + projector (no
predictor), τ on a half-cosine 0.996 -> 1 over the run (declared, stepped by the base class). The two views
go through **separate** forward passes (BatchNorm statistics per view, as the seed). With student outputs
``z_i`` and teacher outputs ``p_i`` gathered over ranks (``m`` rows, width ``d``)::

    T(P, Z)  = tr( Σ_{k=1}^{order} (-1)^{k+1} (λ P̂ Ẑᵀ)^k / k )   (Taylor series of log det(I + λ P̂ Ẑᵀ))
    mec      = [T(p1, z2) + T(p2, z1)] / (2m)
    loss     = -lamda_inv · mec,      lamda_inv = 1/λ = m · eps_sq / d     (seed: 1024 · 64 / 2048 = 32)

``eps_sq`` is ε², the squared distortion bound (the seed's ``--eps 64`` is already squared).
``lamda_inv`` is warmed up per step, linearly from ``8 · lamda_inv`` at step 0 to ``lamda_inv`` at the end of
``warmup_epochs`` (seed: 10), then constant, so λ *inside* T changes too. ``m`` is the number of gathered
rows (the seed used the per-node batch, wrong on several nodes, spec §8 OFF-MEC 1). Logged: the coding
length ``μ · mec`` with ``μ = (m + d) / 2``, ``lamda_inv``, and the effective rank of the (detached) backbone
features of the first view.

The seed's projector ends with ``Linear(F, d)`` whose bias is frozen at its random init, followed by
``BN(d, affine=False)``, which removes any constant: here that layer simply has no bias (same outputs).
The seed trains every parameter (predictor included) in one SGD group, so MEC keeps the default groups.

Healthy values of ``loss`` lie in about ``[-1, 0]`` (its first-order part is ``-mean cos``). The truncated series
of the non-symmetric ``P̂ Ẑᵀ`` is unbounded below (complex eigenvalues): a loss well below -1 means the student
found such a degenerate configuration (seen in short small-batch runs at the seed's ``d/eps_sq`` = 32); a smaller
``d/eps_sq`` (= λm, e.g. 2) removes it.
"""

from __future__ import annotations

from typing import Optional

import torch

from selfsup.losses import mec_lamda_inv, mec_loss, mec_warmup_lamda_inv
from selfsup.losses.spectrum import effective_rank
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class MEC(Method):
    """MEC with an EMA teacher (OFF-MEC).

    Args:
        backbone: backbone spec ``{name, kwargs}`` (seed: ResNet-50, ``zero_init_residual: true``).
        dim: output width ``d`` of projector and predictor (seed ``--dim`` 2048).
        pred_dim: hidden width of the predictor (seed ``--pred-dim`` 512).
        hidden_dim: hidden width of the projector (default: the backbone's feature width, as the seed).
        eps_sq: ε², the squared distortion bound (seed ``--eps`` 64).
        order: Taylor order of log det (seed: 4, fixed); ``None`` uses the exact ``log |det(I + λ P̂Ẑᵀ)|``, which
            unlike the truncated series is bounded below (see :mod:`selfsup.losses.mec`).
        warmup_epochs: epochs of the linear 8x -> 1x ``lamda_inv`` warm-up (seed: 10), applied per step.
        tau, final_tau: teacher EMA rate, half-cosine from ``tau`` to ``final_tau`` (seed: 0.996 -> 1).
        gather_distributed: compute the loss over the global batch under DDP (as the seed).
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "dim": 16, "pred_dim": 8, "hidden_dim": 16}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        dim: int = 2048,
        pred_dim: int = 512,
        hidden_dim: Optional[int] = None,
        eps_sq: float = 64.0,
        order: Optional[int] = 4,
        warmup_epochs: float = 10.0,
        tau: float = 0.996,
        final_tau: float = 1.0,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone)
        hidden = self.num_features if hidden_dim is None else int(hidden_dim)
        # Linear(F, h, no bias) BN ReLU Linear(h, h, no bias) BN ReLU Linear(h, d) BN(d, affine=False)
        self.projector = MLP([self.num_features, hidden, hidden, dim], last_bn=True)
        # Linear(d, pred_dim, no bias) BN ReLU Linear(pred_dim, d, bias)
        self.predictor = MLP([dim, pred_dim, dim], last_bias=True)
        if eps_sq <= 0 or warmup_epochs < 0:
            raise ValueError(f"eps_sq must be > 0 and warmup_epochs >= 0, got {eps_sq}, {warmup_epochs}")
        self.dim, self.eps_sq, self.order = int(dim), float(eps_sq), (None if order is None else int(order))
        self.warmup_epochs = float(warmup_epochs)
        self.gather_distributed = gather_distributed
        teacher = EMATeacher(tau, final_tau=final_tau, backbone=self.backbone, projector=self.projector)
        self.add_teacher("teacher", teacher)

    def lamda_inv_at(self, m: int, step: int, steps_per_epoch: int) -> float:
        """``1/λ`` at optimiser ``step``: ``m · eps_sq / d``, times 8 -> 1 over the warm-up steps."""
        warmup_steps = round(self.warmup_epochs * steps_per_epoch)
        return float(mec_warmup_lamda_inv(step, warmup_steps, mec_lamda_inv(m, self.dim, self.eps_sq)))

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.check_views(batch.views)
        x1, x2 = batch.views[:, 0], batch.views[:, 1]
        h1, h2 = self.backbone(x1), self.backbone(x2)  # two separate passes: BatchNorm statistics per view, as the seed
        y1, y2 = self.projector(h1), self.projector(h2)
        z1, z2 = self.predictor(y1), self.predictor(y2)
        with torch.no_grad():
            p1, p2 = self.teacher(x1), self.teacher(x2)
        z1, z2, p1, p2 = self.gather(z1), self.gather(z2), self.gather(p1), self.gather(p2)
        lamda_inv = self.lamda_inv_at(z1.shape[0], batch.step, batch.steps_per_epoch)
        loss, parts = mec_loss(
            z1, z2, p1, p2, eps_sq=self.eps_sq, order=self.order, lamda_inv=lamda_inv, return_parts=True
        )
        with torch.no_grad():
            erank = effective_rank(h1.detach().float())
        logs = {k: torch.as_tensor(val).detach().float() for k, val in parts.items()}
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (y1.detach(), y2.detach())}
        return {"loss": loss, **logs, "effective_rank": torch.as_tensor(erank).float(), "embeddings": embeddings}
