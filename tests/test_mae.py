"""MAE: patches, masking, sin-cos tables, mae_loss on hand-derived cases, the kept-token encoder pass, the method,
export into a plain timm ViT and the reconstruction grid, on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.engine.optim import method_param_groups
from selfsup.losses import mae_loss
from selfsup.losses.mae import masked_patch_mse
from selfsup.methods import MAE, Batch
from selfsup.models.masked_vit import (
    forward_kept,
    masking_from_noise,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)

VIT = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
VIT_CLI = "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}"
DECODER = {"width": 32, "depth": 1, "heads": 2}


def _mae(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(backbone=VIT, decoder=DECODER, **kw)


def _real_images(path, n=8) -> torch.Tensor:
    """``n`` real CIFAR-10 test images, CIFAR-normalised, ``[n, 3, 32, 32]``."""
    from selfsup.data.build import build_eval_dataset
    from selfsup.engine.config import DataConfig

    ds = build_eval_dataset(DataConfig(dataset="folder", root=str(path), augment="mae_cifar"), "test")
    return torch.stack([ds[i * 10][0] for i in range(n)])  # one per class


def _batch(views, seed=0):
    b = views.shape[0]
    return Batch(
        views=views,
        labels=torch.full((b,), -1),
        indices=torch.arange(b),
        step=0,
        max_steps=10,
        epoch=0,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------- patches
def test_patchify_order_is_row_column_then_pixel_row_pixel_column_channel():
    c, h, p = 3, 4, 2
    imgs = torch.zeros(1, c, h, h)
    for ch in range(c):
        for y in range(h):
            for x in range(h):
                imgs[0, ch, y, x] = 100 * ch + 10 * y + x  # the value names its (channel, row, column)
    patches = patchify(imgs, p)
    assert patches.shape == (1, 4, p * p * c)
    # patch 1 = grid row 0, column 1 (pixels rows 0-1, columns 2-3); inside: (a, b, channel), channel fastest
    expected = [100 * ch + 10 * a + (2 + b) for a in range(p) for b in range(p) for ch in range(c)]
    assert patches[0, 1].tolist() == expected
    # patch 2 = grid row 1, column 0
    assert patches[0, 2, :3].tolist() == [20.0, 120.0, 220.0]  # pixel (2, 0), channels 0, 1, 2


def test_patchify_unpatchify_round_trip(cifar_slice):
    imgs = _real_images(cifar_slice, 4)
    for p in (1, 2, 4, 8, 16, 32):
        x = patchify(imgs, p)
        assert x.shape == (4, (32 // p) ** 2, p * p * 3)
        torch.testing.assert_close(unpatchify(x, p), imgs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        patchify(imgs, 5)
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(torch.zeros(2, 12, 48), 4)


# ---------------------------------------------------------------------------------------------- masking
def test_masking_keeps_exactly_floor_count_per_sample_and_differs_between_samples():
    gen = torch.Generator().manual_seed(0)
    for length, ratio in [(64, 0.75), (196, 0.75), (196, 0.5), (10, 0.33), (49, 0.9)]:
        m = random_masking(16, length, ratio, gen)
        keep_n = int(length * (1 - ratio))  # floor
        assert m.keep.shape == (16, keep_n) and m.mask.shape == m.restore.shape == (16, length)
        assert (m.mask.sum(1) == length - keep_n).all()
        for n in range(16):  # kept patches are exactly the 0s of the mask, each once
            assert sorted(m.keep[n].tolist()) == torch.nonzero(m.mask[n] == 0).flatten().tolist()
        if math.comb(length, keep_n) > 10**6:  # (10 choose 6 = 210 masks may repeat among 16 samples)
            assert len({tuple(row.tolist()) for row in m.mask}) == 16  # every sample its own mask
    assert (random_masking(2, 196, 0.75, gen).keep.shape[1], random_masking(2, 10, 0.33, gen).keep.shape[1]) == (49, 6)


def test_masking_restore_inverts_the_shuffle_and_the_generator_fixes_it():
    m = random_masking(4, 16, 0.75, torch.Generator().manual_seed(3))
    again = random_masking(4, 16, 0.75, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(m, again))
    assert not torch.equal(m.mask, random_masking(4, 16, 0.75, torch.Generator().manual_seed(4)).mask)
    # MAE's recipe on known scores: keep the lowest, restore = argsort(argsort)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    m = masking_from_noise(noise, 0.5)
    assert m.keep.tolist() == [[1, 3]] and m.mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert m.restore.tolist() == [[3, 0, 2, 1]]  # shuffle [1, 3, 2, 0]: patch 0 sits at position 3
    with pytest.raises(ValueError, match="mask_ratio"):
        masking_from_noise(noise, 1.0)


# --------------------------------------------------------------------------------------- position tables
def test_sincos_table_hand_values():
    t = sincos_pos_embed_2d(8, 3, cls_token=True)  # E/4 = 2 frequencies: 1 and 10000^(-1/2) = 0.01
    assert t.shape == (10, 8) and torch.equal(t[0], torch.zeros(8))
    i, j = 2, 1  # grid row 2, column 1 -> row 1 + 2 * 3 + 1
    expected = [
        math.sin(j),
        math.sin(j * 0.01),
        math.cos(j),
        math.cos(j * 0.01),  # column first
        math.sin(i),
        math.sin(i * 0.01),
        math.cos(i),
        math.cos(i * 0.01),
    ]  # then row
    torch.testing.assert_close(t[1 + 3 * i + j], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2)


# --------------------------------------------------------------------------------------------- mae_loss
def _one_patch_case():
    """Two samples, a 4x4 single-channel image each, patch 2 -> 4 patches of 4 values."""
    imgs = torch.zeros(2, 1, 4, 4)
    imgs[:, 0, :2, :2] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # patch 0 = [0, 1, 2, 3]
    return imgs


def test_mae_loss_hand_values_with_and_without_norm_pix():
    imgs = _one_patch_case()
    pred = torch.zeros(2, 4, 4)
    mask = torch.zeros(2, 4)
    mask[:, 0] = 1  # only patch 0 counts
    # norm-pix: mean 1.5, UNBIASED variance 5/3; zero prediction -> mean(t̂²) = (5/4) / (5/3 + 1e-6)
    expected = (5 / 4) / (5 / 3 + 1e-6)
    assert mae_loss(imgs, pred, mask, 2, norm_pix_loss=True).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.75, rel=1e-5)  # the biased variance would give 1.0
    assert mae_loss(imgs, pred, mask, 2, norm_pix_loss=False).item() == pytest.approx(3.5)  # (0+1+4+9)/4
    # a perfect prediction of the normalised patch
    pred[:, 0] = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / (5 / 3 + 1e-6) ** 0.5
    assert mae_loss(imgs, pred, mask, 2, norm_pix_loss=True).item() == pytest.approx(0.0, abs=1e-12)


def test_mae_loss_counts_masked_patches_only_and_averages_over_the_whole_batch():
    imgs = _one_patch_case()
    pred = torch.zeros(2, 4, 4)
    pred[:, 1:] = 1000.0  # huge errors on patches that stay visible
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    assert mae_loss(imgs, pred, mask, 2, norm_pix_loss=False).item() == pytest.approx(3.5)
    # sample 0: patches 0 (error 3.5) and 1 (error 1e6, zero image); sample 1: patch 0 only
    mask = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0]])
    glob = mae_loss(imgs, pred, mask, 2, norm_pix_loss=False)
    assert glob.item() == pytest.approx((3.5 + 1e6 + 3.5) / 3)  # over the 3 masked patches, not mean of means
    per = mae_loss(imgs, pred, mask, 2, norm_pix_loss=False, reduction="none")
    torch.testing.assert_close(per, torch.tensor([(3.5 + 1e6) / 2, 3.5]))


def test_mae_loss_rejects_bad_input_by_name():
    imgs, pred = _one_patch_case(), torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="pred must be"):
        mae_loss(imgs, torch.zeros(2, 4, 3), torch.ones(2, 4), 2)
    with pytest.raises(ValueError, match="mask"):
        mae_loss(imgs, pred, torch.ones(2, 5), 2)
    with pytest.raises(ValueError, match="selects no patch"):
        mae_loss(imgs, pred, torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match="some sample"):
        mae_loss(imgs, pred, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), 2, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        masked_patch_mse(pred, pred, torch.ones(2, 4), reduction="sum")


# ------------------------------------------------------------------------------------ kept-token encoder
def test_kept_token_forward_at_ratio_zero_equals_timm_forward_features(cifar_slice):
    m = _mae().eval()
    imgs = _real_images(cifar_slice, 4)
    masking = random_masking(4, 16, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = forward_kept(m.backbone, imgs, masking.keep)  # shuffled order
        ref = m.backbone.forward_features(imgs)
        unshuffled = torch.gather(tokens[:, 1:], 1, masking.restore[..., None].expand(-1, -1, 32))
        restored = torch.cat([tokens[:, :1], unshuffled], 1)
        torch.testing.assert_close(restored, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forward_kept(m.backbone, imgs, None), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.backbone.forward_head(ref, pre_logits=True), m(imgs))  # the pooled forward


def test_kept_token_forward_equals_full_forward_with_masked_keys(cifar_slice):
    """Independent check: timm's full forward where attention may only look at cls + kept tokens gives, at the kept
    positions, what the encoder computes from the kept tokens alone."""
    m = _mae().eval()
    imgs = _real_images(cifar_slice, 4)
    masking = random_masking(4, 16, 0.75, torch.Generator().manual_seed(1))
    allowed = torch.cat([torch.ones(4, 1, dtype=torch.bool), masking.mask == 0], 1)  # [N, 1 + L] keys
    attn_mask = allowed[:, None, None, :].expand(-1, 1, 17, -1)
    with torch.no_grad():
        kept = forward_kept(m.backbone, imgs, masking.keep)  # [4, 1 + 4, D]
        full = m.backbone.forward_features(imgs, attn_mask=attn_mask)  # [4, 1 + 16, D]
    torch.testing.assert_close(kept[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        kept[:, 1:], torch.gather(full[:, 1:], 1, masking.keep[..., None].expand(-1, -1, 32)), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------ method
def test_mae_position_tables_are_fixed_sincos_and_weight_decay_skips_norms_biases_tables_tokens():
    m = _mae()
    torch.testing.assert_close(m.backbone.pos_embed[0], sincos_pos_embed_2d(32, 4))
    torch.testing.assert_close(m.decoder.pos_embed[0], sincos_pos_embed_2d(32, 4))
    assert not m.backbone.pos_embed.requires_grad and not m.decoder.pos_embed.requires_grad
    groups = method_param_groups(m, lr=1e-3, weight_decay=0.05, exclude=True)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"backbone.cls_token", "decoder.mask_token", "backbone.norm.weight", "decoder.embed.bias"} <= no_decay
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "decoder.pred.weight" in decay
    assert all(n.endswith("weight") and "norm" not in n for n in decay)
    assert "backbone.pos_embed" not in decay | no_decay and "decoder.pos_embed" not in decay | no_decay  # frozen


def test_mae_training_loss_is_mae_loss_of_its_decoder_under_the_generators_mask(cifar_slice):
    m = _mae()
    imgs = _real_images(cifar_slice, 8)
    out = m.training_loss(_batch(imgs[:, None], seed=5))
    masking = random_masking(8, 16, 0.75, torch.Generator().manual_seed(5))  # what the method drew
    pred = m.forward_decoder(m.forward_encoder(imgs, masking.keep), masking.restore)
    torch.testing.assert_close(out["loss"], mae_loss(imgs, pred, masking.mask, 8, norm_pix_loss=True))
    # the per-sample path (IMLE-SSL): equal masked counts, so its mean is the batch loss
    per = m.forward_loss(imgs, masking, reduction="none")
    assert per.loss.shape == (8,) and len(set(per.loss.tolist())) == 8
    torch.testing.assert_close(per.loss.mean(), out["loss"])
    assert out["embeddings"]["backbone"].shape == (8, 32) and not out["embeddings"]["backbone"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert m.backbone.pos_embed.grad is None


def test_mae_learns_to_reconstruct_real_images(cifar_slice):
    """A few AdamW steps on 8 real images with one fixed mask: the masked-patch loss falls well below its start."""
    m = _mae(norm_pix_loss=False)
    imgs = _real_images(cifar_slice, 8)
    masking = random_masking(8, 16, 0.75, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(40):
        loss = m.forward_loss(imgs, masking).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_mae_needs_a_vit_and_a_valid_ratio():
    with pytest.raises(ValueError, match="MAE needs a ViT backbone.*resnet10"):
        MAE(backbone={"name": "resnet10", "kwargs": {"width": 4}})
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(backbone=VIT, decoder=DECODER, mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown decoder field"):
        MAE(backbone=VIT, decoder={"widht": 32})


def test_mae_and_can_augmentation_presets():
    from selfsup.data.transforms import CIFAR10_MEAN, IMAGENET_MEAN, get_preset

    m, mc = get_preset("mae"), get_preset("mae_cifar")  # spec §4: crop (0.2, 1) bicubic + flip, nothing else
    assert (m.crop_size, m.scale, m.interpolation, m.flip_p, m.mean, m.eval_resize) == (
        224,
        (0.2, 1.0),
        "bicubic",
        0.5,
        IMAGENET_MEAN,
        256,
    )
    for a in (m, mc):
        assert a.jitter_p == a.gray_p == a.blur_p == a.solarize_p == 0.0
    assert (mc.crop_size, mc.scale, mc.mean) == (32, (0.2, 1.0), CIFAR10_MEAN)
    c, cc = get_preset("can"), get_preset("can_cifar")  # CANc: bilinear crop (0.2, 1), jitter .8, gray .2, blur .5
    assert (c.crop_size, c.scale, c.interpolation, c.jitter, c.jitter_p, c.gray_p, c.blur_p, c.solarize_p) == (
        224,
        (0.2, 1.0),
        "bilinear",
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
        0.5,
        0.0,
    )
    assert (cc.crop_size, cc.scale, cc.blur_p, cc.mean) == (32, (0.2, 1.0), 0.0, CIFAR10_MEAN)


# ------------------------------------------------------------------------------------ export, reconstruct
def test_export_loads_into_plain_timm_with_equal_features_and_reconstruct_writes_the_grid(tmp_path, cifar_slice):
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--config",
                "recipes/mae-cpu-small.yaml",
                "--data.dataset",
                "folder",
                "--data.root",
                str(cifar_slice),
                "--trainer.max_steps",
                "2",
                "--data.batch_size",
                "16",
                "--monitor.every_n_epochs",
                "0",
                "--trainer.logger",
                "none",
                "--trainer.progress_bar",
                "false",
                "--trainer.out_dir",
                str(run),
                "--method.init_args.backbone",
                VIT_CLI,
                "--method.init_args.decoder",
                "{width: 32, depth: 1, heads: 2}",
            ]
        )
        == 0
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0

    from selfsup.reconstruct import load_method

    method, _ = load_method(ckpt)
    plain = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    plain.load_state_dict(torch.load(tmp_path / "export" / "backbone.pt", weights_only=True))  # strict
    plain.eval()
    imgs = _real_images(cifar_slice, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(imgs), method(imgs), rtol=0, atol=0)
    torch.testing.assert_close(plain.pos_embed[0], sincos_pos_embed_2d(32, 4))  # the fixed table, after training

    png = tmp_path / "grid.png"
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                str(ckpt),
                "--output",
                str(png),
                "--num_images",
                "5",
                "--upscale",
                "2",
                "--data.num_workers",
                "0",
            ]
        )
        == 0
    )
    with Image.open(png) as im:  # 3 columns x 5 rows of 64 px panels, 2 px padding
        assert im.format == "PNG" and im.size == (3 * 66 + 2, 5 * 66 + 2)
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--output", str(png)]) == 1  # never overwritten
    from selfsup.cli import run_reconstruct

    other = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "channel.png"), "--data.num_workers", "0"]
    assert run_reconstruct([*other, "--display", "channel"])["display"] == "channel"  # see test_reconstruct_gray.py
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                str(tmp_path / "export" / "backbone.pt"),
                "--output",
                str(tmp_path / "other.png"),
            ]
        )
        == 1
    )  # an export has no decoder
