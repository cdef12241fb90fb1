"""Multi-crop views (DINO, SwAV, iBOT): ``V`` global views and ``Vl`` smaller local views of every image.

``data.views`` global views come from ``data.augment`` (an asymmetric pair alternates by slot, as single-size
views do), ``data.local_views`` local views from ``data.local_augment`` (its own crop size, scale range and
photometric ops), in both view modes:

* ``per_image``: :class:`MultiCrop` in the loader workers, ``image -> (global [V, 3, H, W], local [Vl, 3, h, w])``
  under the item's keyed RNG (global views first, then local, so a resumed run draws the same numbers);
* ``batched``: :class:`BatchedMultiCrop` on the device, two :class:`~selfsup.data.batched.BatchedViews` driven by
  the step's view generator, the global group first. Images that cannot be stacked at full size get each group's
  crops in the loader (a :class:`MultiCrop` of geometry transforms) and only the photometric ops on the device.

The engine hands the method ``Batch.views [B, V, 3, H, W]`` and ``Batch.local_views [B, Vl, 3, h, w]`` (``None``
without local views); single-size methods see no change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from selfsup.data.batched import BatchedViews

__all__ = ["BatchedMultiCrop", "MultiCrop", "ViewGroups", "split_views"]

#: What a view maker returns: the global views, or ``(global, local)`` with multi-crop.
ViewGroups = Union[Tensor, tuple[Tensor, Tensor]]


class MultiCrop:
    """Per-image multi-crop: ``img -> (global_(img), local(img))``, e.g. two ``MultiViewTransform``."""

    def __init__(self, global_: Callable[[Any], Tensor], local: Callable[[Any], Tensor]):
        self.global_, self.local = global_, local

    def __call__(self, img: Any) -> tuple[Tensor, Tensor]:
        return self.global_(img), self.local(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(global={self.global_!r}, local={self.local!r})"


class BatchedMultiCrop(torch.nn.Module):
    """Batched multi-crop on the device: ``(images or (global crops, local crops), generator) -> (global, local)``.

    ``images`` is ``uint8 [B, 3, H, W]`` (both groups crop it) or the loader's pre-cropped pair
    ``(uint8 [B, V, 3, H, W], uint8 [B, Vl, 3, h, w])``. The generator drives the global group, then the local one.
    """

    def __init__(self, global_: BatchedViews, local: BatchedViews):
        super().__init__()
        self.global_, self.local = global_, local

    @torch.no_grad()
    def forward(self, images: Union[Tensor, tuple[Tensor, Tensor]], generator: Optional[torch.Generator] = None):
        if isinstance(images, (tuple, list)):
            g, loc = images
            return self.global_(g, generator), self.local(loc, generator)
        return self.global_(images, generator), self.local(images, generator)


def split_views(views: Any) -> tuple[Tensor, Optional[Tensor]]:
    """``(global [B, V, ...], local [B, Vl, ...] or None)`` of what a loader or view maker produced."""
    if isinstance(views, (tuple, list)):
        if len(views) != 2:
            raise ValueError(f"multi-crop views come as (global, local), got {len(views)} groups")
        return views[0], views[1]
    return views, None
