"""CAN: noise draws, the noise target on visible patches, the clean reconstruction target on masked ones, the
noise-level conditioning of the decoder, InfoNCE on pooled encoder tokens, the loss weights, and an exact resume
of a run that draws masks and noise, on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch
from kill_harness import pretrain_killed_at
from PIL import Image

from selfsup.cli import main
from selfsup.losses import info_nce_loss, mae_loss
from selfsup.methods import CAN, Batch
from selfsup.methods.can import NoiseConfig, noise_level_embedding

VIT = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
DECODER = {"width": 32, "depth": 1, "heads": 2}
B, P, L = 4, 8, 16


def _can(**kw) -> CAN:
    torch.manual_seed(0)
    kw.setdefault("noise", NoiseConfig(sigma_max=0.5))  # large levels: noisy and clean targets differ visibly
    return CAN(backbone=VIT, decoder=DECODER, proj_dim=16, **kw)


def _views(path) -> torch.Tensor:
    """Two different real CIFAR-10 images per slot stand in for two views: ``[B, 2, 3, 32, 32]``."""
    from selfsup.data.build import build_eval_dataset
    from selfsup.engine.config import DataConfig

    ds = build_eval_dataset(DataConfig(dataset="folder", root=str(path), augment="can_cifar"), "test")
    return torch.stack([torch.stack([ds[10 * i][0], ds[10 * i + 1][0]]) for i in range(B)])


def _batch(views, seed=0):
    return Batch(
        views=views,
        labels=torch.full((B,), -1),
        indices=torch.arange(B),
        step=0,
        max_steps=10,
        epoch=0,
        generator=torch.Generator().manual_seed(seed),
    )


def _patch_means(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, 32, 32] -> [N, L]``: mean of x² over each 8x8 patch's pixels and channels (by explicit slicing)."""
    out = torch.zeros(x.shape[0], L)
    for i in range(4):
        for j in range(4):
            out[:, 4 * i + j] = x[:, :, P * i : P * (i + 1), P * j : P * (j + 1)].pow(2).mean(dim=(1, 2, 3))
    return out


def test_noise_level_embedding_hand_values():
    e = noise_level_embedding(torch.tensor([0.0, 0.05, 2.0]))
    assert e.shape == (3, 128)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(64), torch.ones(64)]))
    f = torch.tensor([math.exp(-k * math.log(10000) / 63) for k in range(64)])
    assert f[0].item() == 1.0 and f[63].item() == pytest.approx(1e-4)
    torch.testing.assert_close(e[2], torch.cat([torch.sin(2.0 * f), torch.cos(2.0 * f)]))
    assert (e[1] - e[0]).abs().max() < 0.06  # σ ≤ 0.05: nearly constant (spec §1.3), hence embed_scale


def test_draw_levels_masks_and_noise_from_the_generator():
    m = _can(noise=NoiseConfig(sigma_max=0.1))
    d = m.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(1))
    assert d.sigma.shape == (8,) and (d.sigma >= 0).all() and (d.sigma < 0.1).all() and len(set(d.sigma.tolist())) == 8
    assert d.eps.shape == (8, 3, 32, 32) and abs(d.eps.std().item() - 1) < 0.05
    assert (d.masking.mask.sum(1) == L - int(L * 0.5)).all()  # the paper's 0.5 by default
    again = m.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(1))
    assert torch.equal(d.eps, again.eps) and torch.equal(d.sigma, again.sigma)
    assert torch.equal(d.masking.mask, again.masking.mask)


def test_noise_target_on_visible_and_clean_target_on_masked_patches(cifar_slice):
    """With the prediction layer zeroed (ŷ = 0), each term is a hand-computable mean of squares:
    L_rec = masked-patch mean of x² of the CLEAN view, L_noise = visible-patch mean of (σ ε)²; the encoder sees
    x + σ ε, the decoder gets the encoder tokens plus MLP(e(σ))."""
    m = _can(norm_pix_loss=False)
    torch.nn.init.zeros_(m.decoder.pred.weight)
    torch.nn.init.zeros_(m.decoder.pred.bias)
    views = _views(cifar_slice)
    seen = {}
    m.backbone.patch_embed.register_forward_pre_hook(lambda mod, args: seen.__setitem__("enc", args[0].clone()))
    m.decoder.embed.register_forward_pre_hook(lambda mod, args: seen.__setitem__("dec", args[0].clone()))
    m.backbone.norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("tokens", out.clone()))
    out = m.training_loss(_batch(views, seed=7))
    d = m.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(7))  # the same draws, same order
    x = views.flatten(0, 1)
    noise = d.sigma.view(-1, 1, 1, 1) * d.eps
    torch.testing.assert_close(seen["enc"], x + noise)  # noise on the encoder input
    torch.testing.assert_close(x, views.flatten(0, 1))  # and the views themselves untouched (no in-place add)

    masked, visible = d.masking.mask, 1 - d.masking.mask
    clean = (_patch_means(x) * masked).sum() / masked.sum()
    noisy = (_patch_means(x + noise) * masked).sum() / masked.sum()
    assert out["loss_rec"].item() == pytest.approx(clean.item(), rel=1e-5)
    assert abs(noisy.item() - clean.item()) > 0.01  # the public code's noisy target would differ
    expected_noise = (_patch_means(noise) * visible).sum() / visible.sum()
    assert out["loss_noise"].item() == pytest.approx(expected_noise.item(), rel=1e-5)

    cond = m.noise_mlp(noise_level_embedding(d.sigma))  # [2B, D]
    torch.testing.assert_close(seen["dec"], seen["tokens"] + cond[:, None, :], rtol=1e-5, atol=1e-6)

    unit = _can(norm_pix_loss=False, noise=NoiseConfig(sigma_max=0.5, target="unit"))
    torch.nn.init.zeros_(unit.decoder.pred.weight)
    torch.nn.init.zeros_(unit.decoder.pred.bias)
    got = unit.training_loss(_batch(views, seed=7))["loss_noise"].item()
    assert got == pytest.approx(((_patch_means(d.eps) * visible).sum() / visible.sum()).item(), rel=1e-5)


