"""Checkpoints of every format load: the format-1 fixtures in tests/fixtures/ were written by the first MMCR
release (scripts/make_v1_checkpoint.py checks that commit out and trains there), never edited by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from selfsup.engine.checkpoint import FORMAT, upgrade_checkpoint
from selfsup.eval.load import checkpoint_meta, export_backbone, load_backbone, read_backbone_state

FIXTURES = Path(__file__).parent / "fixtures"
V1, V1_MOMENTUM = FIXTURES / "v1_mmcr.ckpt", FIXTURES / "v1_mmcr_momentum.ckpt"
SPEC = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 4, "zero_init_residual": False}}


def _raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_fixtures_really_are_format_1():
    raw = _raw(V1_MOMENTUM)
    assert "format" not in raw["selfsup"] or raw["selfsup"]["format"] == 1
    assert "backbone_config" in raw["selfsup"] and any(
        k.startswith("method.momentum.copies.0.") for k in raw["state_dict"]
    )


def test_format_1_upgrades_in_place():
    ck = upgrade_checkpoint(_raw(V1_MOMENTUM))
    meta = ck["selfsup"]
    assert meta["format"] == FORMAT and meta["backbone"] == SPEC and meta["num_features"] == 32
    assert meta["backbones"] == {"online": "method.backbone.", "teacher": "method.teacher.backbone."}
    assert not any(k.startswith("method.momentum.") for k in ck["state_dict"])
    assert any(k.startswith("method.teacher.projector.") for k in ck["state_dict"])
    assert checkpoint_meta(V1)["backbones"] == {"online": "method.backbone."}
    with pytest.raises(ValueError, match="newer than this selfsup"):
        upgrade_checkpoint({"selfsup": {"format": FORMAT + 1}})


def test_format_1_backbones_load_export_and_give_the_trained_features(tmp_path):
    raw = _raw(V1_MOMENTUM)["state_dict"]
    x = torch.randn(2, 3, 32, 32)
    for which, prefix in (
        ("online", "method.backbone."),
        ("teacher", "method.momentum.copies.0."),
        ("momentum", "method.momentum.copies.0."),
    ):
        net, spec = load_backbone(V1_MOMENTUM, which)
        assert spec == SPEC
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, raw[prefix + k])
    with pytest.raises(ValueError, match="no 'teacher' backbone; it holds: online"):
        read_backbone_state(V1, "teacher")
    paths = export_backbone(V1_MOMENTUM, tmp_path / "exp", which="teacher")
    net, _ = load_backbone(paths["backbone.safetensors"])
    ref, _ = load_backbone(V1_MOMENTUM, "teacher")
    torch.testing.assert_close(net.eval()(x), ref.eval()(x))


def test_a_format_1_run_resumes_with_todays_engine(tmp_path):
    from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
    from selfsup.engine.pretrain import pretrain
    from selfsup.methods import MMCR

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(V1_MOMENTUM, run / "checkpoints" / "last.ckpt")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    # the fixture's own configuration (scripts/make_v1_checkpoint.py): Adam, everything decayed, 2 steps / epoch
    method = MMCR(backbone=SPEC, projector=[16, 8], momentum_tau=0.9)
    data = DataConfig(dataset="cifar10", batch_size=8, views=2, view_mode="batched", num_workers=0)
    pretrain(
        method,
        data,
        OptimConfig(name="adam", lr=1e-3, exclude_1d=False),
        TrainerConfig(out_dir=str(run), max_epochs=2, logger="none", progress_bar=False, resume=True),
        MonitorConfig(every_n_epochs=0),
        train_dataset=TensorDataset(images, torch.arange(16) % 4),
    )
    after = _raw(run / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4 and after["selfsup"]["format"] == FORMAT
    before = upgrade_checkpoint(_raw(V1_MOMENTUM))["state_dict"]
    moved = [k for k in before if not torch.equal(before[k], after["state_dict"][k])]
    assert any(k.startswith("method.teacher.backbone.") for k in moved)  # the teacher kept its EMA steps


def test_format_2_imle_keeps_the_gain_it_was_trained_with(tmp_path, cifar_slice, capsys):
    """Format 2 predates the seed's sqrt(2) equalised-lr gain: an IMLE checkpoint of that format is rebuilt with gain
    1.0 (selfsup reconstruct) and a resume under the new default is refused by name; with the old gain it resumes."""
    import json
    import math

    from selfsup.cli import main
    from selfsup.methods import IMLE
    from selfsup.reconstruct import load_method

    run = tmp_path / "run"
    args = ["pretrain", "--config", "imle-cpu-small", "--data.dataset", "folder", "--data.root", str(cifar_slice)]
    args += [f"--method.init_args.{k}={json.dumps(v)}" for k, v in IMLE.tiny.items()]
    args += ["--data.batch_size", "16", "--trainer.logger", "none", "--trainer.progress_bar", "false"]
    args += ["--monitor.every_n_epochs", "0", "--monitor.recon_every_n_epochs", "0", "--trainer.out_dir", str(run)]
    assert main([*args, "--trainer.max_steps", "2"]) == 0
    last = run / "checkpoints" / "last.ckpt"
    raw = _raw(last)
    assert raw["selfsup"]["format"] == FORMAT == 3 and raw["selfsup"]["signature"] == {"mapping_gain": math.sqrt(2)}
    # What selfsup wrote before format 3: no signature, no gain in the config.
    raw["selfsup"]["format"] = 2
    del raw["selfsup"]["signature"]
    del raw["selfsup"]["config"]["method"]["init_args"]["latent"]["mapping"]["gain"]
    torch.save(raw, last)
    assert checkpoint_meta(last)["signature"] == {"mapping_gain": 1.0}
    method, _ = load_method(last)
    gains = {
        layer.scale * math.sqrt(layer.in_features) / layer.lr_mul
        for layer in method.modules()
        if hasattr(layer, "lr_mul")
    }
    assert gains and all(g == pytest.approx(1.0) for g in gains)
    capsys.readouterr()
    assert main([*args, "--trainer.max_steps", "4", "--trainer.resume", "true"]) == 1
    err = capsys.readouterr().err
    assert "mapping_gain = 1.0" in err and "latent.mapping.gain" in err
    resumed = [*args, "--trainer.max_steps", "4", "--trainer.resume", "true"]
    assert main([*resumed, "--method.init_args.latent.mapping.gain", "1.0"]) == 0
    assert _raw(last)["global_step"] == 4
