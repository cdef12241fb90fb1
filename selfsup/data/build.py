"""From a ``DataConfig`` to datasets: open the source once, then derive views and labelled splits.

:func:`open_source` resolves the dataset name, root and the ``demo`` shortcut once into a
:class:`DataSource`, which derives

* the pretraining dataset and, in ``batched`` view mode, its view generator (:meth:`DataSource.train_views`);
* labelled splits under an eval transform (:meth:`DataSource.eval_split`);
* one augmented view per image, for augmented linear probes (:meth:`DataSource.augmented_split`).

Whether images are decoded once into memory (``in_memory``: ``uint8 [3, H, W]`` tensors) or per
sample (PIL images) is decided in one place, :meth:`DataSource.images`.

Two ways to make views (``DataConfig.view_mode``):

* ``per_image``: each loader worker decodes an image and runs the torchvision pipeline V times
  (``MultiViewTransform``); the batch arrives as ``[B, V, 3, h, w]`` float.
* ``batched``: ``BatchedViews`` makes all ``B x V`` views in one vectorised pass on the training device
  (see ``selfsup.engine.module``). With ``in_memory`` the loader yields the full images
  ``uint8 [B, 3, H, W]`` and ``BatchedViews`` does everything. Otherwise images of arbitrary sizes cannot
  be stacked at full size, so the loader crops and flips each view from the full decoded image
  (torchvision's ``RandomResizedCrop`` box distribution) and yields ``uint8 [B, V, 3, crop, crop]``;
  ``BatchedViews`` then applies only the photometric ops. All loader-side randomness comes from torch's
  global RNG.

The module-level functions (:func:`build_train_views`, :func:`build_eval_dataset`,
:func:`train_augmented_dataset`, :func:`in_memory_dataset`) are thin wrappers over a fresh
:class:`DataSource`; the in-memory decode is memoised per process, so they share it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch.utils.data import Dataset, Subset

from selfsup.data.batched import BatchedViews
from selfsup.data.datasets import TensorImageDataset, build_dataset, demo_dataset_path, load_uint8
from selfsup.data.memory import ImageSizeMismatchError
from selfsup.data.multicrop import BatchedMultiCrop, MultiCrop
from selfsup.data.transforms import (
    Augment,
    MultiViewTransform,
    as_pipelines,
    crop_flip_transform,
    eval_transform,
    get_preset,
    per_image_transform,
)

__all__ = [
    "DataSource",
    "MapDataset",
    "TensorNormalize",
    "build_eval_dataset",
    "build_train_views",
    "eval_preset",
    "in_memory_dataset",
    "num_classes",
    "open_source",
    "train_augmented_dataset",
    "train_pipelines",
]

#: An augmentation given by preset name or as an :class:`Augment` (a preset's first pipeline is used).
AugmentLike = Union[str, Augment]


class MapDataset(Dataset):
    """Apply ``fn`` to the image of each ``(image, label)`` pair of ``base``."""

    def __init__(self, base: Dataset, fn: Callable):
        self.base, self.fn = base, fn
        self.classes = getattr(base, "classes", None)
        self.targets = getattr(base, "targets", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.fn(x), y


class TensorNormalize:
    """uint8 ``[3, H, W]`` -> normalised float, with the preset's eval resize / centre crop."""

    def __init__(self, aug: Augment):
        self.mean = torch.tensor(aug.mean).view(3, 1, 1)
        self.std = torch.tensor(aug.std).view(3, 1, 1)
        self.resize, self.crop = aug.eval_resize, aug.crop_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if self.resize:
            x = F.resize(x, [self.resize], antialias=True)
        if x.shape[-1] != self.crop or x.shape[-2] != self.crop:
            x = F.center_crop(x, [self.crop, self.crop])
        return (x.float().div_(255) - self.mean) / self.std


def train_pipelines(cfg) -> list[Augment]:
    """The preset's pipelines with ``cfg.augment_overrides`` applied to each."""
    return _with_overrides(cfg.augment, getattr(cfg, "augment_overrides", None), "data.augment_overrides")


def local_pipelines(cfg) -> Optional[list[Augment]]:
    """Multi-crop: the local views' pipelines (``cfg.local_augment`` + ``cfg.local_augment_overrides``), or ``None``
    without local views (``cfg.local_views == 0``)."""
    n = int(getattr(cfg, "local_views", 0) or 0)
    if n == 0:
        return None
    if n < 0:
        raise ValueError(f"data.local_views must be >= 0, got {n}")
    if not getattr(cfg, "local_augment", None):
        raise ValueError(f"data.local_views = {n} needs data.local_augment (the local crops' preset, e.g. dino_local)")
    return _with_overrides(cfg.local_augment, cfg.local_augment_overrides, "data.local_augment_overrides")


def _with_overrides(preset: str, overrides: Optional[dict], name: str) -> list[Augment]:
    pipelines = as_pipelines(get_preset(preset))
    overrides = dict(overrides or {})
    if not overrides:
        return pipelines
    known = {f.name for f in dataclasses.fields(Augment)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name}: unknown Augment field(s) {unknown}; valid: {sorted(known)}")
    return [dataclasses.replace(a, **overrides) for a in pipelines]


