"""Batched views of images larger than the crop: crop boxes on the full image, photometric ops on device.

Crop boxes are recovered from *coordinate images* (channel 0 holds each pixel's x, channel 1 its y) and
compared, as distributions, with torchvision's own ``RandomResizedCrop.get_params`` on the same image
size. Statistic: the two-sample Kolmogorov-Smirnov distance D between the empirical CDFs of the box area
fraction, aspect ratio and centre (x, y). With n = m = 4000 draws from one distribution, Kolmogorov's
asymptotic bound gives P(D > 0.06) = 2 exp(-2 * 0.06^2 * 2000) ~ 1e-6 (conservative for the integer-valued
boxes here), so ``KS_BOUND = 0.06`` does not fail a correct sampler in practice while the centre-crop path
this replaces gives D > 0.2. Seeds are fixed, so every run is identical.
"""

from __future__ import annotations

import dataclasses
import random
import zipfile

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from conftest import test_members
from PIL import Image

from selfsup.data.batched import BatchedViews
from selfsup.data.build import build_train_views, open_source
from selfsup.data.transforms import Augment, MultiViewTransform, crop_flip_transform
from selfsup.engine.config import DataConfig

N_DRAWS = 4000
KS_BOUND = 0.06
STATS = ("area", "aspect", "cx", "cy")

# Geometry only: no colour, mean 0 / std 1 (BatchedViews then returns the resampled pixels).
PLAIN = Augment(jitter_p=0.0, gray_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: sup |F_a - F_b| over the pooled values (ties handled)."""
    a, b = np.sort(a), np.sort(b)
    pooled = np.concatenate([a, b])
    fa = np.searchsorted(a, pooled, side="right") / len(a)
    fb = np.searchsorted(b, pooled, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def coord_image(h: int, w: int) -> torch.Tensor:
    """``uint8 [3, h, w]``: channel 0 = column index, channel 1 = row index (so h, w <= 256)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)]).to(torch.uint8)


def box_stats(left, top, width, height, h: int, w: int) -> dict[str, np.ndarray]:
    left, top, width, height = (np.asarray(v, dtype=np.float64) for v in (left, top, width, height))
    return {
        "area": width * height / (h * w),
        "aspect": width / height,
        "cx": (left + width / 2) / w,
        "cy": (top + height / 2) / h,
    }


def boxes_of_coord_views(views: torch.Tensor, h: int, w: int) -> dict[str, np.ndarray]:
    """Boxes of uint8 views ``[N, 3, c, c]`` of a coordinate image, resampled with ``nearest``.

    Nearest resampling copies source pixels, so the smallest / largest x and y seen are the box's edges
    (exactly, when ``c`` >= the box side; a flip only mirrors the columns).
    """
    xs, ys = views[:, 0].flatten(1).float(), views[:, 1].flatten(1).float()
    left, right = xs.min(1).values, xs.max(1).values
    top, bottom = ys.min(1).values, ys.max(1).values
    return box_stats(left, top, right - left + 1, bottom - top + 1, h, w)


def torchvision_boxes(h: int, w: int, aug: Augment, seed: int) -> tuple[np.ndarray, ...]:
    """``(top, left, height, width)`` arrays of ``N_DRAWS`` draws of torchvision's ``get_params``."""
    torch.manual_seed(seed)
    img = torch.zeros(3, h, w)
    draws = [T1.RandomResizedCrop.get_params(img, scale=list(aug.scale), ratio=list(aug.ratio)) for _ in range(N_DRAWS)]
    return tuple(np.array(v, dtype=np.float64) for v in zip(*draws))


def assert_same_boxes(got: dict, ref: dict, what: str) -> None:
    d = {k: ks_distance(got[k], ref[k]) for k in STATS}
    assert max(d.values()) < KS_BOUND, f"{what}: KS distances {d}"


def loader_views(img: torch.Tensor, aug: Augment, seed: int) -> torch.Tensor:
    """``N_DRAWS`` loader-side crops of ``img`` (one view per call, torch's global RNG seeded once)."""
    tf = crop_flip_transform(aug)
    torch.manual_seed(seed)
    return torch.stack([tf(img) for _ in range(N_DRAWS)])