def test_total_loss_weights_and_infonce_on_pooled_kept_tokens(cifar_slice):
    views = _views(cifar_slice)
    for pool_cls in (False, True):
        m = _can(pool_cls=pool_cls)
        seen = {}
        m.backbone.norm.register_forward_hook(lambda mod, args, out, seen=seen: seen.__setitem__("tokens", out))
        out = m.training_loss(_batch(views, seed=3))
        tokens = seen["tokens"]  # [2B, 1 + K, D], cls first
        pooled = tokens.mean(1) if pool_cls else tokens[:, 1:].mean(1)
        z = m.projector(pooled).view(B, 2, -1)
        torch.testing.assert_close(out["loss_nce"], info_nce_loss(z[:, 0], z[:, 1], temperature=0.1).detach())
        total = 0.97 * (0.7 * out["loss_rec"] + 0.3 * out["loss_noise"]) + 0.03 * out["loss_nce"]
        torch.testing.assert_close(out["loss"].detach(), total)
        assert out["embeddings"]["backbone"].shape == (B, 2, 32) and out["embeddings"]["projector"].shape == (B, 2, 16)
        torch.testing.assert_close(out["embeddings"]["backbone"], tokens[:, 0].detach().view(B, 2, -1))  # cls pooling
    assert not torch.allclose(pooled, tokens[:, 1:].mean(1))  # the two pools differ
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert m.backbone.pos_embed.grad is None and m.decoder.pos_embed.grad is None


def test_norm_pix_reconstruction_term_is_mae_loss_of_the_clean_views(cifar_slice):
    m = _can()
    views = _views(cifar_slice)
    out = m.forward_losses(views, d := m.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(2)))
    x = views.flatten(0, 1)
    latent = m.forward_encoder(x + d.sigma.view(-1, 1, 1, 1) * d.eps, d.masking.keep)
    pred = m.forward_decoder(latent, d.masking.restore, d.sigma)
    torch.testing.assert_close(out["loss_rec"], mae_loss(x, pred, d.masking.mask, P, norm_pix_loss=True).detach())


def test_can_rejects_bad_input_by_name():
    m = _can()
    with pytest.raises(ValueError, match="exactly 2 views"):
        m.training_loss(
            Batch(
                views=torch.zeros(2, 3, 3, 32, 32),
                labels=torch.zeros(2),
                indices=torch.arange(2),
                step=0,
                max_steps=1,
                epoch=0,
                generator=torch.Generator(),
            )
        )
    with pytest.raises(ValueError, match="noise.target"):
        NoiseConfig(target="eps")
    with pytest.raises(ValueError, match="weight_noise"):
        CAN(backbone=VIT, decoder=DECODER, weight_noise=1.5)


# ---------------------------------------------------------------------------------------------------- resume
TINY_CAN = [
    "--config",
    "recipes/can-cpu-small.yaml",
    "--data.dataset",
    "folder",
    "--method.init_args.backbone",
    "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}",
    "--method.init_args.decoder",
    "{width: 32, depth: 1, heads: 2}",
    "--method.init_args.noise",
    "{sigma_max: 0.1}",
    "--data.batch_size",
    "25",
    "--data.subset",
    "100",
    "--trainer.max_epochs",
    "2",
    "--trainer.max_steps",
    "-1",
    "--optim.lr",
    "3e-3",
    "--trainer.save_every_n_steps",
    "3",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
    "--trainer.seed",
    "3",
    "--monitor.every_n_epochs",
    "0",
    "--trainer.precision",
    "32-true",
]


def test_kill_then_resume_equals_the_uninterrupted_run_with_masks_and_noise(tmp_path, cifar_slice):
    """100 images / 25 = 4 steps per epoch, 2 epochs, step checkpoints every 3 steps, SIGKILL at step 7: the resumed
    run restarts from step 6 (mid-epoch 1) and must draw the same masks, noise levels and noise as the original."""
    args = [*TINY_CAN, "--data.root", str(cifar_slice)]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(7, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    load = lambda p: torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert load(run_b)["global_step"] == 6
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = load(run_a), load(run_b)
    assert a["global_step"] == b["global_step"] == 8 and a["selfsup"]["method"] == "CAN"
    for k in a["state_dict"]:
        torch.testing.assert_close(
            b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=f"resumed run differs at {k}"
        )
    # the reconstruction grid of a CAN checkpoint (its decoder conditioned on noise level 0)
    png = tmp_path / "can.png"
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                str(run_a / "checkpoints" / "last.ckpt"),
                "--output",
                str(png),
                "--num_images",
                "3",
                "--data.num_workers",
                "0",
            ]
        )
        == 0
    )
    with Image.open(png) as im:
        assert im.size == (3 * 34 + 2, 3 * 34 + 2)
