"""Tests of the augmentation configs, presets, per-image pipelines and batched on-device views.

Expected values are derived by hand or from torchvision's own functional ops, never from the code under
test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from selfsup.data.batched import BatchedViews, adjust_hue, gaussian_blur, hsv_to_rgb, rgb_to_hsv
from selfsup.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Augment,
    MultiViewTransform,
    as_pipelines,
    eval_transform,
    get_preset,
    per_image_transform,
)

# An augmentation that does nothing but normalise (with mean 0, std 1: nothing at all).
IDENTITY = Augment(
    crop_size=32,
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)


def ident(**kw) -> Augment:
    return dataclasses.replace(IDENTITY, **kw)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images_u8() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen(1))


@pytest.fixture
def images_f() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=gen(2))


# --------------------------------------------------------------------------------------------------
# Shapes, layout, geometry
# --------------------------------------------------------------------------------------------------


def test_shapes_dtype_and_sample_major_order(images_u8: torch.Tensor) -> None:
    a = ident(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    b = ident(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    views = BatchedViews([a, b], n_views=4)(images_u8, gen())
    assert views.shape == (3, 4, 3, 32, 32) and views.dtype == torch.float32
    x = images_u8.float() / 255.0
    for i in range(3):
        for v in range(4):
            p = (a, b)[v % 2]  # even slots A, odd slots B
            torch.testing.assert_close(views[i, v], normalise(x[i], p.mean, p.std), atol=1e-5, rtol=0)

    # The per-image path: same layout, same values.
    mvt = MultiViewTransform([per_image_transform(a), per_image_transform(b)], n_views=4)
    out = mvt(images_u8[0])
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
    for v in range(4):
        p = (a, b)[v % 2]
        torch.testing.assert_close(out[v], normalise(x[0], p.mean, p.std), atol=1e-5, rtol=0)


def test_identity_crop_reproduces_float_image(images_f: torch.Tensor) -> None:
    views = BatchedViews(IDENTITY, n_views=3)(images_f, gen())
    torch.testing.assert_close(views, images_f.unsqueeze(1).expand(-1, 3, -1, -1, -1), atol=1e-5, rtol=0)


def test_flip_with_identity_crop(images_f: torch.Tensor) -> None:
    aug = ident(flip_p=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    views = BatchedViews(aug, n_views=2)(images_f, gen())
    expected = normalise(torch.flip(images_f, dims=[-1]), CIFAR10_MEAN, CIFAR10_STD)
    for v in range(2):
        torch.testing.assert_close(views[:, v], expected, atol=1e-5, rtol=0)


def test_crop_resizes_whole_image_to_other_size() -> None:
    # A horizontal ramp resampled from 64 to 32 px: pixel centres map to pixel centres of the crop.
    ramp = ((torch.arange(64) + 0.5) / 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    views = BatchedViews(ident(), n_views=1)(ramp, gen())
    expected = ((torch.arange(32) + 0.5) / 32).view(1, 32).expand(32, 32)
    torch.testing.assert_close(views[0, 0, 0], expected, atol=1e-5, rtol=0)


def test_random_resized_crop_statistics() -> None:
    """Recover each view's crop box from a coordinate-ramp image and check the distribution."""
    side, c = 64, 16
    xs = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    ramp_x, ramp_y = xs.view(1, side).expand(side, side), xs.view(side, 1).expand(side, side)
    img = torch.stack([ramp_x, ramp_y, torch.zeros(side, side)])
    aug = ident(crop_size=c, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)
    views = BatchedViews(aug, n_views=4096)(img.unsqueeze(0), gen(3))[0]  # [V, 3, c, c]
    xch, ych = views[:, 0], views[:, 1]
    # Sampling points span (c - 1) / c of the crop, so widths are rescaled by c / (c - 1).
    w = (xch[:, 0, -1] - xch[:, 0, 0]).abs() * c / (c - 1)
    h = (ych[:, -1, 0] - ych[:, 0, 0]) * c / (c - 1)
    area = w * h
    assert float(area.min()) >= 0.08 - 1e-3 and float(area.max()) <= 1.0 + 1e-3
    # Reference: torchvision's RandomResizedCrop parameters on a same-size image.
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(c, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    ref = [rrc.make_params([torch.empty(3, side, side)]) for _ in range(4096)]
    ref_area = np.mean([p["height"] * p["width"] / side**2 for p in ref])
    assert abs(float(area.mean()) - ref_area) < 0.03, (float(area.mean()), ref_area)
    ar = w / h
    assert float(ar.min()) >= 3 / 4 - 1e-2 and float(ar.max()) <= 4 / 3 + 1e-2
    # Crops stay inside the image.
    assert float(xch.min()) >= 0.0 and float(xch.max()) <= 1.0
    flipped = (xch[:, 0, -1] < xch[:, 0, 0]).float().mean()
    assert abs(float(flipped) - 0.5) < 0.05


# --------------------------------------------------------------------------------------------------
# Colour ops
# --------------------------------------------------------------------------------------------------


def test_grayscale_matches_torchvision(images_f: torch.Tensor) -> None:
    views = BatchedViews(ident(gray_p=1.0), n_views=2)(images_f, gen())
    expected = TF.rgb_to_grayscale(images_f, num_output_channels=3)
    for v in range(2):
        torch.testing.assert_close(views[:, v], expected, atol=1e-5, rtol=0)


def test_solarize_matches_torchvision(images_f: torch.Tensor) -> None:
    views = BatchedViews(ident(solarize_p=1.0, solarize_threshold=0.5), n_views=2)(images_f, gen())
    expected = TF.solarize(images_f, threshold=0.5)
    torch.testing.assert_close(views[:, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(views[:, 1], expected, atol=1e-6, rtol=0)


def test_solarize_threshold_is_128_on_uint8() -> None:
    img = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 4, 4).contiguous()
    aug = ident(crop_size=4, solarize_p=1.0)
    out = BatchedViews(aug, 1)(img, gen())[0, 0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 127 / 255, 127 / 255, 0.0]), atol=1e-6, rtol=0)
    # The per-image path agrees: 127 is kept, 128 inverted (PIL's ImageOps.solarize default).
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy())
    out_pi = per_image_transform(aug)(pil)[0, 0]
    torch.testing.assert_close(out_pi, torch.tensor([0.0, 127 / 255, 127 / 255, 0.0]), atol=1e-6, rtol=0)