def old_centre_crop_views(img: torch.Tensor, aug: Augment, seed: int) -> torch.Tensor:
    """The replaced path: the loader resized + centre-cropped to the crop size, then BatchedViews cropped."""
    c = aug.crop_size
    small = T.Compose([T.Resize(c, antialias=True), T.CenterCrop(c)])(img)
    geometry = {f: getattr(aug, f) for f in ("crop_size", "scale", "ratio", "interpolation", "flip_p")}
    bv = BatchedViews(dataclasses.replace(PLAIN, **geometry), N_DRAWS)
    out = bv(small.unsqueeze(0).float() / 255.0, torch.Generator().manual_seed(seed))[0]
    return (out * 255.0).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# (a) loader-side geometry on the full image
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(96, 160), (160, 96)])
def test_loader_crop_boxes_follow_torchvision_on_non_square_images(h, w):
    # crop side >= both image sides: nearest upsampling shows every source pixel, so boxes are exact
    aug = Augment(crop_size=max(h, w), interpolation="nearest", flip_p=0.5)
    views = loader_views(coord_image(h, w), aug, seed=1)
    assert views.dtype == torch.uint8 and views.shape == (N_DRAWS, 3, max(h, w), max(h, w))
    got = boxes_of_coord_views(views, h, w)
    top, left, height, width = torchvision_boxes(h, w, aug, seed=2)
    assert_same_boxes(got, box_stats(left, top, width, height, h, w), f"loader crops on {h}x{w}")
    flipped = (views[:, 0, 0, 0] > views[:, 0, 0, -1]).float().mean()
    assert abs(float(flipped) - 0.5) < 0.03


def test_centre_crop_path_misses_the_periphery_and_fails_the_box_test():
    """On a 64x200 image with a 64 crop the old loader kept only columns 68..131: no crop reached x < 68,
    where torchvision's boxes start half of the time. The loader-side crop passes the same test."""
    h, w = 64, 200
    img = coord_image(h, w)
    aug = Augment(crop_size=64, interpolation="nearest", flip_p=0.5)
    top, left, height, width = torchvision_boxes(h, w, aug, seed=2)
    # reference views through the same measurement (nearest downsampling is not exact for wide boxes)
    ref_views = torch.stack(
        [
            TF.resized_crop(img, int(t), int(l_), int(hh), int(ww), [64, 64], interpolation=T.InterpolationMode.NEAREST)
            for t, l_, hh, ww in zip(top, left, height, width)
        ]
    )
    ref = boxes_of_coord_views(ref_views, h, w)
    assert (left < 68).mean() > 0.3

    old = old_centre_crop_views(img, aug, seed=0)
    assert int(old[:, 0].min()) >= 68 and int(old[:, 0].max()) <= 131
    d_old = {k: ks_distance(boxes_of_coord_views(old, h, w)[k], ref[k]) for k in STATS}
    assert max(d_old.values()) > 0.2, d_old

    new = loader_views(img, aug, seed=1)
    assert (new[:, 0].flatten(1).min(1).values < 68).float().mean() > 0.3
    assert_same_boxes(boxes_of_coord_views(new, h, w), ref, "loader crops on 64x200")


def test_loader_geometry_uses_only_torch_rng():
    aug = Augment(crop_size=24, flip_p=0.5)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    other = dataclasses.replace(aug, scale=(0.5, 1.0))
    multi = MultiViewTransform([crop_flip_transform(aug), crop_flip_transform(other)], 4)
    outs = []
    for py_seed in (1, 2):
        random.seed(py_seed)
        np.random.seed(py_seed)
        torch.manual_seed(7)
        outs.append(multi(img))
    assert outs[0].dtype == torch.uint8 and outs[0].shape == (4, 3, 24, 24)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(multi(img), outs[0])


# --------------------------------------------------------------------------------------------------
# (b) the on-device sampler of 4-D batches against torchvision, on non-square images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(96, 160), (160, 96)])
def test_batched_crop_sampler_follows_torchvision_on_non_square_images(h, w):
    """BatchedViews._crop_flip on a float ramp: bilinear sampling of a linear ramp is exact, so the crop
    box follows from two pixels. Its boxes are not rounded to whole pixels (torchvision's are), which
    moves D by about 1 / (positions per box side), well inside the bound."""
    c = 16  # every box side here is >= 30 px, so all sampling points stay off the border
    ramp_x = ((torch.arange(w, dtype=torch.float64) + 0.5) / w).view(1, w).expand(h, w)
    ramp_y = ((torch.arange(h, dtype=torch.float64) + 0.5) / h).view(h, 1).expand(h, w)
    img = torch.stack([ramp_x, ramp_y, torch.zeros(h, w, dtype=torch.float64)]).float()
    aug = dataclasses.replace(PLAIN, crop_size=c, flip_p=0.5)
    views = BatchedViews(aug, N_DRAWS)(img.unsqueeze(0), torch.Generator().manual_seed(3))[0]
    xf, xl = views[:, 0, 0, 0].double(), views[:, 0, 0, -1].double()
    yf, yl = views[:, 1, 0, 0].double(), views[:, 1, -1, 0].double()
    width = (xl - xf).abs() * c / (c - 1) * w  # sampling points span (c - 1) / c of the crop
    height = (yl - yf) * c / (c - 1) * h
    left = torch.minimum(xf, xl) * w - 0.5 * width / c
    top = yf * h - 0.5 * height / c
    assert float(left.min()) > -1e-3 and float((left + width).max()) < w + 1e-3
    got = box_stats(left, top, width, height, h, w)
    top_r, left_r, height_r, width_r = torchvision_boxes(h, w, aug, seed=2)
    assert_same_boxes(got, box_stats(left_r, top_r, width_r, height_r, h, w), f"batched crops on {h}x{w}")
    assert abs(float((xf > xl).double().mean()) - 0.5) < 0.03


