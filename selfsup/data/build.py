"""From a ``DataConfig`` to datasets: the training views and the labelled evaluation splits.

Two ways to make views (``DataConfig.view_mode``):

* ``per_image``: each loader worker decodes an image and runs the torchvision pipeline V times
  (``MultiViewTransform``); the batch arrives as ``[B, V, 3, h, w]``.
* ``batched``: the loader yields fixed-size uint8 images ``[B, 3, H, W]`` (decoded once into memory
  with ``in_memory``, else decoded and resized per image) and ``BatchedViews`` makes all ``B x V``
  views in one vectorised pass on the training device (see ``selfsup.engine.module``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, Subset

from selfsup.data.batched import BatchedViews
from selfsup.data.datasets import TensorImageDataset, build_dataset, demo_dataset_path, load_uint8
from selfsup.data.transforms import (
    Augment,
    MultiViewTransform,
    as_pipelines,
    eval_transform,
    get_preset,
    per_image_transform,
)


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
    pipelines = as_pipelines(get_preset(cfg.augment))
    overrides = dict(getattr(cfg, "augment_overrides", None) or {})
    if not overrides:
        return pipelines
    known = {f.name for f in dataclasses.fields(Augment)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"data.augment_overrides: unknown Augment field(s) {unknown}; valid: {sorted(known)}")
    return [dataclasses.replace(a, **overrides) for a in pipelines]


def eval_preset(name: str) -> Augment:
    """The first pipeline of a preset: its crop size, normalisation and eval resize."""
    return as_pipelines(get_preset(name))[0]


def _source(dataset: str, root: Optional[str]) -> tuple[str, Optional[str]]:
    if dataset == "demo":
        return "cifar10", str(demo_dataset_path())
    return dataset, root


def raw_dataset(dataset: str, root: Optional[str], split: str, transform=None, download: bool = False,
                skip_corrupt: bool = False, class_list: Optional[str] = None) -> Dataset:
    name, root = _source(dataset, root)
    return build_dataset(name, root=root, split=split, transform=transform, download=download,
                         skip_corrupt=skip_corrupt, class_list=class_list)


@functools.lru_cache(maxsize=8)
def _cached_uint8(dataset: str, root: Optional[str], split: str, size: Optional[int], skip_corrupt: bool,
                  class_list: Optional[str]) -> TensorImageDataset:
    ds = raw_dataset(dataset, root, split, skip_corrupt=skip_corrupt, class_list=class_list)
    images, labels = load_uint8(ds, size=size)
    out = TensorImageDataset(images, labels)
    out.classes = list(ds.classes)
    return out


def in_memory_dataset(cfg, split: str) -> TensorImageDataset:
    """Decode ``split`` once into a uint8 tensor dataset (memoised per process)."""
    return _cached_uint8(cfg.dataset, cfg.root, split, cfg.image_size, cfg.skip_corrupt, cfg.class_list)


def _subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sub = Subset(ds, idx)
    sub.classes = getattr(ds, "classes", None)
    targets = getattr(ds, "targets", None)
    sub.targets = [targets[i] for i in idx] if targets is not None else None
    return sub


def build_train_views(cfg, seed: int = 0) -> tuple[Dataset, Optional[BatchedViews]]:
    """The pretraining dataset and, for ``batched`` view mode, the on-device view generator."""
    pipelines = train_pipelines(cfg)
    if cfg.views < 1:
        raise ValueError(f"data.views must be >= 1, got {cfg.views}")
    if cfg.view_mode == "batched":
        if cfg.in_memory:
            ds: Dataset = in_memory_dataset(cfg, cfg.train_split)
        else:
            from torchvision.transforms import v2

            size = cfg.image_size or pipelines[0].crop_size
            load = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
            ds = raw_dataset(cfg.dataset, cfg.root, cfg.train_split, transform=load, download=cfg.download,
                             skip_corrupt=cfg.skip_corrupt, class_list=cfg.class_list)
        return _subset(ds, cfg.subset, seed), BatchedViews(pipelines, cfg.views)
    multi = MultiViewTransform([per_image_transform(a) for a in pipelines], cfg.views)
    if cfg.in_memory:
        ds = MapDataset(in_memory_dataset(cfg, cfg.train_split), multi)
    else:
        ds = raw_dataset(cfg.dataset, cfg.root, cfg.train_split, transform=multi, download=cfg.download,
                         skip_corrupt=cfg.skip_corrupt, class_list=cfg.class_list)
    return _subset(ds, cfg.subset, seed), None


def build_eval_dataset(cfg, split: str, limit: Optional[int] = None, augment: Optional[str] = None) -> Dataset:
    """A labelled split under the eval transform of ``augment`` (default: the config's preset).

    ``limit`` keeps a fixed, seeded random subset of that many images (for quick monitors).
    """
    aug = train_pipelines(cfg)[0] if augment is None else eval_preset(augment)  # same normalisation as training
    if cfg.in_memory:
        ds: Dataset = MapDataset(in_memory_dataset(cfg, split), TensorNormalize(aug))
    else:
        ds = raw_dataset(cfg.dataset, cfg.root, split, transform=eval_transform(aug), download=cfg.download,
                         skip_corrupt=cfg.skip_corrupt, class_list=cfg.class_list)
    return _subset(ds, limit, seed=1234)


def train_augmented_dataset(cfg, split: str, augment: Optional[str] = None) -> Dataset:
    """One SSL-augmented view per image (the seeds' augmented linear-probe protocol)."""
    aug = train_pipelines(cfg)[0] if augment is None else as_pipelines(get_preset(augment))[0]
    tf = per_image_transform(aug)
    if cfg.in_memory:
        return MapDataset(in_memory_dataset(cfg, split), tf)
    return raw_dataset(cfg.dataset, cfg.root, split, transform=tf, download=cfg.download,
                       skip_corrupt=cfg.skip_corrupt, class_list=cfg.class_list)


def num_classes(ds: Dataset) -> int:
    classes = getattr(ds, "classes", None)
    if not classes:
        raise ValueError("the dataset has no class list; a labelled split is needed for evaluation")
    return len(classes)
