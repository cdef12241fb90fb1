"""Shared fixtures: real CIFAR-10 JPEGs and small real slices of them.

A fresh clone has no ``../shared`` beside it: every test then runs on the CIFAR-10 sample shipped in the
package (``selfsup/assets/cifar10_demo.zip``, 4,000 / 1,000 original CIFAR-10 JPEGs). Only the tests that need
the whole archive ``../shared/datasets/cifar10-jpeg.zip`` (fixture ``full_cifar_zip``) skip without it,
naming it; under CI (``CI`` set), where it exists, its absence is a failure.
"""

from __future__ import annotations

import os
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from selfsup.data.datasets import demo_dataset_path

SHARED_CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared/datasets/cifar10-jpeg.zip"
SAMPLE_ZIP = demo_dataset_path()


def make_cifar_slice(out: Path, train_per_class: int, test_per_class: int, source: Path = SAMPLE_ZIP) -> Path:
    """Copy the first N JPEGs per class and split of ``source`` (default: the shipped sample) into a new zip."""
    quota = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = defaultdict(int)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in sorted(src.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            key = (parts[1], parts[2])
            if taken[key] < quota.get(parts[1], 0):
                dst.writestr(name, src.read(name))
                taken[key] += 1
    return out


def require_full_archive() -> Path:
    if SHARED_CIFAR_ZIP.is_file():
        return SHARED_CIFAR_ZIP
    msg = f"needs the full CIFAR-10 archive {SHARED_CIFAR_ZIP} (../shared/datasets/cifar10-jpeg.zip)"
    if os.environ.get("CI"):
        pytest.fail(msg + ", which CI must have")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def full_cifar_zip() -> Path:
    """The whole CIFAR-10 archive (50,000 / 10,000): skips on a clone without ../shared, fails in CI."""
    return require_full_archive()


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    """Real CIFAR-10 JPEGs in ``cifar10/{train,test}/<class>/``: the full archive where present, else the sample."""
    return SHARED_CIFAR_ZIP if SHARED_CIFAR_ZIP.is_file() else SAMPLE_ZIP


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """200 train / 100 test real CIFAR-10 images (20 / 10 per class) from the shipped sample, as a zip ImageFolder."""
    return make_cifar_slice(tmp_path_factory.mktemp("data") / "cifar_slice.zip", 20, 10)


def test_members(zip_path: Path, cls: str, n: int) -> list[str]:
    """The first ``n`` member names of ``cifar10/test/<cls>/`` in ``zip_path`` (sorted)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith(f"cifar10/test/{cls}/") and m.endswith(".jpg"))
    return names[:n]


test_members.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast and does not spin against the other processes of a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory, cifar_slice) -> Path:
    """``last.ckpt`` of a 1-epoch tiny ViT MMCR run on 40 real images (once per test module)."""
    from cli_args import tiny_vit_pretrain

    return tiny_vit_pretrain(tmp_path_factory.mktemp("vit") / "run", cifar_slice)
