r"""SimSiam (Chen & He, CVPR 2021): one encoder (backbone + projector) and a predictor, a stop-gradient on the
projections, no negatives, no momentum encoder.

Follows facebookresearch/simsiam: ``simsiam/builder.py`` (``SimSiam.__init__``, ``SimSiam.forward``) and
``main_simsiam.py`` (``main_worker``: the ``--fix-pred-lr`` parameter groups and SGD; ``train``: the loss;
``adjust_learning_rate``: the predictor's fixed lr; the MoCo v2 augmentation).

For views ``x1, x2`` (separate forward passes, BatchNorm statistics per view, as ``SimSiam.forward``), projections
``z_v = proj(f(x_v))`` and predictions ``p_v = pred(z_v)``::

    loss = −½ ( mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i)) )     (selfsup.losses.simsiam_loss)

``sg`` is the stop-gradient (``z1.detach(), z2.detach()``). The loss is per sample: no gather (the official code
gathers nothing); DDP's gradient averaging gives the global-batch mean. Logged besides: ``z_std``, the mean over
channels of the batch std of ``nrm(z)`` (the paper's collapse monitor, Fig. 2: 0 at collapse, about ``1/√dim``
when healthy).

Heads, as ``builder.py``:

* projector ``F -> F (BN, ReLU) -> F (BN, ReLU) -> dim -> BN(dim, affine=False)``, the first two Linear without bias.
  The official last Linear has a bias frozen at its random init (``self.encoder.fc[6].bias.requires_grad = False``,
  "not use bias as it is followed by BN"); here it has none: BN removes any constant in train mode, so outputs and
  gradients are the same (in eval mode the running mean absorbs it once its ``0.9^t`` start-up has decayed);
* predictor ``dim -> pred_dim (BN, ReLU) -> dim``, the last Linear with a bias.

``hidden_dim=None`` is the official ``F`` (2048 for ResNet-50); solo-learn's CIFAR setting uses 2048 on ResNet-18.

``fix_pred_lr`` (``--fix-pred-lr``, used by the README's runs): ``param_groups`` returns the predictor as its own
group with ``"fixed_lr": True``, which the engine's scheduler keeps at its peak lr (no warm-up, no decay) while the
encoder's follows the schedule: the official ``fix_lr`` group of ``adjust_learning_rate``, solo-learn's ``static_lr``.

Departures: the cosine is per optimiser step (the official one is per epoch, from ``init_lr`` at epoch 0 to
``init_lr · ½(1 + cos(π · 99/100))`` in the last one, never 0).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses import simsiam_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec

__all__ = ["SimSiam"]


@register_method
class SimSiam(Method):
    """SimSiam.

    Args:
        backbone: backbone spec ``{name, kwargs}`` (official: ResNet-50 with ``zero_init_residual``).
        dim: projector output width and predictor output width (``--dim`` 2048).
        pred_dim: hidden width of the predictor (``--pred-dim`` 512).
        hidden_dim: hidden width of the projector (default: the backbone's feature width, as the official code).
        fix_pred_lr: the predictor in its own parameter group marked ``fixed_lr`` (``--fix-pred-lr``; the README's
            command and reported numbers use it).
    """

    num_views = 2
    tiny = {"backbone": TINY_RESNET, "dim": 16, "pred_dim": 8, "hidden_dim": 16}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        dim: int = 2048,
        pred_dim: int = 512,
        hidden_dim: Optional[int] = None,
        fix_pred_lr: bool = True,
    ):
        super().__init__(backbone)
        hidden = self.num_features if hidden_dim is None else int(hidden_dim)
        if min(int(dim), int(pred_dim), hidden) <= 0:
            raise ValueError(f"dim, pred_dim and hidden_dim must be positive, got {dim}, {pred_dim}, {hidden}")
        self.projector = MLP([self.num_features, hidden, hidden, dim], last_bn=True)
        self.predictor = MLP([dim, pred_dim, dim], last_bias=True)
        self.fix_pred_lr = bool(fix_pred_lr)

    def param_groups(self) -> list[dict[str, Any]]:
        """One group, or with ``fix_pred_lr`` the encoder (backbone + projector) and the predictor with
        ``"fixed_lr": True`` (its lr stays at the peak: the official ``fix_lr`` group)."""
        if not self.fix_pred_lr:
            return super().param_groups()
        encoder = [p for m in (self.backbone, self.projector) for p in m.parameters() if p.requires_grad]
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        return [{"name": "encoder", "params": encoder}, {"name": "predictor", "params": predictor, "fixed_lr": True}]

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        self.check_views(batch.views)
        x1, x2 = batch.views[:, 0], batch.views[:, 1]
        h1, h2 = self.backbone(x1), self.backbone(x2)  # separate passes, as SimSiam.forward
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1.detach(), z2.detach())
        with torch.no_grad():
            z_std = (
                F.normalize(z1.float(), dim=1).std(dim=0).mean() + F.normalize(z2.float(), dim=1).std(dim=0).mean()
            ) / 2
        embeddings = {"backbone": (h1.detach(), h2.detach()), "projector": (z1.detach(), z2.detach())}
        return {"loss": loss, "z_std": z_std, "embeddings": embeddings}
