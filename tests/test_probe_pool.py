"""DINO's probe features (``--pool last4`` / ``token+avg``, :class:`selfsup.eval.pool.MultiBlockPool`) computed by
hand from the ViT's blocks, the DINO kNN protocol (k 20, T 0.07) and the joint-embedding linear protocols through
the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from selfsup.cli import main
from selfsup.eval import PROTOCOLS
from selfsup.eval.knn import KNN_PROTOCOLS
from selfsup.eval.pool import MultiBlockPool, probe_pool, probe_pool_name
from selfsup.models import build_backbone


def _tokens_by_hand(vit, x) -> list[torch.Tensor]:
    """Every block's output tokens through the final LayerNorm, the long way round."""
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(vit.norm(t))
    return outs  # [N, 1 + L, D] each


def test_last4_and_token_avg_features_by_hand():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    keys = list(vit.state_dict())
    with torch.no_grad():
        outs = _tokens_by_hand(vit, x)
        last4 = probe_pool(vit, "last4")
        expected = torch.cat([o[:, 0] for o in outs[-4:]], dim=1)  # blocks 2..5, in order
        assert isinstance(last4, MultiBlockPool) and probe_pool_name(last4) == "last4"
        assert last4(x).shape == (3, 4 * 32) and torch.allclose(last4(x), expected, atol=1e-5)
        both = probe_pool(vit, "token+avg")
        expected = torch.cat([outs[-1][:, 0], outs[-1][:, 1:].mean(1)], dim=1)
        assert both(x).shape == (3, 64) and torch.allclose(both(x), expected, atol=1e-5)
        assert torch.allclose(outs[-1][:, 0], vit(x), atol=1e-5)  # the last block's class token is the token pool
    assert list(vit.state_dict()) == keys and probe_pool(vit, None) is vit and probe_pool_name(vit) == "token"
    with pytest.raises(ValueError, match="need a ViT with a class token; got ResNetTrunk"):
        probe_pool(build_backbone("resnet10", cifar_stem=True, width=8), "last4")
    with pytest.raises(ValueError, match="n_last_blocks must be in"):
        MultiBlockPool(build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1), 4, False)
    with pytest.raises(ValueError, match="pool must be one of token, avg, last4, token\\+avg"):
        probe_pool(vit, "mean")


def test_dino_protocols_hold_the_official_values():
    assert KNN_PROTOCOLS["dino"] == {"k": 20, "temperature": 0.07}
    vits, vitb = PROTOCOLS["dino-linear-vits"], PROTOCOLS["dino-linear-vitb"]
    assert (vits.pool, vitb.pool, PROTOCOLS["dino-linear"].pool) == ("last4", "token+avg", None)
    for p in (vits, vitb, PROTOCOLS["dino-linear"]):
        c = p.probe
        assert (c.epochs, c.lrs, c.weight_decays, c.batch_size, c.scale_lr) == (100, (0.001,), (0.0,), 1024, "linear")
        assert (c.optimizer, c.feature_norm, p.augmented, p.train_augment) == ("sgd", "none", True, "crop_flip")
    simsiam = PROTOCOLS["simsiam-linear"].probe
    assert (simsiam.optimizer, simsiam.lrs, simsiam.batch_size, simsiam.epochs) == ("lars", (0.1,), 4096, 90)
    moco_vit = PROTOCOLS["mocov3-vit-linear"]
    assert (moco_vit.probe.lrs, moco_vit.probe.epochs, moco_vit.pool) == ((3.0,), 90, "token")
    assert PROTOCOLS["barlow-imagenet"].probe.lrs == (0.3,) and PROTOCOLS["vicreg-imagenet"].probe.lrs == (0.02,)


def test_knn_dino_protocol_and_linear_last4_through_the_cli(vit_ckpt, tmp_path):
    common = ["--checkpoint", str(vit_ckpt), "--data.in_memory", "true", "--data.num_workers", "0", "--device", "cpu"]
    out = tmp_path / "knn.json"
    assert main(["knn", *common, "--protocol", "dino", "--pool", "token+avg", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["protocol"], r["k"], r["temperature"], r["pool"]) == ("dino", 20, 0.07, "token+avg")
    out = tmp_path / "knn5.json"
    assert main(["knn", *common, "--protocol", "dino", "--k", "5", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["k"], r["temperature"], r["pool"]) == (5, 0.07, "token")  # an explicit --k overrides the protocol's
    out = tmp_path / "linear.json"
    probe = ["--epochs", "1", "--probe_batch_size", "60", "--val_fraction", "0.1", "--augmented", "false"]
    assert main(["linear", *common, "--protocol", "dino-linear-vitb", *probe, "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["protocol"], r["pool"], r["config"]["optimizer"]) == ("dino-linear-vitb", "token+avg", "sgd")
