"""load_mae_weights: official MAE layout, our .ckpt, plain state dicts, errors, untouched extra modules."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from selfsup.methods import MAE
from selfsup.methods.can import CAN
from selfsup.models.mae_weights import load_mae_weights
from selfsup.models.masked_vit import random_masking

VIT = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
DECODER = {"width": 32, "depth": 1, "heads": 2}


def _mae(seed: int, vit=VIT, cls=MAE, **kw) -> MAE:
    torch.manual_seed(seed)
    return cls(backbone=vit, decoder=DECODER, **kw).eval()


def _perturb_pos(m: MAE) -> None:
    """Make every tensor, the frozen tables included, differ from any fresh model's."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))


def _official(m: MAE, decoder: bool = True) -> dict:
    """Our MAE state dict in facebookresearch/mae's MaskedAutoencoderViT layout, written out by hand."""
    ours = {
        "embed": "decoder_embed",
        "pos_embed": "decoder_pos_embed",
        "blocks": "decoder_blocks",
        "norm": "decoder_norm",
        "pred": "decoder_pred",
        "mask_token": "mask_token",
    }
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("backbone."):
            sd[k[len("backbone.") :]] = v.clone()  # cls_token, pos_embed, patch_embed.*, blocks.*, norm.*
        elif k.startswith("decoder.") and decoder:
            head, _, rest = k[len("decoder.") :].partition(".")
            sd[ours[head] + ("." + rest if rest else "")] = v.clone()
    return sd


def _inputs():
    g = torch.Generator().manual_seed(123)
    imgs = torch.randn(4, 3, 32, 32, generator=g)
    return imgs, random_masking(4, 16, 0.75, g)


def _assert_same_outputs(a: MAE, b: MAE) -> None:
    imgs, masking = _inputs()
    with torch.no_grad():
        oa, ob = a.forward_loss(imgs, masking), b.forward_loss(imgs, masking)
    assert torch.equal(oa.loss, ob.loss)
    assert torch.equal(oa.pred, ob.pred)


def _assert_state_equal(a: nn.Module, b: nn.Module, prefix: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith(prefix):
            assert torch.equal(v, sb[k]), k


def _selfsup_ckpt(m: nn.Module) -> dict:
    return {
        "state_dict": {"method." + k: v.clone() for k, v in m.state_dict().items()},
        "epoch": 1,
        "global_step": 10,
        "selfsup": {
            "format": 2,
            "method": type(m).__name__,
            "backbone": VIT,
            "backbones": {"online": "method.backbone."},
            "num_features": 192,
        },
    }


# ------------------------------------------------------------------------------------------- (a) official
def test_official_full_checkpoint_reproduces_loss_and_predictions(tmp_path):
    src = _mae(0)
    _perturb_pos(src)  # the file's pos tables are then not sin-cos: they are still copied (shapes match)
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": _official(src), "epoch": 3}, path)
    dst = _mae(1)
    imgs, masking = _inputs()
    with torch.no_grad():
        assert not torch.equal(dst.forward_loss(imgs, masking).loss, src.forward_loss(imgs, masking).loss)
    report = load_mae_weights(dst, str(path))
    assert report["source"] == "official-mae"
    assert report["loaded"] == len(src.state_dict()) and report["skipped"] == [] and report["kept"] == []
    assert all("differs" in v for v in report["pos_embed"].values())
    _assert_same_outputs(src, dst)


def test_official_unperturbed_pos_tables_reported_equal_and_head_skipped(tmp_path):
    src = _mae(0)
    sd = _official(src)
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 192), torch.zeros(10)
    path = tmp_path / "w.pth"
    torch.save(sd, path)  # bare state dict, no "model" wrapper
    dst = _mae(1)
    report = load_mae_weights(dst, path)
    assert report["source"] == "state-dict" and sorted(report["skipped"]) == ["head.bias", "head.weight"]
    assert all("equals" in v for v in report["pos_embed"].values())
    _assert_same_outputs(src, dst)


# ----------------------------------------------------------------------------------------- (b) ours
def test_selfsup_checkpoint_reproduces_loss_and_skips_other_modules(tmp_path):
    src = _mae(0)
    _perturb_pos(src)
    src.latent = nn.Linear(4, 4)  # e.g. IMLE's latent modules in the saved run: skipped on load
    path = tmp_path / "last.ckpt"
    torch.save(_selfsup_ckpt(src), path)
    dst = _mae(1)
    report = load_mae_weights(dst, path)
    assert report["source"] == "selfsup"
    assert sorted(report["skipped"]) == ["method.latent.bias", "method.latent.weight"] and report["kept"] == []
    _assert_same_outputs(src, dst)