def test_brightness_scales_pixels_keeping_hue() -> None:
    x = 0.1 + 0.5 * torch.rand(64, 3, 8, 8, generator=gen(4))  # in [0.1, 0.6]: no clamping at 1.4x
    b = 0.4
    views = BatchedViews(ident(crop_size=8, jitter=(b, 0.0, 0.0, 0.0), jitter_p=1.0), 1)(x, gen())[:, 0]
    ratio = views / x
    assert float(ratio.min()) >= 1 - b - 1e-5 and float(ratio.max()) <= 1 + b + 1e-5
    # One factor per image: every pixel and channel of an image is scaled alike (same hue and saturation).
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-5, rtol=0)
    assert float(ratio.flatten(1)[:, 0].std()) > 0.05  # factors do vary across images


def test_contrast_and_saturation_preserve_luma() -> None:
    x = 0.3 + 0.4 * torch.rand(32, 3, 8, 8, generator=gen(5))  # no clamping at factor 1.4
    luma = TF.rgb_to_grayscale(x)
    # Exact up to the luma weights summing to 0.9999 (torchvision's 0.2989 + 0.587 + 0.114), hence 1e-4.
    c_views = BatchedViews(ident(crop_size=8, jitter=(0.0, 0.4, 0.0, 0.0), jitter_p=1.0), 1)(x, gen())[:, 0]
    torch.testing.assert_close(TF.rgb_to_grayscale(c_views).mean((-1, -2)), luma.mean((-1, -2)), atol=1e-4, rtol=0)
    s_views = BatchedViews(ident(crop_size=8, jitter=(0.0, 0.0, 0.4, 0.0), jitter_p=1.0), 1)(x, gen())[:, 0]
    torch.testing.assert_close(TF.rgb_to_grayscale(s_views), luma, atol=1e-4, rtol=0)
    assert not torch.allclose(s_views, x, atol=1e-3)


