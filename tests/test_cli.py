"""Bad input gets a clear, early error that names the culprit; user files are never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfsup.cli import main

TINY = [
    "--method", "MMCR", "--method.init_args.backbone.name", "resnet10", "--method.init_args.backbone.cifar_stem", "true",
    "--method.init_args.backbone.width", "8", "--method.init_args.projector", "[16, 8]",
    "--data.dataset", "cifar10", "--data.batch_size", "20", "--data.views", "2", "--data.view_mode", "batched",
    "--data.in_memory", "true", "--data.num_workers", "0", "--trainer.logger", "none",
    "--trainer.progress_bar", "false", "--monitor.every_n_epochs", "0",
]


def test_typo_on_command_line_is_named(capsys):
    assert main(["pretrain", "--config", "recipes/cpu-small.yaml", "--optim.lrr", "0.1"]) == 1
    assert "--optim.lrr" in capsys.readouterr().err


def test_typo_in_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  class_path: MMCR\n  init_args: {projektor: [16, 8]}\n")
    assert main(["pretrain", "--config", str(bad)]) == 1
    assert "projektor" in capsys.readouterr().err


def test_unknown_backbone_is_named(tmp_path, cifar_slice, capsys):
    args = ["pretrain", *TINY, "--data.root", str(cifar_slice), "--method.init_args.backbone.name", "resnet9000",
            "--trainer.out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "resnet9000" in err and "resnet18" in err


def test_every_recipe_parses():
    from selfsup.cli import _pretrain_parser

    recipes = sorted(Path("recipes").glob("*.yaml"))
    assert len(recipes) >= 7
    for r in recipes:
        cfg = _pretrain_parser().parse_args(["--config", str(r)])
        assert cfg.method.class_path.endswith("MMCR"), r


def test_missing_dataset_path_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar.zip"
    args = ["pretrain", *TINY, "--data.root", str(missing), "--trainer.out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_checkpoints_are_named(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert main(["knn", "--checkpoint", str(text), "--data.dataset", "demo"]) == 1
    assert str(text) in capsys.readouterr().err

    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    assert main(["export", "--checkpoint", str(foreign), "--out", str(tmp_path / "exp")]) == 1
    err = capsys.readouterr().err
    assert str(foreign) in err and "neither a selfsup training checkpoint" in err
    assert not (tmp_path / "exp").exists()

    assert main(["linear", "--checkpoint", str(tmp_path / "absent.ckpt")]) == 1
    assert "absent.ckpt" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_error(tmp_path, cifar_slice, capsys):
    args = ["pretrain", *TINY, "--data.root", str(cifar_slice), "--optim.name", "sgd", "--optim.lr", "1e38",
            "--trainer.max_epochs", "2", "--trainer.out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "step" in err


def test_resume_with_a_different_backbone_is_refused(tmp_path, cifar_slice, capsys):
    run = tmp_path / "run"
    base = ["pretrain", *TINY, "--data.root", str(cifar_slice), "--data.subset", "40", "--trainer.max_epochs", "1",
            "--trainer.out_dir", str(run)]
    assert main(base) == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main([*base, "--trainer.max_epochs", "2", "--trainer.resume", "true",
                 "--method.init_args.backbone.width", "16"]) == 1
    assert "differs from the configured" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["init_args"]["backbone"]["width"] == 8


def test_per_image_views_from_a_zip_with_loader_workers(tmp_path, cifar_slice):
    """The per-image path: zip members decoded in 2 worker processes, V torchvision views per image."""
    run = tmp_path / "run"
    args = ["pretrain", *TINY, "--data.root", str(cifar_slice), "--data.view_mode", "per_image",
            "--data.in_memory", "false", "--data.num_workers", "2", "--data.views", "4", "--data.subset", "60",
            "--trainer.max_epochs", "1", "--trainer.out_dir", str(run)]
    assert main(args) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 60 // 20
    assert ckpt["selfsup"]["views"] == 4


def test_precision_auto_resolves_to_a_lightning_precision():
    from selfsup.engine.pretrain import resolve_precision

    assert resolve_precision("16-mixed") == "16-mixed"
    assert resolve_precision("auto", "cpu") in ("bf16-mixed", "32-true")


def test_augment_overrides_apply_and_typos_are_named(tmp_path, cifar_slice, capsys):
    from selfsup.data.build import train_pipelines
    from selfsup.engine.config import DataConfig

    pipes = train_pipelines(DataConfig(augment="imagenet", augment_overrides={"scale": [0.2, 1.0]}))
    assert [p.scale for p in pipes] == [(0.2, 1.0), (0.2, 1.0)]  # both pipelines of the asymmetric pair
    assert [p.blur_p for p in pipes] == [1.0, 0.1]  # the rest of the preset is untouched
    args = ["pretrain", *TINY, "--data.root", str(cifar_slice), "--data.augment_overrides", "{scal: [0.2, 1.0]}",
            "--trainer.out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    assert "scal" in capsys.readouterr().err
