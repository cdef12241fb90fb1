"""``selfsup reconstruct`` on a grayscale image: the norm-pix display cannot invent colour.

The images are normalised per channel (CIFAR-10 mean / std, different per channel) before patchify, and the
norm-pix target normalises each patch over all ``p² C`` values (channels mixed): a uniform black patch is
``(−2.43, −2.42, −2.22)`` in normalised units, its target a pure channel pattern and its ``σ`` the spread between
channels, while on a textured patch the same channel offsets are a small part of a large ``σ``. A prediction that
gets ``σ`` wrong (the model cannot see the removed patch) shown as ``ŷ σ + μ`` (display ``"patch"``) is coloured
(the blue cast of the report: a high-contrast patch predicted with a flat patch's channel pattern); the default
display ``"channel"`` (each channel at its own mean, the patch's scale) is gray for every gray-consistent prediction.

Real CIFAR-10 JPEGs of the shipped sample, made gray (L, then RGB), tiny models, no training.
"""

from __future__ import annotations

import inspect
import io
import zipfile

import pytest
import torch
from PIL import Image

from selfsup.data.datasets import demo_dataset_path
from selfsup.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from selfsup.losses.mae import NORM_PIX_EPS, norm_pix_targets
from selfsup.methods import CAN, MAE
from selfsup.models.masked_vit import masking_from_noise, patchify
from selfsup.reconstruct import DISPLAYS, display_patches, reconstruct, reconstruction_panels

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
P = 8  # TINY_VIT's patch: 16 patches of 8 x 8 x 3 on 32 px


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    """32 real CIFAR-10 test images made gray, ``[32, 3, 32, 32]`` in ``[0, 1]`` (R = G = B exactly); image 0 gets a
    uniform black patch (grid cell 0) and a uniform mid-gray one (cell 5), the report's background."""
    with zipfile.ZipFile(demo_dataset_path()) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith("cifar10/test/") and m.endswith(".jpg"))[::31][:32]
        imgs = [Image.open(io.BytesIO(zf.read(m))).convert("L").convert("RGB") for m in names]
    x = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(32, 32, 3) for im in imgs])
    x = x.permute(0, 3, 1, 2).float() / 255
    x[0, :, :P, :P] = 0.0
    x[0, :, P : 2 * P, P : 2 * P] = 128 / 255
    assert torch.equal(x[:, 0], x[:, 2]) and torch.equal(x[:, 1], x[:, 2])
    return x


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN.to(x.dtype)) / STD.to(x.dtype)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x * STD.to(x.dtype) + MEAN.to(x.dtype)


def _cast(shown_patches: torch.Tensor) -> torch.Tensor:
    """Patches in normalised units ``[N, L, p² 3]`` -> per-patch mean ``B − R`` in pixel units ``[N, L]``."""
    n, length, _ = shown_patches.shape
    px = shown_patches.reshape(n, length, -1, 3) * STD.view(3) + MEAN.view(3)
    return (px[..., 2] - px[..., 0]).mean(dim=-1)


def _masking_removing(cells: list[int], n: int, length: int = 16, ratio: float = 0.75):
    """A masking of ``n`` images that removes grid ``cells`` (and others, to the ratio) of every image."""
    noise = torch.linspace(0, 0.5, length).repeat(n, 1)
    noise[:, cells] = 1.0
    return masking_from_noise(noise, ratio)


def _tiny(cls):
    torch.manual_seed(0)
    return cls(**cls.tiny).eval()


def test_black_and_gray_patches_are_not_uniform_in_normalised_units(gray):
    """The fact behind the cast: a uniform gray patch's norm-pix target is a channel pattern, not zeros."""
    t = norm_pix_targets(patchify(_norm(gray[:1]), P))[0].view(16, P * P, 3)
    black, mid = t[0], t[5]
    assert torch.allclose(black, black[:1].expand_as(black)) and torch.allclose(mid, mid[:1].expand_as(mid))
    x = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)  # black, normalised: (-2.43, -2.42, -2.22)
    var = 64 * (x - x.mean()).pow(2).sum() / (3 * 64 - 1)  # unbiased over the 192 values, 64 per channel
    expected = (x - x.mean()) / (var + NORM_PIX_EPS) ** 0.5
    torch.testing.assert_close(black[0], expected, atol=1e-5, rtol=0)
    assert expected[2] > 1.3 and expected[0] < -0.7  # B high, R and G low
    assert float(mid[0, 2] - mid[0, 0]) > 1.0  # the same pattern at every gray level: B above R


@pytest.mark.parametrize("display", DISPLAYS)
def test_display_of_the_norm_pix_target_is_the_image_exactly(gray, display):
    """Both displays invert the loss's normalisation exactly (unbiased variance + NORM_PIX_EPS, as the loss); a
    target normalised otherwise (biased variance, another eps) does not come back: the pin is tight."""
    target = patchify(_norm(gray.double()), P)
    shown = display_patches(norm_pix_targets(target), target, 3, True, display)
    torch.testing.assert_close(shown, target, rtol=0, atol=1e-12)
    mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
    biased = (target - mu) / (var + NORM_PIX_EPS) ** 0.5
    assert (display_patches(biased, target, 3, True, display) - target).abs().max() > 1e-3
    other_eps = norm_pix_targets(target, eps=1e-2)
    assert (display_patches(other_eps, target, 3, True, display) - target).abs().max() > 1e-4


