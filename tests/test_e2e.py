"""End to end on real CIFAR-10: pretrain -> kill -> resume -> kNN -> linear -> export.

The killed-and-resumed run must end with exactly the weights of the uninterrupted run, which checks
that model, optimiser, scheduler, step, data order and view RNG are all restored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from cli_args import BATCHED_IN_MEMORY

from selfsup.cli import main
from selfsup.engine.checkpoint import FORMAT
from selfsup.eval.load import load_backbone

RECIPE = """
method:
  class_path: MMCR
  init_args:
    backbone: {{name: resnet10, kwargs: {{cifar_stem: true, width: 8}}}}
    projector: [32, 16]
data:
  dataset: cifar10
  root: {root}
  batch_size: 25
  views: 3
  augment: cifar10
  view_mode: batched
  in_memory: true
  num_workers: 0
optim: {{name: adam, lr: 3.0e-3, weight_decay: 1.0e-6, schedule: cosine, warmup_epochs: 0.5}}
trainer: {{max_epochs: 3, logger: none, progress_bar: false, seed: 7}}
monitor: {{every_n_epochs: 1, k: 20, temperature: 0.5}}
"""

KILLER = """
import os, signal, sys
import lightning as L
from selfsup.cli import run_pretrain

class KillAtEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:   # epochs 0 and 1 are done and checkpointed
            os.kill(os.getpid(), signal.SIGKILL)

run_pretrain(sys.argv[1:], extra_callbacks=[KillAtEpoch()])
"""


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, cifar_slice) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    p.write_text(RECIPE.format(root=cifar_slice))
    return p


def test_pretrain_kill_resume_knn_linear_export(tmp_path, recipe, capsys):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", "--config", str(recipe), "--trainer.out_dir", str(run_a)]) == 0
    last_a = run_a / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last_a, map_location="cpu", weights_only=True)  # loadable without unpickling code
    assert ckpt["global_step"] == 3 * (200 // 25)
    assert ckpt["selfsup"]["format"] == FORMAT and ckpt["selfsup"]["backbone"]["kwargs"]["cifar_stem"] is True

    # the same run, SIGKILLed at the start of its third epoch
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(recipe), "--trainer.out_dir", str(run_b)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (run_b / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["epoch0000.ckpt", "epoch0001.ckpt", "last.ckpt"]
    assert not list((run_b / "checkpoints").glob("*.tmp")), "a temporary checkpoint file was left behind"

    # restarting without --resume must refuse (nothing overwritten), with --resume it finishes the run
    before = (run_b / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["pretrain", "--config", str(recipe), "--trainer.out_dir", str(run_b)]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (run_b / "checkpoints" / "last.ckpt").read_bytes() == before
    assert main(["pretrain", "--config", str(recipe), "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0

    wa, wb = _weights(last_a), _weights(run_b / "checkpoints" / "last.ckpt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"resumed run differs at {k}")
    opt_a = torch.load(last_a, weights_only=True)["optimizer_states"][0]["state"]
    opt_b = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    torch.testing.assert_close(opt_b[0]["exp_avg"], opt_a[0]["exp_avg"], rtol=0, atol=1e-6)

    # offline kNN with the monitor's settings reproduces the monitor's last number
    capsys.readouterr()
    knn_out = tmp_path / "knn.json"
    assert (
        main(["knn", "--checkpoint", str(last_a), "--k", "20", "--data.num_workers", "0", "--output", str(knn_out)])
        == 0
    )
    knn = json.loads(knn_out.read_text())
    assert knn["bank"] == 200 and knn["test"] == 100
    history = torch.load(last_a, weights_only=True)["callbacks"]["KNNMonitor"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert abs(knn["top1"] - history[-1]["top1"]) < 1e-6 and abs(knn["top5"] - history[-1]["top5"]) < 1e-6
    assert main(["knn", "--checkpoint", str(last_a), "--output", str(knn_out)]) == 1  # never overwrites
    assert "refusing to overwrite" in capsys.readouterr().err

    # linear probe on cached features: selection on a held-out part of train, test scored at the end
    lin_out = tmp_path / "linear.json"
    assert (
        main(
            [
                "linear",
                "--checkpoint",
                str(last_a),
                "--epochs",
                "5",
                "--lrs",
                "[0.1]",
                "--weight_decays",
                "[0.0]",
                "--data.num_workers",
                "0",
                "--output",
                str(lin_out),
            ]
        )
        == 0
    )
    lin = json.loads(lin_out.read_text())
    for key in ("val_top1", "test_top1", "test_top5", "test_top1_last", "test_top5_last"):
        assert 0.0 <= lin[key] <= 100.0, key
    assert lin["test_top5"] >= lin["test_top1"]

    # export: the three files, strict reload gives the same features, no silent overwrite
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(last_a), "--out", str(exp)]) == 0
    assert sorted(p.name for p in exp.iterdir()) == ["backbone.json", "backbone.pt", "backbone.safetensors"]
    x = torch.randn(4, 3, 32, 32)
    ref, _ = load_backbone(last_a)
    for src in (exp, exp / "backbone.pt", exp / "backbone.safetensors"):
        net, cfg = load_backbone(src)
        assert cfg["kwargs"]["width"] == 8
        torch.testing.assert_close(net.eval()(x), ref.eval()(x))
    assert main(["export", "--checkpoint", str(last_a), "--out", str(exp)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_export_loads_into_unmodified_torchvision(tmp_path, cifar_slice):
    """Standard-stem ResNet-18: the exported state dict loads into torchvision.models.resnet18()."""
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--method",
        "MMCR",
        "--method.init_args.backbone.name",
        "resnet18",
        "--method.init_args.projector",
        "[64, 32]",
        "--data.dataset",
        "cifar10",
        "--data.root",
        str(cifar_slice),
        "--data.batch_size",
        "20",
        *BATCHED_IN_MEMORY,
        "--data.subset",
        "40",
        "--trainer.max_epochs",
        "1",
        "--trainer.out_dir",
        str(run),
        "--trainer.logger",
        "none",
        "--trainer.progress_bar",
        "false",
        "--monitor.every_n_epochs",
        "0",
    ]
    assert main(args) == 0
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(exp)]) == 0
    ours, _ = load_backbone(run / "checkpoints" / "last.ckpt")
    x = torch.randn(2, 3, 64, 64)
    for state in (
        torch.load(exp / "backbone.pt", weights_only=True),
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(exp / "backbone.safetensors"),
    ):
        tv = torchvision.models.resnet18()
        missing, unexpected = tv.load_state_dict(state, strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
        tv.fc = torch.nn.Identity()
        torch.testing.assert_close(tv.eval()(x), ours.eval()(x))
    info = json.loads((exp / "backbone.json").read_text())
    assert "torchvision.models.resnet18()" in info["load"]
