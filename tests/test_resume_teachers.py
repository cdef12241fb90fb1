"""Exact resume of methods with state beyond their weights: an EMA teacher (BYOL), I-JEPA (its target encoder and
keyed multi-block masks) and iBOT (keyed block-wise masks, class and patch centres, multi-crop). A run SIGKILLed
mid-epoch and resumed from its newest *step* checkpoint ends with the same weights and buffers as the uninterrupted
run. (This caught a real bug: the teachers' EMA step ran in the module's on_train_batch_end, after the step
checkpoint was saved by the callbacks' hook, so a resumed teacher missed one update.)"""

from __future__ import annotations

import json

import pytest
import torch
from cli_args import BATCHED_IN_MEMORY, QUIET
from kill_harness import pretrain_killed_at

from selfsup.cli import main
from selfsup.methods import BYOL, IBOT, IJEPA

CASES = {
    "BYOL": ({"class_path": "BYOL", "init_args": BYOL.tiny}, ["--data.augment", "byol_cifar"]),
    "IJEPA": ({"class_path": "IJEPA", "init_args": IJEPA.tiny}, ["--data.views", "1", "--data.augment", "ijepa_cifar"]),
    "IBOT": (
        {"class_path": "IBOT", "init_args": IBOT.tiny},
        ["--data.local_views", "2", "--data.local_augment", "dino_cifar_local", "--data.augment", "dino_cifar"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_killed_mid_epoch_then_resumed_equals_the_uninterrupted_run(name, tmp_path, cifar_slice):
    method, data = CASES[name]
    args = [
        "--method",
        json.dumps(method),
        *BATCHED_IN_MEMORY,
        *data,
        "--data.dataset",
        "folder",
        "--data.root",
        str(cifar_slice),
        "--data.subset",
        "48",
        "--data.batch_size",
        "12",
        "--optim.name",
        "adamw",
        "--optim.lr",
        "1e-3",
        "--optim.weight_decay",
        "0.04",
        "--optim.weight_decay_end",
        "0.4",
        "--trainer.max_epochs",
        "2",
        "--trainer.save_every_n_steps",
        "2",
        *QUIET,
    ]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(7, [*args, "--trainer.out_dir", str(run_b)], tmp_path)  # epoch 1, newest ckpt step 6
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run_a, run_b))
    assert a["global_step"] == b["global_step"] == 8
    if name == "IBOT":
        assert {"method.center", "method.center2"} <= set(a["state_dict"])  # both centres travel in the checkpoint
        assert a["state_dict"]["method.center"].abs().sum() > 0
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
