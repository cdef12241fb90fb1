"""The in-memory path: a whole (small) dataset decoded once into one ``uint8 [N, 3, H, W]`` tensor.

:func:`load_uint8` decodes any dataset with the ``.targets`` seam (an ImageFolder, a torchvision set,
``Subset`` s of them, ...) without its transform; :class:`TensorImageDataset` serves the result as
``dataset[i] -> (uint8 [3, H, W], label)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["ImageSizeMismatchError", "TensorImageDataset", "load_uint8"]


class ImageSizeMismatchError(ValueError):
    """:func:`load_uint8` without ``size`` met an image whose size differs from the first one's."""


class TensorImageDataset(Dataset):
    """Images held in memory as ``uint8 [N, 3, H, W]``; ``dataset[i] -> (images[i], labels[i])``.

    Args:
        images: ``uint8`` tensor ``[N, 3, H, W]``.
        labels: ``int64`` tensor ``[N]`` (or a sequence of ints).
        classes: class names; default ``["0", "1", ...]`` up to the largest label.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        classes: Sequence[str] | None = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {list(labels.shape)}")
        self.images = images
        self.labels = labels
        self.targets: list[int] = labels.tolist()
        if classes is None:
            n = int(labels.max()) + 1 if len(labels) else 0
            classes = [str(i) for i in range(n)]
        self.classes: list[str] = list(classes)

    #: ``dataset[i]`` is a plain read: nothing random (:class:`~selfsup.data.keyed.KeyedDataset` skips the seeding).
    draws_randomness = False

    @classmethod
    def from_dataset(cls, dataset: Dataset, size: int | None = None, num_workers: int = 0) -> TensorImageDataset:
        """Decode ``dataset`` with :func:`load_uint8` and keep its ``classes``."""
        images, labels = load_uint8(dataset, size=size, num_workers=num_workers)
        base, _ = _unwrap_subset(dataset)
        return cls(images, labels, getattr(base, "classes", None))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __len__(self) -> int:
        return self.images.shape[0]


def _unwrap_subset(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """Resolve (nested) ``Subset`` s to the base dataset and its indices (``None`` = all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        sub = [int(i) for i in dataset.indices]
        indices = sub if indices is None else [sub[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _image(dataset: Dataset, i: int) -> Any:
    """Image ``i`` of ``dataset``: an RGB PIL image or a ``uint8 [H, W, 3]`` array, untransformed where
    the dataset has ``load(i)``."""
    img = dataset.load(i) if hasattr(dataset, "load") else dataset[i][0]
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise TypeError(f"sample {i}: expected a uint8 [3, H, W] tensor, got {img.dtype} {list(img.shape)}")
        return img.permute(1, 2, 0).numpy()
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"sample {i}: expected a PIL image or uint8 [H, W, 3] array, got {type(img).__name__}")
    return arr


def _hw(img: Any) -> tuple[int, int]:
    return (img.size[1], img.size[0]) if isinstance(img, Image.Image) else tuple(img.shape[:2])


def _sample_name(dataset: Dataset, i: int) -> str:
    member_name = getattr(dataset, "member_name", None)
    return f"{i} ('{member_name(i)}')" if member_name is not None else str(i)


def _decode_into(dataset: Dataset, indices: Sequence[int], out: np.ndarray, size: int | None) -> None:
    """Decode ``dataset[indices[j]]`` into ``out[j]`` (``uint8 [n, 3, H, W]``), PIL-bilinear resized to
    ``H x W`` where it differs if ``size`` is set."""
    h, w = out.shape[2], out.shape[3]
    for j, i in enumerate(indices):
        img = _image(dataset, i)
        if size is not None and _hw(img) != (h, w):
            if not isinstance(img, Image.Image):
                img = Image.fromarray(img)
            img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
        if _hw(img) != (h, w):
            ih, iw = _hw(img)
            raise ImageSizeMismatchError(
                f"load_uint8: sample {_sample_name(dataset, i)} is {iw}x{ih} (WxH) but "
                f"the first is {w}x{h}; pass size= to resize all images"
            )
        out[j] = np.asarray(img).transpose(2, 0, 1)


class _ChunkDecoder(Dataset):
    """Worker-side decoding of index chunks for :func:`load_uint8` with ``num_workers > 0``."""

    def __init__(self, dataset: Dataset, chunks: list[list[int]], hw: tuple[int, int], size: int | None):
        self.dataset, self.chunks, self.hw, self.size = dataset, chunks, hw, size

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> torch.Tensor:
        idx = self.chunks[k]
        out = np.empty((len(idx), 3, *self.hw), dtype=np.uint8)
        _decode_into(self.dataset, idx, out, self.size)
        return torch.from_numpy(out)


def load_uint8(dataset: Dataset, size: int | None = None, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of ``dataset`` once into memory.

    Works on :class:`~selfsup.data.folder.ImageFolderDataset`,
    :class:`~selfsup.data.torchvision_sets.TorchvisionDataset` (anything with ``uint8_hwc()``: no
    decoding needed), ``Subset`` s of them, and any dataset whose ``load(i)`` / ``[i][0]`` is a PIL image,
    a ``uint8 [H, W, 3]`` array or a ``uint8 [3, H, W]`` tensor. Transforms are not applied.

    Args:
        dataset: the dataset; labels come from its ``targets``.
        size: resize every image to ``size x size`` (bilinear, antialiased) where it differs.
            Without it all images must share the first one's size, else
            :class:`ImageSizeMismatchError` (a ``ValueError``) names the first that does not.
        num_workers: decode in this many worker processes (chunks of the index range).

    Returns:
        ``(images uint8 [N, 3, H, W], labels int64 [N])``.
    """
    base, indices = _unwrap_subset(dataset)
    idx = list(range(len(base))) if indices is None else indices
    n = len(idx)
    targets = getattr(base, "targets", None)
    if targets is not None:
        labels = torch.as_tensor([int(targets[i]) for i in idx], dtype=torch.int64)
    else:
        labels = torch.as_tensor([int(base[i][1]) for i in idx], dtype=torch.int64)
    if n == 0:
        s = size or 0
        return torch.empty((0, 3, s, s), dtype=torch.uint8), labels

    if hasattr(base, "uint8_hwc"):  # already decoded: one vectorised gather
        arr = base.uint8_hwc()[np.asarray(idx)]
        images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
        if size is not None and images.shape[-2:] != (size, size):
            images = (
                torch.nn.functional.interpolate(
                    images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        return images, labels

    if size is not None:
        h = w = int(size)
    else:
        h, w = _hw(_image(base, idx[0]))
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    if num_workers <= 0:
        _decode_into(base, idx, out, size)
    else:
        chunk = max(1, min(2048, -(-n // (num_workers * 4))))
        chunks = [idx[k : k + chunk] for k in range(0, n, chunk)]
        loader = DataLoader(
            _ChunkDecoder(base, chunks, (h, w), size),
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
        )
        pos = 0
        for block in loader:
            out[pos : pos + len(block)] = block.numpy()
            pos += len(block)
    return torch.from_numpy(out), labels
