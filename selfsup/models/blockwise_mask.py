r"""Block-wise masks for masked-patch prediction (BEiT's generator, as iBOT and DINOv2 use it).

Two official samplers, one generator:

* ``"ibot"``: ``bytedance/ibot``, ``loader.py`` (``ImageFolderMask.get_pred_ratio`` / ``__getitem__``,
  ``pred_shape='block'``). Each crop draws its ratio ``r``: with probability ``mask_probability`` it is
  ``U(pred_ratio − pred_ratio_var, pred_ratio + pred_ratio_var)`` (``--pred_ratio 0.3 --pred_ratio_var 0.2``:
  ``U(0.1, 0.5)``), else 0 (the README's ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` is a ``random.choice``
  between ratio 0 and ``U(0.1, 0.5)``: ``mask_probability 0.5``). The target is ``r·H·W`` (a real number); blocks
  of area ``U(min_block, remaining)`` with ``min_block = (min(H, W) // 3)²`` and no per-block cap.
* ``"dinov2"``: ``facebookresearch/dinov2``, ``dinov2/data/collate.py`` (``collate_data_and_cast``) and
  ``dinov2/data/masking.py`` (``MaskingGenerator``). Of the ``n`` crops, ``int(n·mask_probability)`` are masked,
  crop ``i`` with target ``int(H·W·U(p_i, p_{i+1}))`` where ``p = linspace(ratio_min, ratio_max, n_masked + 1)``
  (stratified), the others not at all; the list is shuffled. Blocks of area ``U(4, min(remaining, H·W/2))``.

A block (both samplers): aspect ``a = exp(U(log a_min, log a_max))`` (official ``(0.3, 1/0.3)``), area ``A``,
``h = round(sqrt(A·a))``, ``w = round(sqrt(A/a))``; tried only if ``h < H`` and ``w < W``, at a uniform top-left
corner; accepted if it adds at least one and at most ``remaining`` new patches; up to 10 tries per block. Blocks are
added until the target is reached or a block fails 10 times, so a crop never exceeds its target (it may stop short).

Randomness: every number comes from the ``torch.Generator`` passed in (the engine's ``batch.generator``, keyed on
seed, step, rank and micro-batch): one 62-bit integer is drawn from it (on its device) and seeds a private
``random.Random`` that runs the Python loop above, so the masks are a pure function of the generator's state (exact
resume) and the global RNGs are never touched. The official codes draw from Python's global ``random`` in the loader
workers: the distribution is theirs, the stream is not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["BlockwiseMaskGenerator", "block_mask"]


def block_mask(
    height: int,
    width: int,
    target: float,
    rng: random.Random,
    *,
    min_block: float,
    max_block: float | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> list[list[bool]]:
    """One ``height × width`` block-wise mask with at most ``target`` masked patches (see the module docstring),
    drawn from ``rng``. Returns rows of bools (True = masked)."""
    mask = [[False] * width for _ in range(height)]
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < target:
        remaining = target - count
        cap = remaining if max_block is None else min(remaining, max_block)
        delta = 0
        for _ in range(attempts):
            area = min_block + (cap - min_block) * rng.random()  # random.uniform(min_block, cap)
            a = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h, w = round(math.sqrt(area * a)), round(math.sqrt(area / a))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                new = sum(not mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < new <= cap:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@dataclass(frozen=True)
class BlockwiseMaskGenerator:
    """Masks ``[n, H·W]`` (row-major patches, True = masked) for ``n`` crops of an ``H × W`` patch grid.

    Attributes:
        pred_ratio, pred_ratio_var: ``"ibot"``: a masked crop's ratio is ``U(pred_ratio ± pred_ratio_var)``;
            ``"dinov2"``: the stratified ratios span ``[pred_ratio − pred_ratio_var, pred_ratio + pred_ratio_var]``
            (DINOv2's ``mask_ratio_min_max (0.1, 0.5)`` is ``0.3 ± 0.2``).
        mask_probability: the chance (``"ibot"``) / fraction (``"dinov2"``, ``int(n·p)`` crops) of masked crops.
        aspect: the range of block aspect ratios (official ``(0.3, 1/0.3)``).
        sampler: ``"ibot"`` or ``"dinov2"`` (module docstring).
    """

    pred_ratio: float = 0.3
    pred_ratio_var: float = 0.2
    mask_probability: float = 1.0
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    sampler: Literal["ibot", "dinov2"] = "ibot"

    def __post_init__(self) -> None:
        lo, hi = self.pred_ratio - self.pred_ratio_var, self.pred_ratio + self.pred_ratio_var
        if not (self.pred_ratio_var >= 0 and lo >= 0.0 and hi < 1.0):
            raise ValueError(
                f"the mask ratio range pred_ratio ± pred_ratio_var must lie in [0, 1) with pred_ratio_var >= 0; got "
                f"{self.pred_ratio} ± {self.pred_ratio_var} (iBOT asserts pred_ratio >= pred_ratio_var)"
            )
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")
        a0, a1 = (float(a) for a in self.aspect)
        if not 0 < a0 <= a1:
            raise ValueError(f"aspect must be (min, max) with 0 < min <= max, got {self.aspect}")
        if self.sampler not in ("ibot", "dinov2"):
            raise ValueError(f"sampler must be 'ibot' or 'dinov2', got {self.sampler!r}")

    def targets(self, n: int, num_patches: int, rng: random.Random) -> list[float]:
        """The target masked-patch count of each of ``n`` crops (0 for an unmasked crop)."""
        lo, hi = self.pred_ratio - self.pred_ratio_var, self.pred_ratio + self.pred_ratio_var
        if self.sampler == "ibot":
            out = []
            for _ in range(n):
                masked = rng.random() < self.mask_probability
                ratio = lo + (hi - lo) * rng.random()
                out.append(ratio * num_patches if masked else 0.0)
            return out
        n_masked = int(n * self.mask_probability)
        p = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else [lo]
        out = [float(int(num_patches * (p[i] + (p[i + 1] - p[i]) * rng.random()))) for i in range(n_masked)]
        out += [0.0] * (n - n_masked)
        rng.shuffle(out)
        return out

    def __call__(self, n: int, grid: tuple[int, int], generator: torch.Generator) -> Tensor:
        """``[n, H·W]`` bool masks for ``n`` crops of the ``grid = (H, W)`` patch grid, every number drawn from
        ``generator`` (one draw on its device seeds a private ``random.Random``); on the generator's device."""
        height, width = int(grid[0]), int(grid[1])
        if n < 0 or height < 1 or width < 1:
            raise ValueError(f"need n >= 0 crops and a grid of positive size; got n={n}, grid={grid}")
        device = generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
        rng = random.Random(seed)
        num = height * width
        if self.sampler == "ibot":
            min_block, max_block = float((min(height, width) // 3) ** 2), None
        else:
            min_block, max_block = 4.0, 0.5 * num
        rows = [
            block_mask(height, width, t, rng, min_block=min_block, max_block=max_block, aspect=self.aspect)
            if t > 0
            else [[False] * width for _ in range(height)]
            for t in self.targets(n, num, rng)
        ]
        return torch.tensor(rows, dtype=torch.bool).reshape(n, num).to(device)
