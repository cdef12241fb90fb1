r"""VICReg (Bardes et al., 2022): backbone + expander, variance-invariance-covariance regularisation.

Follows facebookresearch/vicreg ``main_vicreg.py`` at HEAD (4e12602): ``VICReg.__init__`` / ``forward``,
``Projector``, ``FullGatherLayer``, ``main`` (SyncBN, LARS with ``exclude_bias_and_norm``) and
``adjust_learning_rate``; ``augmentations.py`` ``TrainTransform``.

For views ``x, y`` (separate forward passes, as the official ``self.backbone(x)``, ``self.backbone(y)``: train-mode
BatchNorm statistics per view), ``z_x = g(f(x))``, ``z_y = g(f(y))`` and, over the ``N`` rows gathered from every
rank (``vicreg_loss``)::

    inv  = (1 / (N D)) Σ (z_x − z_y)²
    var  = ½ mean_d relu(1 − sqrt(Var_n z_x·d + 1e-4)) + ½ mean_d relu(1 − sqrt(Var_n z_y·d + 1e-4))   (unbiased)
    cov  = (1/D) Σ_{i≠j} C(z_x)_ij² + (1/D) Σ_{i≠j} C(z_y)_ij²,   C(z) = (z − z̄)ᵀ (z − z̄) / (N − 1)
    loss = 25 · inv + 25 · var + 1 · cov                                 (sim_coeff, std_coeff, cov_coeff)

Expander as the official ``--mlp 8192-8192-8192``: ``Linear(F, 8192) BN ReLU Linear(8192, 8192) BN ReLU
Linear(8192, 8192, bias=False)``. All parameters in one group (one lr); the engine keeps 1-D parameters out of weight
decay and of the LARS trust ratio (``optim.exclude_1d``), the official ``exclude_bias_and_norm`` filters.

Why gathering both views for every term is the official gradient: the official computes ``inv`` on each rank's
*local* rows and ``var`` / ``cov`` on rows gathered by ``FullGatherLayer``, whose backward all-reduces (sums) the
gradient and keeps this rank's slice, exactly :func:`selfsup.distributed.gather` (``gather_grad="all"``). For
``var`` / ``cov`` the two codes are then the same. For ``inv`` with ``W`` ranks of ``n`` equal rows: the global MSE is
``inv = (1/W) Σ_r inv_r``; here every rank computes ``inv`` on the gathered rows and the gather's backward sums the
``W`` ranks' identical gradients for its own rows: ``W · ∂inv/∂z_r = ∂inv_r/∂z_r``, the gradient the official rank
``r`` back-propagates from its local MSE. DDP's averaging then gives both codes ``(1/W) Σ_r ∇inv_r = ∇inv``, the
single-process gradient at the global batch. Only the logged value differs (global here, rank-local there).

Departures: the hidden expander layers have no bias (a bias before train-mode BatchNorm is subtracted with the batch
mean: it changes no training output and no gradient, its own gradient is 0 so it keeps its initial value, and in eval
mode the running mean absorbs it; the state dict lacks those keys). The covariance divides by ``N − 1`` with ``N`` the gathered rows, the official by the
configured ``--batch-size − 1`` even on the short last batch its loader keeps. The loss runs in fp32 with autocast off
(the official: under autocast).
"""

from __future__ import annotations

from typing import Optional

import torch

from selfsup.losses import vicreg_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class VICReg(Method):
    """VICReg.

    Args:
        backbone: backbone spec ``{name, kwargs}`` (official: ResNet-50, ``zero_init_residual``).
        projector: the expander's widths after the backbone feature (official ``[8192, 8192, 8192]``; solo-learn
            CIFAR ``[2048, 2048, 2048]``); last layer without bias.
        sim_coeff, std_coeff, cov_coeff: weights of the invariance, variance and covariance terms (official 25, 25,
            1). solo-learn's variance term lacks the official ``½`` per branch: its ``var_loss_weight`` 25 is
            ``std_coeff`` 50 here.
        gather_distributed: variance and covariance over the global batch under DDP (the official); ``False``:
            each rank's own rows.
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "projector": [16, 8]}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        projector: Optional[list[int]] = None,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone)
        projector = [8192, 8192, 8192] if projector is None else list(projector)
        self.projector = MLP([self.num_features, *projector])
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.coeffs = {"sim_coeff": float(sim_coeff), "std_coeff": float(std_coeff), "cov_coeff": float(cov_coeff)}
        self.gather_distributed = bool(gather_distributed)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.check_views(batch.views)
        h1, h2 = self.backbone(batch.views[:, 0]), self.backbone(batch.views[:, 1])  # per-view BN statistics
        z1, z2 = self.projector(h1), self.projector(h2)
        loss, parts = vicreg_loss(self.gather(z1), self.gather(z2), **self.coeffs, return_parts=True)
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (z1.detach(), z2.detach())}
        return {"loss": loss, **parts, "embeddings": embeddings}
