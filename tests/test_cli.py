"""Bad input gets a clear, early error that names the culprit; user files are never overwritten."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from cli_args import TINY_RUN, StopCommand, tiny_pretrain

from selfsup.cli import main


def test_typo_on_command_line_is_named(capsys):
    assert main(["pretrain", "--config", "recipes/cpu-small.yaml", "--optim.lrr", "0.1"]) == 1
    assert "--optim.lrr" in capsys.readouterr().err


def test_typo_in_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  class_path: MMCR\n  init_args: {projektor: [16, 8]}\n")
    assert main(["pretrain", "--config", str(bad)]) == 1
    assert "projektor" in capsys.readouterr().err


def test_unknown_backbone_is_named(tmp_path, cifar_slice, capsys):
    args = [
        "pretrain",
        *TINY_RUN,
        "--data.root",
        str(cifar_slice),
        "--method.init_args.backbone.name",
        "resnet9000",
        "--trainer.out_dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "resnet9000" in err and "resnet18" in err


def test_missing_dataset_path_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar.zip"
    args = ["pretrain", *TINY_RUN, "--data.root", str(missing), "--trainer.out_dir", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"dataset root '{missing}' does not exist" in err and "cifar-10-batches-py" not in err  # the file itself
    assert not (tmp_path / "run" / "checkpoints").exists()
    for dataset in ("folder", "stl10", "imagenet"):
        assert main([*args, "--data.dataset", dataset]) == 1
        assert str(missing) in capsys.readouterr().err.splitlines()[-1]


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
    args = [
        "pretrain",
        *TINY_RUN,
        "--data.root",
        str(cifar_slice),
        "--optim.name",
        "sgd",
        "--optim.lr",
        "1e38",
        "--trainer.max_epochs",
        "2",
        "--trainer.out_dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "step" in err


def test_resume_with_a_different_backbone_is_refused(tmp_path, cifar_slice, capsys):
    run = tmp_path / "run"
    base = [
        "pretrain",
        *TINY_RUN,
        "--data.root",
        str(cifar_slice),
        "--data.subset",
        "40",
        "--trainer.max_epochs",
        "1",
        "--trainer.out_dir",
        str(run),
    ]
    assert main(base) == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert (
        main(
            [
                *base,
                "--trainer.max_epochs",
                "2",
                "--trainer.resume",
                "true",
                "--method.init_args.backbone.kwargs",
                "{cifar_stem: true, width: 16}",
            ]
        )
        == 1
    )
    assert "differs from the configured" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["init_args"]["backbone"]["kwargs"]["width"] == 8


def test_per_image_views_from_a_zip_with_loader_workers(tmp_path, cifar_slice):
    """The per-image path: zip members decoded in 2 worker processes, V torchvision views per image."""
    run = tmp_path / "run"
    args = [
        "pretrain",
        *TINY_RUN,
        "--data.root",
        str(cifar_slice),
        "--data.view_mode",
        "per_image",
        "--data.in_memory",
        "false",
        "--data.num_workers",
        "2",
        "--data.views",
        "4",
        "--data.subset",
        "60",
        "--trainer.max_epochs",
        "1",
        "--trainer.out_dir",
        str(run),
    ]
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
    args = [
        "pretrain",
        *TINY_RUN,
        "--data.root",
        str(cifar_slice),
        "--data.augment_overrides",
        "{scal: [0.2, 1.0]}",
        "--trainer.out_dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 1
    assert "scal" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad files, devices
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, cifar_slice) -> Path:
    return tiny_pretrain(tmp_path_factory.mktemp("tiny") / "run", cifar_slice)


def _corrupt_copy(src: Path, dst: Path) -> str:
    """Copy the zip with its third train image replaced by bytes that are not an image; returns that member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        member = sorted(n for n in zin.namelist() if "/train/" in n and n.endswith(".jpg"))[2]
        for name in zin.namelist():
            zout.writestr(name, b"this is not a JPEG" if name == member else zin.read(name))
    return member