@pytest.mark.parametrize("display", DISPLAYS)
@pytest.mark.parametrize("cls", [MAE, CAN])
def test_panels_with_the_target_as_prediction_equal_the_gray_image(gray, cls, display, one_thread):
    method = _tiny(cls)
    imgs = _norm(gray)
    masking = _masking_removing([0, 5], imgs.shape[0])
    pred = norm_pix_targets(patchify(imgs, P))
    masked, recon = reconstruction_panels(method, imgs, masking, pred, display=display)
    torch.testing.assert_close(recon, imgs, rtol=0, atol=1e-5)
    torch.testing.assert_close(_pixels(recon)[:, 0], _pixels(recon)[:, 2], rtol=0, atol=1e-5)  # still gray
    removed = torch.isnan(patchify(masked, P)).all(-1)
    assert torch.equal(removed, masking.mask.bool())


def test_gray_consistent_predictions_stay_gray_only_with_the_channel_display(gray):
    """Each patch predicted as **another** gray patch's norm-pix target (right pattern, wrong ``σ``: what a model that
    cannot see the patch gets wrong): ``"channel"`` shows gray pixels, R = G = B; ``"patch"`` shows colour, blue on
    a high-contrast patch predicted with the flat black patch's pattern (the report), yellow the other way round."""
    target = patchify(_norm(gray[:1].double()), P)  # [1, 16, 192]
    t = norm_pix_targets(target)
    contrast = patchify(gray[:1].double(), P)[0, :, 0::3].std(-1)  # pixel std of each patch
    busiest = int(contrast.argmax())
    assert contrast[busiest] > 0.1 and contrast[0] == 0
    order = torch.arange(16)
    order[busiest], order[0] = 0, busiest  # swap the black patch and the busiest one
    swapped = t[:, order]  # [1, 16, 192]: other gray patches' targets
    rolled = t.roll(1, dims=1)  # every patch predicted as its neighbour's target

    for pred in (swapped, rolled):
        shown = display_patches(pred, target, 3, True, "channel").view(1, 16, P * P, 3) * STD.view(3).double()
        px = shown + MEAN.view(3).double()
        torch.testing.assert_close(px[..., 0], px[..., 2], rtol=0, atol=1e-9)
        torch.testing.assert_close(px[..., 1], px[..., 2], rtol=0, atol=1e-9)

    cast = _cast(display_patches(swapped, target, 3, True, "patch").float())[0]
    assert cast[busiest] > 0.2  # the flat pattern times the busy patch's σ: clearly blue
    assert cast[0] < -0.03  # the busy pattern times the black patch's σ: yellow (before clamping)
    assert _cast(display_patches(swapped, target, 3, True, "channel").float()).abs().max() < 1e-5


def test_the_mse_optimal_prediction_without_context_is_blue_on_busy_and_yellow_on_flat_patches(gray):
    """The root cause, without a model: the prediction that minimises the norm-pix loss when the patch is unseen is
    the mean target over patches; its channel offsets are an average of ``offset / σ``, so ``"patch"`` (× the patch's
    own ``σ``) over-colours high-contrast patches (B above R) and under-colours flat ones (R above B), on gray
    images; the measured 400-step CAN and MAE runs show the same sign pattern. ``"channel"`` keeps each patch's
    own (gray) mean colour."""
    target = patchify(_norm(gray.double()), P)  # [32, 16, 192]
    pred = norm_pix_targets(target).mean(dim=(0, 1), keepdim=True).expand_as(target)
    contrast = patchify(gray.double(), P)[..., 0::3].std(-1)  # [32, 16] pixel std
    flat, busy = contrast < 0.02, contrast > 0.15
    assert int(flat.sum()) >= 2 and int(busy.sum()) >= 20
    cast = _cast(display_patches(pred, target, 3, True, "patch").float())
    assert float(cast[busy].mean()) > 0.05 > 0 > -0.02 > float(cast[flat].mean())
    assert _cast(display_patches(pred, target, 3, True, "channel").float()).abs().max() < 1e-5


@pytest.mark.parametrize("cls", [MAE, CAN])
def test_channel_panels_keep_each_removed_gray_patch_at_its_own_gray(gray, cls, one_thread):
    """The channel display of a model's own predictions (CAN: clean encoder input, decoder at noise level 0): every
    removed patch of a gray image keeps R = G = B on average, the uniform black and gray patches included. Under
    MAE's display (``"patch"``, the default) the same predictions are coloured: the reported blue."""
    method = _tiny(cls)
    imgs = _norm(gray)
    masking = _masking_removing([0, 5], imgs.shape[0])
    _, recon = reconstruction_panels(method, imgs, masking, display="channel")
    m = masking.mask.bool()
    assert torch.equal(m[0, [0, 5]], torch.tensor([True, True]))
    cast = _cast(patchify(recon, P))
    assert cast[m].abs().max() < 1e-5
    _, former = reconstruction_panels(method, imgs, masking)  # the default: MAE's display
    assert _cast(patchify(former, P))[m].abs().mean() > 1e-2


def test_reconstruct_defaults_to_maes_display_and_rejects_others(tmp_path):
    assert inspect.signature(reconstruct).parameters["display"].default == "patch"
    assert inspect.signature(reconstruction_panels).parameters["display"].default == "patch"
    with pytest.raises(ValueError, match="display must be one of"):
        reconstruct(tmp_path / "none.ckpt", tmp_path / "grid.png", data=None, display="rgb")
    with pytest.raises(ValueError, match="display must be one of"):
        display_patches(torch.zeros(1, 4, 12), torch.zeros(1, 4, 12), 3, True, "rgb")
