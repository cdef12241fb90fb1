"""``open_source(cfg)``: one resolved source per ``DataConfig``; eval and augmented splits; in-memory sizes."""

from __future__ import annotations

import dataclasses
import zipfile

import pytest
import torch
from conftest import test_members
from PIL import Image

from selfsup.data.build import (
    DataSource,
    build_eval_dataset,
    in_memory_dataset,
    open_source,
    train_augmented_dataset,
)
from selfsup.data.datasets import demo_dataset_path
from selfsup.data.transforms import Augment, get_preset
from selfsup.engine.config import DataConfig

# The ImageNet linear-probe protocol's train augmentation: crop + flip only (CIFAR-sized here).
CROP_FLIP = Augment(crop_size=24, scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, eval_resize=28)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cifar10", root=str(root), num_workers=0, **kw)


def _zip_of_resized(cifar_zip, out, sizes: dict[str, tuple[int, int]]) -> str:
    """A zip ImageFolder ``top/train/<class>/<k>.png`` of real CIFAR test images resized to ``sizes[key]``."""
    with zipfile.ZipFile(cifar_zip) as src, zipfile.ZipFile(out, "w") as dst:
        for key, wh in sizes.items():
            c, k = key.split("/")
            with src.open(test_members(cifar_zip, c, int(k) + 1)[int(k)]) as f:
                img = Image.open(f).convert("RGB").resize(wh, Image.Resampling.BICUBIC)
            with dst.open(f"top/train/{c}/{int(k):04d}.png", "w") as g:
                img.save(g, format="PNG")
    return str(out)


def test_open_source_resolves_demo_once():
    src = open_source(DataConfig(dataset="demo"))
    assert isinstance(src, DataSource)
    assert src.name == "cifar10" and src.root == str(demo_dataset_path())
    assert [p.crop_size for p in src.pipelines] == [32]


def test_eval_split_is_the_same_in_memory_and_raw(cifar_slice):
    raw = open_source(_cfg(cifar_slice)).eval_split("test", limit=12)
    mem = open_source(_cfg(cifar_slice, in_memory=True)).eval_split("test", limit=12)
    assert len(raw) == len(mem) == 12 and raw.targets == mem.targets and raw.classes == mem.classes
    for i in (0, 5, 11):
        x, y = raw[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        torch.testing.assert_close(mem[i][0], x, atol=1e-6, rtol=0)
        assert int(mem[i][1]) == y


@pytest.mark.parametrize("in_memory", [False, True])
def test_eval_and_augmented_splits_accept_an_augment(cifar_slice, in_memory):
    cfg = _cfg(cifar_slice, in_memory=in_memory)
    ev = build_eval_dataset(cfg, "test", augment=CROP_FLIP)  # Resize 28 -> CenterCrop 24
    assert ev[0][0].shape == (3, 24, 24) and len(ev) == 100
    by_name = build_eval_dataset(cfg, "test", limit=4, augment="stl10")  # Resize 70 -> CenterCrop 64
    assert by_name[0][0].shape == (3, 64, 64)

    aug = train_augmented_dataset(cfg, "train", augment=CROP_FLIP)
    assert len(aug) == 200 and aug.classes == open_source(cfg).eval_split("train").classes
    x, _y = aug[3]
    assert x.dtype == torch.float32 and x.shape == (3, 24, 24)
    assert train_augmented_dataset(cfg, "train", augment="cifar10")[3][0].shape == (3, 32, 32)
    assert train_augmented_dataset(cfg, "train")[3][0].shape == (3, 32, 32)


def test_augmented_split_draws_the_same_views_in_memory_and_raw(cifar_slice):
    """Both decode to the same uint8 pixels and draw from torch's global RNG: same seed, same views."""
    raw = open_source(_cfg(cifar_slice)).augmented_split("train", CROP_FLIP)
    mem = open_source(_cfg(cifar_slice, in_memory=True)).augmented_split("train", CROP_FLIP)
    torch.manual_seed(3)
    a = raw[7][0]
    torch.manual_seed(3)
    b = mem[7][0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_overrides_reach_every_derived_dataset(cifar_slice):
    cfg = _cfg(cifar_slice, augment_overrides={"crop_size": 28, "eval_resize": 30})
    src = open_source(cfg)
    assert src.resolve_augment() == dataclasses.replace(get_preset("cifar10"), crop_size=28, eval_resize=30)
    assert src.eval_split("test", limit=2)[0][0].shape == (3, 28, 28)
    assert src.augmented_split("test")[0][0].shape == (3, 28, 28)
    bad = _cfg(cifar_slice, augment_overrides={"crop_sise": 28})
    with pytest.raises(ValueError, match="crop_sise"):
        open_source(bad).eval_split("test")


def test_in_memory_keeps_the_native_size(cifar_zip, tmp_path):
    """STL-10-sized 96 px images stay 96 px in memory under the 64 px stl10 preset (no shrink before the crop)."""
    sizes = {f"{c}/{k}": (96, 96) for c in ("cat", "dog") for k in range(3)}
    root = _zip_of_resized(cifar_zip, tmp_path / "stl_like.zip", sizes)
    cfg = DataConfig(dataset="folder", root=root, in_memory=True, view_mode="batched", augment="stl10", num_workers=0)
    mem = in_memory_dataset(cfg, "train")
    assert mem.images.shape == (6, 3, 96, 96)
    assert open_source(cfg).decoded("train") is mem  # decoded once per process
    assert open_source(cfg).eval_split("train")[0][0].shape == (3, 64, 64)  # eval: Resize 70 -> CenterCrop 64
    sized = in_memory_dataset(dataclasses.replace(cfg, image_size=80), "train")
    assert sized.images.shape == (6, 3, 80, 80)


def test_in_memory_mixed_sizes_need_image_size(cifar_zip, tmp_path):
    sizes = {"cat/0": (48, 40), "cat/1": (48, 40), "dog/0": (64, 40)}
    root = _zip_of_resized(cifar_zip, tmp_path / "mixed.zip", sizes)
    cfg = DataConfig(dataset="folder", root=root, in_memory=True, num_workers=0)
    with pytest.raises(ValueError) as exc:
        in_memory_dataset(cfg, "train")
    msg = str(exc.value)
    assert "data.image_size" in msg and "top/train/dog/0000.png" in msg and "64x40" in msg
    assert in_memory_dataset(dataclasses.replace(cfg, image_size=36), "train").images.shape == (3, 3, 36, 36)
