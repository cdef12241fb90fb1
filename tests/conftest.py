"""Shared fixtures: the real CIFAR-10 archive and small real slices of it."""

from __future__ import annotations

import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

SHARED_CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared/datasets/cifar10-jpeg.zip"


def make_cifar_slice(out: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N JPEGs per class and split from the shared archive into a new zip."""
    if not SHARED_CIFAR_ZIP.is_file():
        pytest.fail(f"real CIFAR-10 archive missing: expected {SHARED_CIFAR_ZIP} (../shared/datasets beside the repo)")
    quota = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = defaultdict(int)
    with zipfile.ZipFile(SHARED_CIFAR_ZIP) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in sorted(src.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            key = (parts[1], parts[2])
            if taken[key] < quota.get(parts[1], 0):
                dst.writestr(name, src.read(name))
                taken[key] += 1
    return out


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    if not SHARED_CIFAR_ZIP.is_file():
        pytest.fail(f"real CIFAR-10 archive missing: expected {SHARED_CIFAR_ZIP}")
    return SHARED_CIFAR_ZIP


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """200 train / 100 test real CIFAR-10 images (20 / 10 per class), as a zip ImageFolder."""
    return make_cifar_slice(tmp_path_factory.mktemp("data") / "cifar_slice.zip", 20, 10)