def test_hue_jitter_keeps_max_and_min(images_f: torch.Tensor) -> None:
    views = BatchedViews(ident(jitter=(0.0, 0.0, 0.0, 0.5), jitter_p=1.0), 1)(images_f, gen())[:, 0]
    torch.testing.assert_close(views.amax(1), images_f.amax(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(views.amin(1), images_f.amin(1), atol=1e-5, rtol=0)
    assert not torch.allclose(views, images_f, atol=1e-2)


def test_hsv_helpers_round_trip_and_match_torchvision() -> None:
    x = torch.rand(16, 3, 8, 8, generator=gen(6))
    x[0] = 0.5  # grey
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red: the hue wrap point
    x[2, :, :4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)  # cyan
    hsv = rgb_to_hsv(x)
    assert float(hsv.min()) >= 0.0 and float(hsv.max()) <= 1.0
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    # Hand-derived values: pure red is (0, 1, 1), cyan (0.5, 1, 1), grey (0, 0, 0.5).
    torch.testing.assert_close(hsv[1, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(hsv[2, :, 0, 0], torch.tensor([0.5, 1.0, 1.0]))
    torch.testing.assert_close(hsv[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    shift = torch.rand(16, generator=gen(7)) - 0.5
    shift[3], shift[4] = 0.5, -0.5
    out = adjust_hue(x, shift)
    expected = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(16)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(16)), x, atol=1e-5, rtol=0)
    # A third of a turn maps red to green.
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = adjust_hue(red, torch.tensor([1 / 3])).flatten()
    torch.testing.assert_close(green, torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_blur_matches_torchvision(images_f: torch.Tensor) -> None:
    aug = ident(blur_p=1.0, blur_sigma=(1.0, 1.0), blur_kernel=5)
    views = BatchedViews(aug, 2)(images_f, gen())
    expected = TF.gaussian_blur(images_f, kernel_size=[5, 5], sigma=[1.0, 1.0])
    torch.testing.assert_close(views[:, 0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(views[:, 1], expected, atol=1e-4, rtol=0)
    # Per-sample sigmas in one call.
    sigma = torch.tensor([0.3, 0.9, 1.7, 2.0])
    out = gaussian_blur(images_f, sigma, 7)
    for i in range(4):
        ref = TF.gaussian_blur(images_f[i], kernel_size=[7, 7], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_probabilities_zero_and_partial(images_f: torch.Tensor) -> None:
    # With p = 0.5, about half the views are grayscale and the rest untouched.
    x = images_f[:1]
    views = BatchedViews(ident(gray_p=0.5), 400)(x, gen(8))[0]
    is_gray = (views.amax(1) - views.amin(1)).amax((-1, -2)) < 1e-6
    untouched = (views - x).abs().amax((1, 2, 3)) < 1e-5
    assert bool((is_gray | untouched).all())
    assert 0.4 < float(is_gray.float().mean()) < 0.6


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


def test_generator_determinism(images_u8: torch.Tensor) -> None:
    bv = BatchedViews(get_preset("cifar_min"), 4)
    a = bv(images_u8, gen(123))
    b = bv(images_u8, gen(123))
    c = bv(images_u8, gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Views of one image differ from each other.
    assert not torch.allclose(a[0, 0], a[0, 1])
    # Pairs and colour-first presets too.
    imgs = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8, generator=gen(9))
    for name, size in (("stl10", 64), ("mec", 224)):
        bv = BatchedViews(name, 2)
        out = bv(imgs, gen(5))
        assert out.shape == (2, 2, 3, size, size) and torch.isfinite(out).all()
        assert torch.equal(out, bv(imgs, gen(5)))


# --------------------------------------------------------------------------------------------------
# Presets and configs
# --------------------------------------------------------------------------------------------------


def test_presets_match_spec() -> None:
    # the seeds' presets (checked value by value below); methods added later bring their own, tested with them
    assert set(PRESETS) >= {
        "cifar10",
        "cifar100",
        "cifar_min",
        "stl10",
        "imagenet",
        "mec",
        "simclr",
        "simclr_cifar",
        "byol",
        "byol_cifar",
        "mae",
        "mae_cifar",
        "can",
        "can_cifar",
    }
    c10 = get_preset("cifar10")
    assert isinstance(c10, Augment)
    assert (c10.crop_size, c10.scale, c10.interpolation, c10.flip_p) == (32, (0.08, 1.0), "bilinear", 0.5)
    assert c10.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (c10.jitter, c10.jitter_p, c10.gray_p) == ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2)
    assert (c10.blur_p, c10.solarize_p) == (0.0, 0.0)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
    assert c10.eval_resize is None
    assert get_preset("cifar100") == c10  # CIFAR-100 uses the CIFAR-10 constants, as OFF-MMCR does

    cmin = get_preset("cifar_min")
    assert (cmin.gray_p, cmin.blur_p, cmin.kernel_size, cmin.blur_sigma) == (0.1, 0.1, 3, (0.1, 2.0))
    assert (cmin.solarize_p, cmin.solarize_threshold) == (0.2, 0.5)  # on [0, 1] floats, i.e. 128 on uint8

    stl = get_preset("stl10")
    assert (stl.crop_size, stl.scale, stl.interpolation, stl.gray_p) == (64, (0.2, 1.0), "bicubic", 0.1)
    assert stl.mean == (0.43, 0.42, 0.39) and stl.std == (0.27, 0.26, 0.27)
    assert (stl.eval_resize, stl.eval_interpolation, stl.color_first) == (70, "bicubic", True)

    a, b = get_preset("imagenet")
    for p in (a, b):
        assert (p.crop_size, p.interpolation, p.scale, p.jitter, p.jitter_p, p.gray_p) == (
            224,
            "bicubic",
            (0.08, 1.0),
            (0.4, 0.4, 0.2, 0.1),
            0.8,
            0.2,
        )
        assert (p.mean, p.std, p.eval_resize, p.blur_sigma) == (IMAGENET_MEAN, IMAGENET_STD, 256, (0.1, 2.0))
        assert p.kernel_size == 23
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (1.0, 0.0, 0.1, 0.2)

    m1, m2 = get_preset("mec")
    assert (m1.scale, m1.interpolation, m1.jitter) == ((0.2, 1.0), "bilinear", (0.4, 0.4, 0.2, 0.1))
    assert (m1.blur_p, m1.solarize_p, m2.blur_p, m2.solarize_p) == (1.0, 0.0, 0.1, 0.2)


def test_get_preset_errors_and_copies() -> None:
    with pytest.raises(ValueError, match="cifar10.*imagenet"):
        get_preset("cifar11")
    p = get_preset("cifar10")
    p.gray_p = 0.9
    assert PRESETS["cifar10"].gray_p == 0.2  # type: ignore[union-attr]
    assert len(as_pipelines("imagenet")) == 2 and len(as_pipelines(get_preset("cifar10"))) == 1


def test_augment_validation() -> None:
    with pytest.raises(ValueError):
        Augment(gray_p=1.5)
    with pytest.raises(ValueError):
        Augment(blur_kernel=4)
    with pytest.raises(ValueError):
        Augment(solarize_threshold=128)
    with pytest.raises(ValueError):
        Augment(jitter=(0.4, 0.4, 0.4, 0.6))
    assert Augment(scale=[0.2, 1.0]).scale == (0.2, 1.0)  # lists from YAML become tuples
    assert Augment(crop_size=64).kernel_size == 7 and Augment(crop_size=32).kernel_size == 3


def test_asymmetric_pair_needs_even_views() -> None:
    pair = as_pipelines("imagenet")
    with pytest.raises(ValueError, match="even"):
        MultiViewTransform(pair, 3)
    with pytest.raises(ValueError, match="even"):
        BatchedViews(pair, 3)
    with pytest.raises(ValueError):
        MultiViewTransform([per_image_transform(IDENTITY)], 0)
    with pytest.raises(ValueError):
        BatchedViews(IDENTITY, 0)
    assert MultiViewTransform(pair, 2).n_views == 2


# --------------------------------------------------------------------------------------------------
# Per-image and eval pipelines
# --------------------------------------------------------------------------------------------------


def test_per_image_pipelines_accept_pil_and_uint8() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    for name in ("cifar_min", "stl10"):
        f = per_image_transform(as_pipelines(name)[0])
        size = as_pipelines(name)[0].crop_size
        for inp in (pil, t):
            out = f(inp)
            assert out.shape == (3, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all()
    mvt = MultiViewTransform(as_pipelines("cifar10"), 5)
    assert mvt(pil).shape == (5, 3, 32, 32)


def test_eval_transforms() -> None:
    img = torch.randint(0, 256, (3, 96, 120), dtype=torch.uint8, generator=gen(10))
    c10 = get_preset("cifar10")
    small = img[:, :32, :32]
    torch.testing.assert_close(eval_transform(c10)(small), normalise(small.float() / 255, c10.mean, c10.std))
    assert eval_transform(get_preset("stl10"))(img).shape == (3, 64, 64)
    imnet = as_pipelines("imagenet")[0]
    big = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=gen(11))
    assert eval_transform(imnet)(big).shape == (3, 224, 224)
    assert eval_transform(imnet, size=112)(big).shape == (3, 112, 112)
    assert eval_transform(c10, size=16)(small).shape == (3, 16, 16)
    # Centre crop of a Resize(256): the middle of the resized image, deterministic.
    e = eval_transform(imnet)
    torch.testing.assert_close(e(big), e(big))


def test_accelerator_matches_cpu(images_u8: torch.Tensor) -> None:
    """Views on the training device equal the CPU views for the same CPU generator (CUDA where present).

    On a CPU-only machine the device is the CPU and this checks generator determinism across calls.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bv = BatchedViews(get_preset("cifar_min"), 4)
    cpu = bv(images_u8, gen(1))
    dev = bv(images_u8.to(device), gen(1))  # CPU generator, device images: same draws, same views
    assert dev.device.type == device.type
    torch.testing.assert_close(dev.cpu(), cpu, atol=1e-4, rtol=0)
    out = bv(images_u8.to(device), torch.Generator(device=device).manual_seed(0))
    assert torch.equal(out, bv(images_u8.to(device), torch.Generator(device=device).manual_seed(0)))