def view_makers(cfg, geometry: bool) -> tuple[Optional[Any], Optional[torch.nn.Module]]:
    """``(loader transform, device view maker)`` of the training views (global, and local with multi-crop).

    ``per_image``: ``(MultiViewTransform or MultiCrop, None)``; ``batched``: ``(None or the loader-side crop and
    flip when ``geometry``, BatchedViews or BatchedMultiCrop)``.
    """
    pipes, local = train_pipelines(cfg), local_pipelines(cfg)
    groups = [(pipes, cfg.views)] + ([(local, cfg.local_views)] if local else [])
    if cfg.view_mode == "batched":
        makers = [BatchedViews(p, n) for p, n in groups]
        crops = [MultiViewTransform([crop_flip_transform(a, resize=cfg.image_size) for a in p], n) for p, n in groups]
        loader = (crops[0] if len(crops) == 1 else MultiCrop(*crops)) if geometry else None
        return loader, (makers[0] if len(makers) == 1 else BatchedMultiCrop(*makers))
    transforms = [MultiViewTransform([per_image_transform(a) for a in p], n) for p, n in groups]
    return (transforms[0] if len(transforms) == 1 else MultiCrop(*transforms)), None


def eval_preset(name: str) -> Augment:
    """The first pipeline of a preset: its crop size, normalisation and eval resize."""
    return as_pipelines(get_preset(name))[0]


@functools.lru_cache(maxsize=8)
def _cached_uint8(
    name: str,
    root: Optional[str],
    split: str,
    size: Optional[int],
    skip_corrupt: bool,
    class_list: Optional[str],
    download: bool,
) -> TensorImageDataset:
    ds = build_dataset(
        name, root=root, split=split, download=download, skip_corrupt=skip_corrupt, class_list=class_list
    )
    try:
        images, labels = load_uint8(ds, size=size)
    except ImageSizeMismatchError as e:
        raise ValueError(
            f"data.in_memory stacks split '{split}' into one tensor but its images differ in size ({e}); "
            f"set data.image_size to resize every image to image_size x image_size"
        ) from e
    out = TensorImageDataset(images, labels)
    out.classes = list(ds.classes)
    return out


def _subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sub = Subset(ds, idx)
    sub.classes = getattr(ds, "classes", None)
    targets = getattr(ds, "targets", None)
    sub.targets = [targets[i] for i in idx] if targets is not None else None
    return sub


