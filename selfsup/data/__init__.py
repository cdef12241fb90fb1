"""Data: datasets (folder / .zip / .tar ImageFolders, torchvision names, in-memory uint8 cache).

Modules: ``archive`` (container access), ``folder`` (ImageFolder rules), ``torchvision_sets``,
``memory`` (in-memory uint8), ``datasets`` (``build_dataset`` by name; re-exports the others),
``transforms`` / ``batched`` (augmentations per image / per batch), ``build`` (``DataConfig`` ->
datasets via ``open_source``), ``sampler``.
"""

from selfsup.data.datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFolderDataset,
    TensorImageDataset,
    TorchvisionDataset,
    build_dataset,
    demo_dataset_path,
    load_uint8,
    read_class_list,
)

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