# --------------------------------------------------------------------------------------------------
# (c) 5-D input: photometric ops only, same draws as the 4-D path
# --------------------------------------------------------------------------------------------------

_PHOTO_A = Augment(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.8, gray_p=0.3, blur_p=0.5, blur_kernel=3, solarize_p=0.3
)
_PHOTO_B = dataclasses.replace(
    _PHOTO_A,
    jitter=(0.8, 0.8, 0.8, 0.2),
    jitter_p=1.0,
    gray_p=0.1,
    blur_p=0.0,
    solarize_p=0.6,
    color_first=True,
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.3, 0.25),
)


@pytest.mark.parametrize("pipelines,views", [([_PHOTO_A], 3), ([_PHOTO_A, _PHOTO_B], 4)])
def test_cropped_views_get_the_same_photometric_ops_as_full_images(pipelines, views):
    """With an identity crop (scale 1, ratio 1, no flip, square images) the 4-D path's crop is exact, so
    handing BatchedViews the already 'cropped' views must give the same output for the same generator."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bv = BatchedViews(pipelines, views)
    full = bv(images, torch.Generator().manual_seed(11))
    stacked = images.unsqueeze(1).expand(-1, views, -1, -1, -1).contiguous()
    cropped = bv(stacked, torch.Generator().manual_seed(11))
    assert cropped.shape == full.shape == (5, views, 3, 32, 32) and cropped.dtype == torch.float32
    torch.testing.assert_close(cropped, full, atol=2e-5, rtol=0)
    # float input works too and is left untouched
    as_float = stacked.float() / 255.0
    before = as_float.clone()
    torch.testing.assert_close(bv(as_float, torch.Generator().manual_seed(11)), full, atol=2e-5, rtol=0)
    assert torch.equal(as_float, before)
    # the views really differ from one another (the draws are per view)
    assert not torch.allclose(full[:, 0], full[:, 1 % views])


def test_cropped_views_shape_is_checked():
    bv = BatchedViews(Augment(crop_size=16), 2)
    with pytest.raises(ValueError, match=r"V=2, 3, 16, 16"):
        bv(torch.zeros(4, 3, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"V=2, 3, 16, 16"):
        bv(torch.zeros(4, 2, 3, 32, 32, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# (d) build_train_views in batched mode on real non-square images
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_cifar_zip(cifar_zip, tmp_path_factory):
    """12 real CIFAR-10 test images (3 classes), upscaled to 80x48 (WxH), as a zip ImageFolder."""
    out = tmp_path_factory.mktemp("wide") / "wide.zip"
    with zipfile.ZipFile(cifar_zip) as src, zipfile.ZipFile(out, "w") as dst:
        for c in ("bird", "cat", "dog"):
            for k, member in enumerate(test_members(cifar_zip, c, 4)):
                with src.open(member) as f:
                    img = Image.open(f).convert("RGB").resize((80, 48), Image.Resampling.BICUBIC)
                path = f"wide/train/{c}/{k:04d}.png"
                with dst.open(path, "w") as g:
                    img.save(g, format="PNG")
    return out


def test_build_train_views_batched_crops_full_images_in_the_loader(wide_cifar_zip):
    cfg = DataConfig(
        dataset="folder",
        root=str(wide_cifar_zip),
        view_mode="batched",
        in_memory=False,
        views=4,
        augment="imagenet",
        augment_overrides={"crop_size": 40},
        num_workers=0,
        batch_size=6,
    )
    ds, gen = build_train_views(cfg, seed=0)
    assert isinstance(gen, BatchedViews) and len(ds) == 12
    torch.manual_seed(0)
    x, y = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 40, 40) and y == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=0)
    batch, _labels = next(iter(loader))
    assert batch.dtype == torch.uint8 and batch.shape == (6, 4, 3, 40, 40)
    views = gen(batch, torch.Generator().manual_seed(0))
    assert views.dtype == torch.float32 and views.shape == (6, 4, 3, 40, 40) and torch.isfinite(views).all()
    # the view generator is the one the source builds for the same config
    assert [p.crop_size for p in open_source(cfg).pipelines] == [40, 40]

    # image_size resizes the short side first (aspect kept): still full-image crops, still 5-D uint8
    small = dataclasses.replace(cfg, image_size=24, augment_overrides={"crop_size": 16})
    x, _ = build_train_views(small, seed=0)[0][0]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16)


def test_build_train_views_batched_in_memory_keeps_full_images(wide_cifar_zip):
    cfg = DataConfig(
        dataset="folder",
        root=str(wide_cifar_zip),
        view_mode="batched",
        in_memory=True,
        views=2,
        augment="cifar10",
        num_workers=0,
    )
    ds, gen = build_train_views(cfg)
    x, _ = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 48, 80)  # native size, not the 32 px crop
    assert gen(x.unsqueeze(0), torch.Generator().manual_seed(0)).shape == (1, 2, 3, 32, 32)
