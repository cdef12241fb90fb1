"""Data: datasets (folder / .zip / .tar ImageFolders, torchvision names, in-memory uint8 cache)."""

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