class DataSource:
    """The images of one ``DataConfig``, resolved once; every dataset of a run derives from it.

    Attributes:
        cfg: the ``DataConfig``.
        name, root: what :func:`~selfsup.data.datasets.build_dataset` gets (``demo`` resolves to
            ``cifar10`` at the packaged sample).
        in_memory: splits are decoded once into ``uint8`` tensors (``cfg.in_memory``).
        pipelines: the training pipelines (preset plus ``augment_overrides``), built on first use.

    ``cfg.image_size``: in memory, every image is resized to ``image_size x image_size`` (without it
    the images keep their native size, which must then be the same for all); for batched views cropped
    in the loader, the short side is resized to it before cropping (aspect kept). The per-image path
    ignores it.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        if cfg.dataset == "demo":
            self.name, self.root = "cifar10", str(demo_dataset_path())
        else:
            self.name, self.root = cfg.dataset, cfg.root
        self.in_memory = bool(cfg.in_memory)

    @functools.cached_property
    def pipelines(self) -> list[Augment]:
        return train_pipelines(self.cfg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={self.root!r}, in_memory={self.in_memory})"

    # ---------------------------------------------------------------- images of a split

    def raw(self, split: str, transform: Optional[Callable] = None) -> Dataset:
        """``split`` decoded per sample (PIL images), ``transform`` applied to each."""
        c = self.cfg
        return build_dataset(
            self.name,
            root=self.root,
            split=split,
            transform=transform,
            download=c.download,
            skip_corrupt=c.skip_corrupt,
            class_list=c.class_list,
        )

    def decoded(self, split: str) -> TensorImageDataset:
        """``split`` decoded once into ``uint8 [N, 3, H, W]`` (memoised per process; see ``image_size``)."""
        c = self.cfg
        return _cached_uint8(self.name, self.root, split, c.image_size, c.skip_corrupt, c.class_list, c.download)

    def images(
        self, split: str, transform: Optional[Callable] = None, tensor_transform: Optional[Callable] = None
    ) -> Dataset:
        """``split`` with ``transform`` applied to each image: the one in-memory-or-raw decision.

        In memory the images are ``uint8 [3, H, W]`` tensors and ``tensor_transform`` (default
        ``transform``) is applied; otherwise they are PIL images and ``transform`` is applied.
        """
        if self.in_memory:
            tf = tensor_transform if tensor_transform is not None else transform
            ds = self.decoded(split)
            return ds if tf is None else MapDataset(ds, tf)
        return self.raw(split, transform)

    # ---------------------------------------------------------------- derived datasets

    def resolve_augment(self, augment: Optional[AugmentLike] = None) -> Augment:
        """``None``: the first training pipeline; a preset name: its first pipeline; an ``Augment``: itself."""
        if augment is None:
            return self.pipelines[0]
        if isinstance(augment, Augment):
            return augment
        return eval_preset(augment)

    def train_views(self, seed: int = 0) -> tuple[Dataset, Optional[torch.nn.Module]]:
        """The pretraining dataset of ``cfg.train_split`` and, in ``batched`` mode, the view generator.

        Samples: ``per_image``: ``float [V, 3, crop, crop]`` views; ``batched`` in memory: the full
        ``uint8 [3, H, W]`` image; ``batched`` otherwise: ``uint8 [V, 3, crop, crop]`` crops (view ``v``
        cropped and flipped by pipeline ``v % P``) for ``BatchedViews``' photometric ops. With multi-crop
        (``cfg.local_views``) each sample is the pair ``(global, local)`` of these and the generator a
        :class:`~selfsup.data.multicrop.BatchedMultiCrop`. ``cfg.subset`` keeps a random subset, fixed by ``seed``.
        """
        c = self.cfg
        if c.views < 1:
            raise ValueError(f"data.views must be >= 1, got {c.views}")
        # Batched: full-size images can be stacked only once decoded to one size in memory; otherwise the loader
        # applies the geometry to the full image and yields stackable crops.
        transform, maker = view_makers(c, geometry=not self.in_memory)
        return _subset(self._nway_nshot(self.images(c.train_split, transform)), c.subset, seed), maker

    def _nway_nshot(self, ds: Dataset, all_shots: bool = False) -> Dataset:
        """``cfg.n_way`` classes x ``cfg.n_shot`` images of ``ds`` (``all_shots``: every image of those classes)."""
        c = self.cfg
        if c.n_way is None and c.n_shot is None:
            return ds
        from selfsup.data.subsets import nway_nshot_subset

        return nway_nshot_subset(
            ds,
            -1 if c.n_way is None else c.n_way,
            -1 if (c.n_shot is None or all_shots) else c.n_shot,
            classes=c.class_pick,
            seed=c.subset_seed,
        )

    def eval_split(self, split: str, limit: Optional[int] = None, augment: Optional[AugmentLike] = None) -> Dataset:
        """Labelled ``split`` under the eval transform of ``augment`` (default: the first training
        pipeline, so the normalisation matches training): ``float [3, crop, crop]`` images.

        ``limit`` keeps a fixed, seeded random subset of that many images (for quick monitors).
        """
        aug = self.resolve_augment(augment)
        ds = self.images(split, eval_transform(aug), tensor_transform=TensorNormalize(aug))
        if self.cfg.n_way is not None and self.cfg.n_way != -1:  # the pretraining classes, all their images
            ds = self._nway_nshot(ds, all_shots=True)
        return _subset(ds, limit, seed=1234)

    def augmented_split(self, split: str, augment: Optional[AugmentLike] = None) -> Dataset:
        """One augmented view per image of ``split`` (``per_image_transform`` of ``augment``, default the
        first training pipeline), re-drawn at every access: the augmented linear-probe protocol."""
        return self.images(split, per_image_transform(self.resolve_augment(augment)))


def open_source(cfg) -> DataSource:
    """Resolve ``cfg`` (a ``DataConfig``) into a :class:`DataSource`."""
    return DataSource(cfg)


# --------------------------------------------------------------------------------------------------
# The functional API (thin wrappers)
# --------------------------------------------------------------------------------------------------


def in_memory_dataset(cfg, split: str) -> TensorImageDataset:
    """Decode ``split`` once into a uint8 tensor dataset (memoised per process)."""
    return open_source(cfg).decoded(split)


def build_train_views(cfg, seed: int = 0) -> tuple[Dataset, Optional[BatchedViews]]:
    """The pretraining dataset and, for ``batched`` view mode, the on-device view generator."""
    return open_source(cfg).train_views(seed)


def build_eval_dataset(cfg, split: str, limit: Optional[int] = None, augment: Optional[AugmentLike] = None) -> Dataset:
    """A labelled split under the eval transform of ``augment`` (default: the config's preset).

    ``limit`` keeps a fixed, seeded random subset of that many images (for quick monitors).
    """
    return open_source(cfg).eval_split(split, limit, augment)


def train_augmented_dataset(cfg, split: str, augment: Optional[AugmentLike] = None) -> Dataset:
    """One SSL-augmented view per image (the seeds' augmented linear-probe protocol)."""
    return open_source(cfg).augmented_split(split, augment)


def num_classes(ds: Dataset) -> int:
    classes = getattr(ds, "classes", None)
    if not classes:
        raise ValueError("the dataset has no class list; a labelled split is needed for evaluation")
    return len(classes)
