"""MAE's linear probe (`mae-linprobe`, spec-can-mae-imle 2.5) and the ViT pooling choice at probe time (`--pool`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.data import DataLoader

from selfsup.cli import main
from selfsup.data.build import build_eval_dataset
from selfsup.engine.config import DataConfig
from selfsup.engine.optim import LARS
from selfsup.eval import PROTOCOLS, extract_features, linear_probe_cached
from selfsup.eval.pool import current_pool, set_global_pool
from selfsup.models import build_backbone


def test_preset_holds_mae_main_linprobe_values():
    p = PROTOCOLS["mae-linprobe"]
    c = p.probe
    assert (p.augmented, p.train_augment, p.crop_interpolation) == (True, "crop_flip", "bicubic")
    assert (c.optimizer, c.lrs, c.weight_decays, c.momentum, c.batch_size, c.epochs, c.warmup_epochs) == (
        "lars",
        (0.1,),
        (0.0,),
        0.9,
        16384,
        90,
        10.0,
    )
    assert (c.scale_lr, c.feature_norm, c.final_lr_ratio, c.val_fraction) == ("linear", "bn", 0.0, 0.01)
    assert c.peak_lr(0.1) == pytest.approx(6.4)  # blr 0.1 x 16384 / 256
    assert dataclasses.replace(c, batch_size=2048).peak_lr(0.1) == pytest.approx(0.8)  # the CANc README's run


def test_mae_linprobe_head_is_parameter_free_bn_and_lars_skips_the_bias(cifar_slice, monkeypatch):
    """A real probe with the preset (fewer epochs, smaller batch) on ViT features of real CIFAR-10 images: the head is
    BatchNorm1d(affine=False, eps 1e-6) + Linear, LARS adapts the weight (wd 0) and excludes the bias, and the peak lr
    is 0.1 x B / 256."""
    from selfsup.eval import linear

    seen = []
    real = linear.build_optimizer

    def spy(groups, name, **kw):
        opt = real(groups, name, **kw)
        seen.append(opt)
        return opt

    monkeypatch.setattr(linear, "build_optimizer", spy)
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1)
    data = DataConfig(dataset="cifar10", root=str(cifar_slice), in_memory=True, num_workers=0)
    feats = {
        s: extract_features(vit, DataLoader(build_eval_dataset(data, s), batch_size=100)) for s in ("train", "test")
    }
    res = linear_probe_cached(
        *feats["train"], *feats["test"], 10, PROTOCOLS["mae-linprobe"].probe, epochs=3, batch_size=64, val_fraction=0.1
    )

    head = res.head
    assert isinstance(head.norm, torch.nn.BatchNorm1d) and not head.norm.affine and head.norm.eps == 1e-6
    assert list(head.norm.parameters()) == [] and [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    (opt,) = seen
    assert isinstance(opt, LARS)
    weight_group, bias_group = opt.param_groups
    assert weight_group["params"][0].shape == (10, 192) and bias_group["params"][0].shape == (10,)
    assert not LARS._excluded(weight_group, weight_group["params"][0]) and weight_group["weight_decay"] == 0.0
    assert LARS._excluded(bias_group, bias_group["params"][0]) and bias_group["weight_decay"] == 0.0
    assert weight_group["initial_lr"] == pytest.approx(0.1 * 64 / 256)
    assert res.n_val == 20 and res.epoch in (1, 2, 3) and res.val_top1 == max(res.val_curve)


def test_pool_switch_by_hand():
    """token = the class token after the final LayerNorm; avg = the mean of the patch tokens after it; no weight
    changes.
    A ViT built with avg (fc_norm after pooling) switched to token puts the raw class token through that fc_norm."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    vit = build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1).eval()
    keys = list(vit.state_dict())
    with torch.no_grad():
        tokens = vit.forward_features(x)  # [3, 1 + 16, 192], after the final norm
        assert torch.allclose(vit(x), tokens[:, 0]) and current_pool(vit) == "token"
        assert torch.allclose(set_global_pool(vit, "avg")(x), tokens[:, 1:].mean(1), atol=1e-6)
        assert current_pool(vit) == "avg" and list(vit.state_dict()) == keys
        assert torch.allclose(set_global_pool(vit, "token")(x), tokens[:, 0])
        avg_vit = build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1, global_pool="avg").eval()
        raw = avg_vit.forward_features(x)  # the final norm is the identity here
        assert torch.allclose(set_global_pool(avg_vit, "token")(x), avg_vit.fc_norm(raw[:, 0]), atol=1e-6)
    resnet = build_backbone("resnet10", cifar_stem=True, width=8)
    assert set_global_pool(resnet, "avg") is resnet and current_pool(resnet) == "avg"
    with pytest.raises(ValueError, match="pool 'token' needs a ViT with a class token; ResNetTrunk"):
        set_global_pool(resnet, "token")
    with pytest.raises(ValueError, match="no class token"):
        set_global_pool(
            build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1, class_token=False, global_pool="avg"),
            "token",
        )


def test_linear_cli_runs_mae_linprobe_with_a_pool_choice(vit_ckpt, tmp_path):
    """`selfsup linear --protocol mae-linprobe --pool avg` on a ViT checkpoint: the preset's LARS / BN head / lr, the
    augmented crop-and-flip probe, mean-token pooling; without --pool the checkpoint's own (class token)."""
    base = [
        "linear",
        "--checkpoint",
        str(vit_ckpt),
        "--protocol",
        "mae-linprobe",
        "--data.in_memory",
        "true",
        "--data.num_workers",
        "0",
        "--device",
        "cpu",
        "--probe_batch_size",
        "60",
        "--val_fraction",
        "0.1",
    ]
    out = tmp_path / "avg.json"
    assert main([*base, "--epochs", "2", "--pool", "avg", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["protocol"], r["pool"], r["augmented"], r["train_augment"], r["mode"]) == (
        "mae-linprobe",
        "avg",
        True,
        "crop_flip",
        "augmented",
    )
    c = r["config"]
    assert (c["optimizer"], c["lrs"], c["weight_decays"], c["batch_size"], c["scale_lr"], c["feature_norm"]) == (
        "lars",
        [0.1],
        [0.0],
        60,
        "linear",
        "bn",
    )
    assert len(r["val_curve"]) == 2 and r["n_val"] == 20 and r["epoch"] in (1, 2)
    out = tmp_path / "token.json"
    assert main([*base, "--epochs", "1", "--augmented", "false", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["pool"] == "token"
