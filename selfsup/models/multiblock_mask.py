r"""I-JEPA's multi-block mask sampler: per batch one context block and ``M`` target blocks on the patch grid.

Follows ``facebookresearch/ijepa`` ``src/masks/multiblock.py`` (``MaskCollator``), as ``src/train.py`` configures it
(``configs/in1k_vith14_ep300.yaml``: ``enc_mask_scale (0.85, 1.0)``, ``pred_mask_scale (0.15, 0.2)``, ``aspect_ratio
(0.75, 1.5)``, ``num_enc_masks 1``, ``num_pred_masks 4``, ``min_keep 10``, ``allow_overlap false``).

On an ``H × W`` patch grid (patch ``l = i·W + j`` is row ``i``, column ``j``), for a batch of ``B`` images:

1. **Block sizes, once per batch** (``_sample_block_size``): one uniform ``u`` sets both the scale and the aspect
   ratio of a block (the official draws a single ``_rand`` for both): ``s = s_min + u (s_max − s_min)``,
   ``a = a_min + u (a_max − a_min)``, ``n = floor(H W s)``, ``h = round(sqrt(n a))``, ``w = round(sqrt(n / a))``,
   then ``h ≤ H − 1``, ``w ≤ W − 1``. The target size uses ``pred_scale`` and ``aspect``; the context size, drawn
   second, uses ``enc_scale`` and aspect 1.
2. **Per image**: ``M`` target blocks of the target size, each at a uniform top-left corner ``top ∈ [0, H − h)``,
   ``left ∈ [0, W − w)`` (the official ``torch.randint(0, H - h)``; a block never touches the last row / column),
   redrawn until it holds more than ``min_keep`` patches. Then ``n_enc`` context blocks of the context size, each
   restricted to the complement of every target block of the image (``allow_overlap: false``), redrawn until more
   than ``min_keep`` patches remain; after every 20 failed draws the last remaining restriction is dropped (the
   official ``tries`` relaxation, which logs a warning).
3. **Equal counts across the batch** (the collator's truncation): every target block is cut to the smallest target
   block of the batch, every context block to the smallest context block, keeping the first indices in raster
   order (the official ``torch.nonzero`` order, then ``cm[:min_keep_pred]``).

Randomness: every number comes from the ``generator`` handed to :meth:`MultiBlockMaskSampler.__call__`
(``Batch.generator``, keyed on seed, step, rank, micro-batch), never the global RNG, so a resumed run draws the same
masks. The uniforms are drawn in chunks on the generator's device and consumed in order on the CPU (one
device-to-host copy per chunk, not per draw); a block's corner is ``floor(u · (H − h))``.

Departures from the official collator: (1) the official seeds the batch's block *sizes* from a step counter shared
by the loader workers and draws the *positions* from the global RNG of each worker; here both come from the keyed
generator (sizes first, as the official order); (2) :class:`MultiBlockMaskSampler` refuses at construction a
configuration in which a block can never hold more than ``min_keep`` patches (the official loops forever); (3) the
masks are made in the training step on the batch's device, not in the loader's collate function.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["MultiBlockMaskSampler", "MultiBlockMasks"]

_TIMEOUT = 20  # failed draws before one restriction of the context block is dropped (official ``og_timeout``)


class MultiBlockMasks(NamedTuple):
    """One batch of I-JEPA masks (patch indices in ``[0, H·W)``, each row ascending).

    Attributes:
        context: ``[n_enc, B, Kc]`` (long) the context blocks' patches, ``Kc`` the smallest context block of the batch.
        targets: ``[M, B, Kt]`` (long) the target blocks' patches, ``Kt`` the smallest target block of the batch.
        context_size: ``(h, w)`` of the batch's context block before the targets are removed.
        target_size: ``(h, w)`` of the batch's target blocks.
    """

    context: Tensor
    targets: Tensor
    context_size: tuple[int, int]
    target_size: tuple[int, int]


class _Uniforms:
    """Uniform ``[0, 1)`` numbers from ``generator``, drawn ``chunk`` at a time on its device, read one by one."""

    def __init__(self, generator: torch.Generator, chunk: int):
        self.generator, self.chunk = generator, max(int(chunk), 16)
        self.values: list[float] = []
        self.pos = 0

    def __call__(self) -> float:
        if self.pos == len(self.values):
            g = self.generator
            self.values = torch.rand(self.chunk, generator=g, device=g.device, dtype=torch.float64).tolist()
            self.pos = 0
        self.pos += 1
        return self.values[self.pos - 1]


class MultiBlockMaskSampler:
    """I-JEPA's multi-block masks on a ``grid`` (``(H, W)`` patches or ``H`` for a square grid).

    Args:
        grid: the patch grid, e.g. 16 for 224 px at patch 14 (``H = W = 16``), 8 for 32 px at patch 4.
        enc_scale: range of the context block's area as a fraction of the grid (official ``(0.85, 1.0)``).
        pred_scale: range of each target block's area (official ``(0.15, 0.2)``).
        aspect: range of the target blocks' aspect ratio ``h / w`` (official ``(0.75, 1.5)``; the context's is 1).
        n_enc: context blocks per image (official 1).
        n_pred: target blocks per image (official 4).
        min_keep: a block must hold **more** than this many patches (official 10, the collator's ``len(mask) >
            min_keep``; a small grid needs a smaller value: on 8 × 8 a target block holds 4 to 12 patches).
        allow_overlap: let the context overlap the targets (official ``false``).
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        enc_scale: tuple[float, float] = (0.85, 1.0),
        pred_scale: tuple[float, float] = (0.15, 0.2),
        aspect: tuple[float, float] = (0.75, 1.5),
        n_enc: int = 1,
        n_pred: int = 4,
        min_keep: int = 10,
        allow_overlap: bool = False,
    ):
        self.height, self.width = (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if self.height < 2 or self.width < 2:
            raise ValueError(
                f"the multi-block mask needs a patch grid of at least 2 x 2, got {self.height}x{self.width}"
            )
        for name, (lo, hi) in (("enc_scale", enc_scale), ("pred_scale", pred_scale)):
            if not 0.0 < float(lo) <= float(hi) <= 1.0:
                raise ValueError(f"{name} must be a range in (0, 1], got {(lo, hi)}")
        if not 0.0 < float(aspect[0]) <= float(aspect[1]):
            raise ValueError(f"aspect must be a range of positive ratios, got {tuple(aspect)}")
        if n_enc < 1 or n_pred < 1 or min_keep < 0:
            raise ValueError(f"n_enc and n_pred must be >= 1 and min_keep >= 0, got {n_enc}, {n_pred}, {min_keep}")
        self.enc_scale = (float(enc_scale[0]), float(enc_scale[1]))
        self.pred_scale = (float(pred_scale[0]), float(pred_scale[1]))
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.n_enc, self.n_pred, self.min_keep = int(n_enc), int(n_pred), int(min_keep)
        self.allow_overlap = bool(allow_overlap)
        for name, scale, ar in (("target", self.pred_scale, self.aspect), ("context", self.enc_scale, (1.0, 1.0))):
            smallest = min(h * w for h, w in (self.block_size(u / 1000, scale, ar) for u in range(1001)))
            if smallest <= self.min_keep:
                raise ValueError(
                    f"a {name} block can be as small as {smallest} patches on the {self.height}x{self.width} grid, "
                    f"not more than min_keep={self.min_keep}: the sampler would never finish (lower min_keep or "
                    f"raise the {name} scale)"
                )

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def block_size(self, u: float, scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
        """``(h, w)`` of a block for the uniform ``u`` (official ``_sample_block_size``; see the module docstring)."""
        s = scale[0] + u * (scale[1] - scale[0])
        n = int(self.height * self.width * s)
        a = aspect[0] + u * (aspect[1] - aspect[0])
        h = min(round(math.sqrt(n * a)), self.height - 1)
        w = min(round(math.sqrt(n / a)), self.width - 1)
        return h, w

    def _block(self, size: tuple[int, int], rand: _Uniforms, allowed: Optional[list[Tensor]] = None) -> Tensor:
        """One block's patch indices (ascending): corners redrawn until more than ``min_keep`` patches survive the
        ``allowed`` restrictions (``[H, W]`` bool each), the last restriction dropped after every 20 failures."""
        h, w = size
        regions = allowed or []
        tries, timeout = 0, _TIMEOUT
        while True:
            top = int(rand() * (self.height - h))
            left = int(rand() * (self.width - w))
            mask = torch.zeros(self.height, self.width, dtype=torch.bool)
            mask[top : top + h, left : left + w] = True
            for region in regions[: max(len(regions) - tries, 0)]:
                mask &= region
            idx = torch.nonzero(mask.flatten()).flatten()
            if idx.numel() > self.min_keep:
                return idx
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, _TIMEOUT

    def __call__(self, batch_size: int, generator: torch.Generator, device=None) -> MultiBlockMasks:
        """The masks of a batch of ``batch_size`` images, every number drawn from ``generator``; index tensors on
        ``device`` (default: the generator's)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rand = _Uniforms(generator, chunk=4 * batch_size * (self.n_pred + self.n_enc) + 2)
        pred_size = self.block_size(rand(), self.pred_scale, self.aspect)
        enc_size = self.block_size(rand(), self.enc_scale, (1.0, 1.0))
        targets, contexts = [], []
        for _ in range(batch_size):
            blocks, complements = [], []
            for _ in range(self.n_pred):
                idx = self._block(pred_size, rand)
                blocks.append(idx)
                keep = torch.ones(self.num_patches, dtype=torch.bool)
                keep[idx] = False
                complements.append(keep.view(self.height, self.width))
            targets.append(blocks)
            allowed = None if self.allow_overlap else complements
            contexts.append([self._block(enc_size, rand, allowed) for _ in range(self.n_enc)])
        kt = min(b.numel() for blocks in targets for b in blocks)
        kc = min(b.numel() for blocks in contexts for b in blocks)
        device = generator.device if device is None else device
        tgt = torch.stack([torch.stack([blocks[m][:kt] for blocks in targets]) for m in range(self.n_pred)])
        ctx = torch.stack([torch.stack([blocks[e][:kc] for blocks in contexts]) for e in range(self.n_enc)])
        return MultiBlockMasks(ctx.to(device), tgt.to(device), enc_size, pred_size)
