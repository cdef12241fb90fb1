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