def _one_error_line(err: str, cmd: str, *names: str) -> str:
    """The one ``selfsup <cmd>: error:`` line (an uncaught exception would have escaped ``main`` instead)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("selfsup")]
    assert len(lines) == 1 and lines[0].startswith(f"selfsup {cmd}: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_corrupt_image_is_one_line_naming_the_member(tmp_path, cifar_slice, tiny_ckpt, capsys):
    """Fails before: CorruptImageError (a RuntimeError) escaped main() as a traceback."""
    bad = tmp_path / "bad.zip"
    member = _corrupt_copy(cifar_slice, bad)
    ckpt = str(tiny_ckpt)
    runs = [
        ["knn", "--checkpoint", ckpt, "--data.root", str(bad), "--data.num_workers", "0"],
        ["knn", "--checkpoint", ckpt, "--data.root", str(bad), "--data.num_workers", "2"],  # raised in a worker
        ["linear", "--checkpoint", ckpt, "--data.root", str(bad), "--data.num_workers", "0", "--epochs", "1"],
        [
            "pretrain",
            *TINY_RUN,
            "--data.root",
            str(bad),
            "--trainer.out_dir",
            str(tmp_path / "run1"),
        ],  # in-memory decode
        [
            "pretrain",
            *TINY_RUN,
            "--data.root",
            str(bad),
            "--trainer.out_dir",
            str(tmp_path / "run2"),
            "--data.in_memory",
            "false",
            "--data.view_mode",
            "per_image",
            "--data.num_workers",
            "2",
        ],  # inside Lightning, in a worker
    ]
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 1, argv
        _one_error_line(capsys.readouterr().err, argv[0], member, str(bad))


NOT_CHECKPOINTS = {
    "notes.ckpt": lambda p: p.write_text("not a checkpoint"),
    "empty.ckpt": lambda p: p.write_bytes(b""),
    "noise.pt": lambda p: p.write_bytes(bytes(range(256)) * 8),
    "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
    "partial.ckpt": lambda p: torch.save({"selfsup": {"method": "MMCR"}, "state_dict": {}}, p),  # KeyError before
    "notes.safetensors": lambda p: p.write_text("not safetensors"),
}


def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    """Every command that reads a checkpoint names a foreign file in one line (the partial selfsup checkpoint
    ended in a KeyError traceback before, for every command)."""
    for name, make in NOT_CHECKPOINTS.items():
        path = tmp_path / name
        make(path)
        for argv in (
            ["knn", "--checkpoint", str(path), "--data.dataset", "demo"],
            ["linear", "--checkpoint", str(path), "--data.dataset", "demo"],
            ["export", "--checkpoint", str(path), "--out", str(tmp_path / "exp")],
            ["pretrain", *TINY_RUN, "--trainer.out_dir", str(tmp_path / "run"), "--trainer.resume", str(path)],
        ):
            if name.endswith(".safetensors") and argv[0] == "pretrain":
                continue
            capsys.readouterr()
            assert main(argv) == 1, argv
            _one_error_line(capsys.readouterr().err, argv[0], str(path))
        assert not (tmp_path / "exp").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["knn"], ["linear", "--protocol", "fast"], ["linear", "--protocol", "min-mmcr"]])
def test_eval_moves_the_backbone_to_the_device(argv, tiny_ckpt, monkeypatch):
    """The backbone runs where its inputs go (fails before for knn/linear: the backbone stayed on the CPU while
    the inputs went to --device). ``meta`` stands in for a CUDA device; the fake stops at the first forward."""
    from selfsup import cli
    from selfsup.eval import features, linear

    seen = []

    def fake_extract(backbone, loader, device="cpu", **kwargs):
        seen.append((next(backbone.parameters()).device, torch.device(device)))
        raise StopCommand

    monkeypatch.setattr(features, "extract_features", fake_extract)
    monkeypatch.setattr(linear, "extract_features", fake_extract)
    with pytest.raises(StopCommand):
        cli.COMMANDS[argv[0]](
            [*argv[1:], "--checkpoint", str(tiny_ckpt), "--device", "meta", "--data.num_workers", "0"]
        )
    assert seen == [(torch.device("meta"), torch.device("meta"))]
    net = torch.nn.Linear(2, 2)
    assert next(cli.on_device(net, torch.device("meta")).parameters()).device == torch.device("meta")


def test_which_help_names_teachers(capsys):
    for cmd in ("knn", "linear", "export"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "teacher" in out and "momentum" in out, cmd
