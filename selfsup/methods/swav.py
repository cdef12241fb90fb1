r"""SwAV (Caron et al., 2020): online clustering with Sinkhorn-Knopp codes and swapped prediction over multi-crop.

Follows ``facebookresearch/swav`` (main branch): ``main_swav.py`` (``train``: the prototype normalisation at the start
of every iteration, the "swav loss" block with the queue, the prototype freeze; ``distributed_sinkhorn``; ``main``:
the queue's creation and its length rounding) and ``src/resnet50.py`` (``ResNet.forward``: the backbone run once per
crop resolution, ``forward_head``: projection head on every crop together, L2 normalisation, prototypes).

For ``V`` global views (``batch.views``) and ``Vl`` local views (``batch.local_views``) of ``B`` images, crops ordered
globals first, then locals (the official order)::

    h  = f(x)                                     one backbone pass per resolution (BatchNorm statistics per pass)
    z  = normalize(g(h))                          g: F -> hidden (BN, ReLU) -> feat_dim, on all crops at once
    C  = normalize(prototypes.weight, rows)       at the start of every step, in place, before the forward
    s_{b,v} = C z_{b,v}                           [B, V + Vl, K] scores of every crop
    q_{b,i} = sinkhorn_knopp([queue_i C^T ; s_{·,c_i}].detach(), ε, iters)[last B rows]   for c_i in crops_for_assign
    loss = swav_loss(s, q, T) = (1/|A|) Σ_i (1/(Vc-1)) Σ_{v≠c_i} mean_b −Σ_k q_{b,i,k} log softmax(s_{b,v}/T)_k

(``selfsup.losses.sinkhorn_knopp`` / ``swav_loss``; the codes carry no gradient.) The prototypes get no update for
``step < freeze_prototypes_niters`` (:meth:`SwAV.frozen`: gradients dropped, as the official ``p.grad = None``).
The loss is per sample given the codes, and the codes are global through the Sinkhorn's all-reduces: no gather.

Queue (``queue_length > 0``): created empty (zeros) at the first step of epoch ``epoch_queue_starts``, of
``queue_length − queue_length mod (B·W)`` rows over the ``W`` ranks, ``[|A|, that/W, feat_dim]`` on each rank: per
crop-for-assign the normalised embeddings of this rank's last samples, newest first. Every step shifts it by ``B``
rows and writes the batch's embeddings at the top (after reading it); once full (its last row non-zero, the official
test) its scores against the current prototypes join the batch's before the Sinkhorn, and only the batch's codes are
kept. It is per-rank state outside the state dict: :meth:`rank_state` / :meth:`load_rank_state` carry it through
every checkpoint (the official saves ``queue{rank}.pth`` at each epoch end).

Departures (none changes a published number): the prototype scores (normalisation, prototype layer) run in fp32 with
autocast off (the official runs them in apex fp16); the projector's hidden Linear has no bias (BatchNorm follows and
cancels it); Sinkhorn shifts the scores by their global maximum (exact, ``selfsup.losses.swav``); a queue length that
rounds to 0 is an error instead of silently no queue; SyncBN (``trainer.sync_batchnorm``) is global (the official
apex SyncBN syncs groups of 8 GPUs). The optimiser is the engine's: its LARS keeps 1-D parameters out of weight decay
and the trust ratio and uses the Barlow-Twins trust ratio ``η‖p‖/‖g + wd·p‖`` (official: apex LARC, no clipping,
every parameter, ``η‖p‖/(‖g‖ + wd‖p‖)``), and its warm-up starts near 0 instead of ``start_warmup`` 0.3.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from selfsup import distributed
from selfsup.losses import sinkhorn_knopp, swav_loss
from selfsup.methods.base import Batch, Method
from selfsup.methods.registry import register_method
from selfsup.models import MLP, TINY_RESNET, BackboneSpec


@register_method
class SwAV(Method):
    """SwAV with multi-crop, the prototype freeze and the optional queue (official names and defaults).

    Args:
        backbone: backbone spec ``{name, kwargs}``.
        hidden_dim: hidden width of the projection head (official ``hidden_mlp`` 2048; 0: one Linear).
        feat_dim: output width of the projection head (128).
        nmb_prototypes: number of prototypes ``K`` (3000).
        temperature: ``T`` of the swapped prediction (0.1).
        epsilon: ``ε`` of Sinkhorn-Knopp (0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        crops_for_assign: crops whose codes are computed (and predicted from every other crop), indices into the
            global views then the local ones (``[0, 1]``: the two global views).
        freeze_prototypes_niters: the prototypes are not updated for steps ``< N`` (official default 313).
        queue_length: global queue length (0: no queue); rounded down to a multiple of the global batch.
        epoch_queue_starts: epoch from which the queue exists (15).
    """

    min_views = 1  # crops_for_assign and the crop count are checked on the batch
    tiny = {"backbone": TINY_RESNET, "hidden_dim": 16, "feat_dim": 8, "nmb_prototypes": 12}
    tiny_variants = {"queue": {"queue_length": 8, "epoch_queue_starts": 0}}

    def __init__(
        self,
        backbone: Optional[BackboneSpec] = None,
        hidden_dim: int = 2048,
        feat_dim: int = 128,
        nmb_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Optional[list[int]] = None,
        freeze_prototypes_niters: int = 313,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
    ):
        super().__init__(backbone)
        crops = [0, 1] if crops_for_assign is None else [int(c) for c in crops_for_assign]
        if not crops or min(crops) < 0 or len(set(crops)) != len(crops):
            raise ValueError(f"crops_for_assign must be distinct crop indices >= 0, got {crops}")
        for name, value in (("feat_dim", feat_dim), ("nmb_prototypes", nmb_prototypes)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("temperature", temperature), ("epsilon", epsilon)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if int(sinkhorn_iterations) < 1 or int(hidden_dim) < 0 or int(freeze_prototypes_niters) < 0:
            raise ValueError("sinkhorn_iterations must be >= 1, hidden_dim and freeze_prototypes_niters >= 0")
        if int(queue_length) < 0 or int(epoch_queue_starts) < 0:
            raise ValueError(f"queue_length, epoch_queue_starts must be >= 0, got {queue_length}, {epoch_queue_starts}")
        widths = [self.num_features, int(hidden_dim), int(feat_dim)] if hidden_dim else [self.num_features, feat_dim]
        self.projector = MLP(widths, last_bias=True)
        self.prototypes = nn.Linear(int(feat_dim), int(nmb_prototypes), bias=False)
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.crops_for_assign = crops
        self.freeze_prototypes_niters = int(freeze_prototypes_niters)
        self.queue_length, self.epoch_queue_starts = int(queue_length), int(epoch_queue_starts)
        # [|A|, rows per rank, feat_dim], newest first: per-rank state outside the state dict (rank_state)
        self.queue: Optional[Tensor] = None

    # ------------------------------------------------------------------------------------- seams
    def frozen(self, step: int, epoch: int) -> list[nn.Parameter]:
        return [self.prototypes.weight] if step < self.freeze_prototypes_niters else []

    def rank_state(self) -> Optional[dict[str, Tensor]]:
        return None if self.queue is None else {"queue": self.queue}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        self.queue = state["queue"].clone() if "queue" in state else None

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Rows of the prototype matrix to unit L2 norm, in place (official: at the start of every iteration)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.data.clone(), dim=1, p=2))

    # ------------------------------------------------------------------------------------- queue
    def _active_queue(self, batch: Batch, b: int, like: Tensor) -> Optional[Tensor]:
        """The queue at this step (created empty at the first step of ``epoch_queue_starts``), or ``None``."""
        if self.queue is None and self.queue_length > 0 and batch.epoch >= self.epoch_queue_starts:
            w = distributed.world_size()
            length = self.queue_length - self.queue_length % (b * w)  # official: a multiple of the global batch
            if length == 0:
                raise ValueError(
                    f"queue_length {self.queue_length} is shorter than the global batch {b * w}: it rounds to 0 "
                    "(the official code silently drops the queue); raise it or set queue_length 0"
                )
            self.queue = torch.zeros(len(self.crops_for_assign), length // w, like.shape[-1])
        if self.queue is None:
            return None
        self.queue = self.queue.to(device=like.device, dtype=torch.float32)
        rows, width = self.queue.shape[1:]
        if self.queue.shape[0] != len(self.crops_for_assign) or width != like.shape[-1] or rows < b:
            raise ValueError(
                f"the queue {tuple(self.queue.shape)} does not fit {len(self.crops_for_assign)} crops for assign, "
                f"feat_dim {like.shape[-1]} and {b} rows per step (a resume with another batch size?)"
            )
        return self.queue

    # ------------------------------------------------------------------------------------- step
    def training_loss(self, batch: Batch) -> dict[str, Any]:
        b, v = self.check_views(batch.views)
        local = batch.local_views
        vl = 0 if local is None else int(local.shape[1])
        n_crops = v + vl
        if n_crops < 2 or max(self.crops_for_assign) >= n_crops:
            raise ValueError(
                f"SwAV crops_for_assign {self.crops_for_assign} needs crops 0..{max(self.crops_for_assign)} and at "
                f"least 2 crops; the batch has {v} global + {vl} local (data.views, data.local_views)"
            )
        self.normalize_prototypes()
        h = self.backbone(batch.views.flatten(0, 1))  # [B·V, F], row b·V + v is view v of image b
        hs = [h] if local is None else [h, self.backbone(local.flatten(0, 1))]  # one pass per resolution
        z = self.projector(torch.cat(hs))  # the head's BatchNorm sees every crop, as forward_head
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=1, p=2)
            scores = self.prototypes(z)
        split = [b * v] if local is None else [b * v, b * vl]
        z = torch.cat([t.view(b, -1, t.shape[-1]) for t in z.split(split)], dim=1)  # [B, Vc, D], globals first
        scores = torch.cat([t.view(b, -1, t.shape[-1]) for t in scores.split(split)], dim=1)  # [B, Vc, K]

        with torch.no_grad():
            queue = self._active_queue(batch, b, z)
            use_queue = queue is not None and bool(queue[:, -1].any())  # official: once its last row is filled
            codes = []
            for i, crop in enumerate(self.crops_for_assign):
                s = scores[:, crop].detach()
                if use_queue:
                    with torch.autocast(device_type=z.device.type, enabled=False):
                        s = torch.cat([self.prototypes(queue[i]), s])
                codes.append(sinkhorn_knopp(s, epsilon=self.epsilon, iters=self.sinkhorn_iterations)[-b:])
            if queue is not None:  # newest first: shift by B rows, the batch's embeddings at the top
                queue[:, b:] = queue[:, :-b].clone()
                queue[:, :b] = z[:, self.crops_for_assign].detach().transpose(0, 1)
        # swav_loss takes the code of crop q at position q: the assigned crops first, the order of the rest is moot
        order = self.crops_for_assign + [c for c in range(n_crops) if c not in self.crops_for_assign]
        loss = swav_loss(scores[:, order], torch.stack(codes, dim=1), temperature=self.temperature)
        embeddings = {"backbone": h.detach().view(b, v, -1), "projector": z[:, :v].detach()}
        return {"loss": loss, "queue_used": float(use_queue), "embeddings": embeddings}
