"""Datasets by name: :func:`build_dataset` maps ``(name, root, split)`` to a dataset.

Every dataset follows the ``dataset -> loader`` seam of ``docs/architecture.md``:
``dataset[i] -> (image, label)`` where ``image`` is a PIL image (or ``transform(image)``) on the
per-image path, or a ``uint8 [3, H, W]`` tensor on the in-memory path, and every dataset exposes
``.classes`` and ``.targets``. The pieces live in one module each:

* :mod:`selfsup.data.archive`: directory / ``.zip`` / ``.tar`` access (:class:`CorruptImageError`);
* :mod:`selfsup.data.folder`: the ImageFolder rules (:class:`ImageFolderDataset`, :func:`read_class_list`);
* :mod:`selfsup.data.torchvision_sets`: torchvision's CIFAR / STL-10 files (:class:`TorchvisionDataset`);
* :mod:`selfsup.data.memory`: the in-memory uint8 cache (:class:`TensorImageDataset`, :func:`load_uint8`).

Their public names are re-exported here. :func:`demo_dataset_path` returns the small CIFAR-10
sample shipped with the package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from selfsup.data.archive import CorruptImageError, PathLike, has_archive_suffix, is_archive_file
from selfsup.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, has_image_folder_layout, read_class_list
from selfsup.data.memory import TensorImageDataset, load_uint8
from selfsup.data.torchvision_sets import TorchvisionDataset, torchvision_dataset

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageFolderDataset",
    "TensorImageDataset",
    "TorchvisionDataset",
    "build_dataset",
    "demo_dataset_path",
    "load_uint8",
    "read_class_list",
]

#: Names accepted by :func:`build_dataset`.
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "folder")

_NEEDS_ROOT = ("imagenet", "imagenet100", "folder")


def build_dataset(
    name: str,
    root: PathLike | None = None,
    split: str = "train",
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
    skip_corrupt: bool = False,
    class_list: PathLike | Sequence[str] | None = None,
) -> Dataset:
    """Build a dataset by name.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive, ``-``/``_`` ignored).
        root: a ``.zip`` / ``.tar`` or a directory. An archive, or a directory with an ImageFolder
            layout (``[top/]<split>/<class>/<image>``), is read by :class:`ImageFolderDataset` for
            any name. Otherwise ``cifar10`` / ``cifar100`` / ``stl10`` use torchvision's files in
            ``root`` (default ``./data``). ``imagenet``, ``imagenet100`` and ``folder`` need it.
        split: ``train`` / ``test`` / ``val`` (ImageFolder: any folder name; ``val`` and ``test``
            stand in for each other); STL-10 also ``unlabeled`` and ``train+unlabeled``.
        transform: per-image transform applied to the PIL image.
        download: let torchvision download CIFAR / STL-10 into ``root``.
        skip_corrupt: see :class:`ImageFolderDataset`.
        class_list: restrict to these classes (file or sequence); required for ``imagenet100``.

    Returns:
        An :class:`ImageFolderDataset` or a :class:`TorchvisionDataset`; both have ``.classes``
        and ``.targets``.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(DATASET_NAMES)}")
    if key == "imagenet100" and class_list is None:
        raise ValueError(
            "imagenet100 is ImageNet restricted to a fixed list of 100 classes: pass class_list= a text "
            "file with the 100 class folder names (wnids, one per line) and root= the ImageNet "
            "folder / .zip / .tar"
        )
    if root is None:
        if key in _NEEDS_ROOT:
            raise ValueError(f"dataset '{key}' needs root= a directory, .zip or .tar with <split>/<class>/<image>")
        root = "./data"
    root_p = Path(root).expanduser()

    if is_archive_file(root_p) or has_image_folder_layout(root_p):
        ds = ImageFolderDataset(root_p, split, transform, skip_corrupt=skip_corrupt, class_list=class_list)
        expected = {"cifar10": 10, "cifar100": 100}.get(key)
        if expected is not None and class_list is None and len(ds.classes) != expected:
            raise ValueError(
                f"{key} expects {expected} classes but '{ds.split_path}' of {root_p} has "
                f"{len(ds.classes)} ({ds.classes[:5]}...); use name='folder' for another dataset"
            )
        return ds

    if key in _NEEDS_ROOT:
        if not root_p.exists():
            raise FileNotFoundError(f"dataset root {root_p} does not exist")
        raise FileNotFoundError(
            f"{root_p} has no ImageFolder layout: expected a .zip / .tar or a directory with "
            f"[top/]<split>/<class>/<image> (if {root_p} holds the class folders directly, use "
            f"ImageFolderDataset({str(root_p)!r}, split=None))"
        )
    if class_list is not None:
        raise ValueError("class_list is only supported for ImageFolder datasets (folder / .zip / .tar)")
    if not root_p.exists() and (not download or has_archive_suffix(root_p)):
        raise FileNotFoundError(
            f"dataset root '{root_p}' does not exist (data.root: {key} reads an ImageFolder .zip / .tar / directory "
            f"there, or torchvision's files{'' if download else '; data.download true fetches them into a folder'})"
        )
    return torchvision_dataset(key, root_p, split, transform, download)


def demo_dataset_path() -> Path:
    """Path of the CIFAR-10 sample shipped with the package (``selfsup/assets/cifar10_demo.zip``).

    It holds 4,000 train / 1,000 test original CIFAR-10 JPEGs (class balanced) in
    ``cifar10/{train,test}/<class>/<file>.jpg``; build it with ``scripts/build_demo_data.py``.
    """
    path = Path(__file__).resolve().parents[1] / "assets" / "cifar10_demo.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo dataset {path} is missing; rebuild it with `python scripts/build_demo_data.py "
            f"--source <cifar10-jpeg.zip> --out {path}`"
        )
    return path
