"""torchvision's CIFAR-10 / CIFAR-100 / STL-10 files behind the ``.classes`` / ``.targets`` seam.

:func:`torchvision_dataset` opens (or, with ``download=True``, fetches) torchvision's own files under
``root`` and wraps them in a :class:`TorchvisionDataset`: ``dataset[i] -> (transform(PIL image), label)``
over the already decoded ``uint8 [N, H, W, 3]`` array, which :func:`~selfsup.data.memory.load_uint8`
gathers in one vectorised step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["TORCHVISION_NAMES", "TorchvisionDataset", "torchvision_dataset"]

#: Names :func:`torchvision_dataset` accepts.
TORCHVISION_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "stl10")


class TorchvisionDataset(Dataset):
    """A torchvision CIFAR-10 / CIFAR-100 / STL-10 dataset with the ``.classes`` / ``.targets`` seam.

    ``dataset[i] -> (transform(PIL image), label)``; STL-10's unlabeled images have label ``-1``.
    ``uint8_hwc()`` exposes the decoded array for :func:`~selfsup.data.memory.load_uint8`.
    """

    def __init__(
        self,
        base: Dataset,
        data: np.ndarray,
        targets: Sequence[int],
        classes: Sequence[str],
        split_dir: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.base = base
        self._data = data  # [N, H, W, 3] uint8 (possibly a strided view)
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.split_dir = split_dir
        self.transform = transform

    def uint8_hwc(self) -> np.ndarray:
        """All images as a ``uint8 [N, H, W, 3]`` array (no copy)."""
        return self._data

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image."""
        return Image.fromarray(np.ascontiguousarray(self._data[i]))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.base).__name__}, split={self.split_dir!r}, samples={len(self)})"


def torchvision_dataset(
    name: str, root: Path, split: str, transform: Any = None, download: bool = False
) -> TorchvisionDataset:
    """torchvision's ``name`` (one of :data:`TORCHVISION_NAMES`) from its files under ``root``.

    Splits: CIFAR ``train`` / ``test``; STL-10 ``train`` / ``test`` / ``unlabeled`` /
    ``train+unlabeled``; ``val`` means ``test`` for all three. Missing files without ``download``
    raise ``FileNotFoundError`` naming the folder looked for and the ``download`` option.
    """
    import torchvision.datasets as tvd

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}[name]
    not_found = (
        f"{name} not found under {root} (looked for {root / folder}) and download=False; set "
        f"`download: true` (download=True) to fetch it there, or pass root= a .zip / .tar / "
        f"ImageFolder directory with <split>/<class>/<image>"
    )
    if name in ("cifar10", "cifar100"):
        aliases = {"train": "train", "test": "test", "val": "test"}
        if split not in aliases:
            raise ValueError(f"{name} splits are 'train' and 'test' ('val' means 'test'); got '{split}'")
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        try:
            base = cls(str(root), train=aliases[split] == "train", download=download)
        except RuntimeError as e:
            if not download:
                raise FileNotFoundError(not_found) from e
            raise
        return TorchvisionDataset(base, base.data, base.targets, base.classes, aliases[split], transform)

    splits = ("train", "test", "unlabeled", "train+unlabeled")
    split = "test" if split == "val" else split
    if split not in splits:
        raise ValueError(f"stl10 splits are {list(splits)} ('val' means 'test'); got '{split}'")
    try:
        base = tvd.STL10(str(root), split=split, download=download)
    except RuntimeError as e:
        if not download:
            raise FileNotFoundError(not_found) from e
        raise
    labels = np.asarray(base.labels if base.labels is not None else [-1] * len(base.data))
    data = np.asarray(base.data).transpose(0, 2, 3, 1)  # stored [N, 3, H, W]
    return TorchvisionDataset(base, data, labels.tolist(), base.classes, split, transform)