def test_can_checkpoint_into_mae_and_mae_into_can(tmp_path):
    can = _mae(0, cls=CAN, proj_dim=16)
    path = tmp_path / "can.ckpt"
    torch.save(_selfsup_ckpt(can), path)
    dst = _mae(1)
    report = load_mae_weights(dst, path)
    assert any(k.startswith("method.projector.") for k in report["skipped"])
    _assert_state_equal(dst, can, "")  # CAN's decoder adds its noise embedding: compare weights, not losses
    can2 = _mae(2, cls=CAN, proj_dim=16)
    before = {k: v.clone() for k, v in can2.state_dict().items()}
    own = {k for k in before if k.startswith(("projector.", "noise_mlp."))}
    report = load_mae_weights(can2, path)  # CAN -> CAN: projector / noise_mlp are not ours to load
    assert set(report["kept"]) == own
    # ...and from an official MAE file, CAN's own modules stay as initialised and are reported as kept
    off = tmp_path / "off.pth"
    torch.save({"model": _official(_mae(3))}, off)
    assert set(load_mae_weights(can2, off)["kept"]) == own
    for k in own:
        assert torch.equal(can2.state_dict()[k], before[k])


def test_safetensors_state_dict_in_our_layout(tmp_path):
    from safetensors.torch import save_file

    src = _mae(0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _mae(1)
    assert load_mae_weights(dst, path)["source"] == "state-dict"
    _assert_same_outputs(src, dst)


# ----------------------------------------------------------------------------------------- (c) errors
def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mae_weights(_mae(0), "/nonexistent/nope.pth")


def test_shape_mismatch_names_key_shapes_and_file(tmp_path):
    wide = _mae(0, vit={"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 96}})
    path = tmp_path / "wide.pth"
    torch.save({"model": _official(wide)}, path)
    dst = _mae(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatch in '.*wide\.pth'.*\[1, 1, 96\].*\[1, 1, 192\]"):
        load_mae_weights(dst, path)
    for k, v in dst.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k


def test_encoder_only_release_needs_strict_decoder_false(tmp_path):
    src = _mae(0)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": _official(src, decoder=False)}, path)
    dst = _mae(1)
    with pytest.raises(ValueError, match="no MAE decoder.*full checkpoint with decoder"):
        load_mae_weights(dst, path)
    dec_before = {k: v.clone() for k, v in dst.decoder.state_dict().items()}
    report = load_mae_weights(dst, path, strict_decoder=False)
    assert set(report["kept"]) == {"decoder." + k for k in dec_before}
    assert report["pos_embed"]["decoder.pos_embed"].startswith("not in the file")
    _assert_state_equal(src, dst, "backbone.")
    for k, v in dst.decoder.state_dict().items():
        assert torch.equal(v, dec_before[k]), k


def test_missing_encoder_key_and_deeper_file_are_errors(tmp_path):
    src = _mae(0)
    sd = _official(src)
    del sd["blocks.1.attn.qkv.weight"]
    torch.save({"model": sd}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"lacks encoder weights \['backbone.blocks.1.attn.qkv.weight'\]"):
        load_mae_weights(_mae(1), tmp_path / "a.pth")
    deep = _mae(0, vit={"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 3}})
    torch.save({"model": _official(deep)}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"no place for.*blocks\.2\."):
        load_mae_weights(_mae(1), tmp_path / "b.pth")


def test_pickled_objects_are_refused_with_instructions(tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"model": _official(_mae(0)), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="pickled Python objects.*weights_only=False"):
        load_mae_weights(_mae(1), path)


def test_other_resolution_keeps_our_pos_tables(tmp_path):
    src = _mae(0, vit={"name": "vit_tiny", "kwargs": {"img_size": 64, "patch_size": 8, "depth": 2}})
    torch.save({"model": _official(src)}, tmp_path / "w.pth")
    dst = _mae(1)
    pos = {k: v.clone() for k, v in dst.state_dict().items() if k.endswith("pos_embed")}
    report = load_mae_weights(dst, tmp_path / "w.pth")
    assert all(v.startswith("kept our") for v in report["pos_embed"].values())
    assert set(report["kept"]) == set(pos)
    _assert_state_equal(src, dst, "backbone.blocks.")


# ------------------------------------------------------------------------------------- (d) extra modules
def test_extra_modules_are_untouched_and_reported_kept(tmp_path):
    src = _mae(0)
    path = tmp_path / "w.pth"
    torch.save({"model": _official(src)}, path)
    dst = _mae(1)
    dst.latent = nn.Linear(8, 8)
    latent = {k: v.clone() for k, v in dst.latent.state_dict().items()}
    report = load_mae_weights(dst, path)
    assert sorted(report["kept"]) == ["latent.bias", "latent.weight"]
    for k, v in dst.latent.state_dict().items():
        assert torch.equal(v, latent[k])
    _assert_same_outputs(src, dst)
