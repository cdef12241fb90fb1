"""Schedules the engine owns (issue 15): weight decay on a cosine, gradient clipping (global or per parameter),
parameters frozen for the first steps (``Method.frozen``), and the pure schedule functions methods read. All pure
functions of the step, so a resumed run equals the uninterrupted one (tested with a SIGKILL)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from cli_args import BATCHED_IN_MEMORY, TINY_MMCR
from kill_harness import pretrain_killed_at

from selfsup.cli import main
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.module import clip_gradients
from selfsup.engine.pretrain import pretrain
from selfsup.methods import MMCR
from selfsup.schedules import cosine, linear_warmup


def test_cosine_and_linear_warmup_by_hand():
    # DINO's weight decay 0.04 -> 0.4 over 100 steps: 0.04 at 0, the mean at 50, 0.4 from 100 on
    assert cosine(0.04, 0.4, 0, 100) == pytest.approx(0.04)
    assert cosine(0.04, 0.4, 50, 100) == pytest.approx(0.22)
    assert cosine(0.04, 0.4, 25, 100) == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine(0.04, 0.4, 100, 100) == pytest.approx(0.4) and cosine(0.04, 0.4, 150, 100) == pytest.approx(0.4)
    # DINO's teacher temperature: linspace(0.04, 0.07, 30) then 0.07
    assert linear_warmup(0.04, 0.07, 0, 30) == pytest.approx(0.04)
    assert linear_warmup(0.04, 0.07, 29, 30) == pytest.approx(0.07)
    assert linear_warmup(0.04, 0.07, 10, 30) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert linear_warmup(0.04, 0.07, 31, 30) == 0.07 and linear_warmup(0.04, 0.07, 0, 1) == 0.04


def test_clip_gradients_global_and_per_parameter_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # norms 5 and 12, global 13
    clip_gradients([a, b], 6.5)
    torch.testing.assert_close(a.grad, torch.tensor([1.5, 2.0]))  # everything times 6.5 / 13
    torch.testing.assert_close(b.grad, torch.tensor([6.0]))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    clip_gradients([a, b], 6.0, per_param=True)  # each to norm 6 on its own: a (5) untouched, b (12) halved
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(b.grad, torch.tensor([12.0]) * 6.0 / (12.0 + 1e-6))


def test_optim_config_refuses_impossible_schedules():
    with pytest.raises(ValueError, match="optim.weight_decay_end"):
        OptimConfig(weight_decay=0.0, weight_decay_end=0.4)
    with pytest.raises(ValueError, match="optim.clip_grad must be > 0"):
        OptimConfig(clip_grad=0.0)


class FrozenHeadMMCR(MMCR):
    """MMCR whose projector's last layer is frozen for the first 2 steps (as DINO freezes its last layer)."""

    def frozen(self, step, epoch):
        return list(self.projector[-1].parameters()) if step < 2 else []


class Record(L.Callback):
    def __init__(self):
        self.weights, self.decays = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.method.projector[-1].weight.detach().clone())
        self.decays.append(trainer.optimizers[0].param_groups[0]["weight_decay"])


def test_frozen_parameters_and_the_weight_decay_schedule_in_a_real_run(tmp_path, cifar_slice):
    torch.manual_seed(0)
    method = FrozenHeadMMCR(**MMCR.tiny)
    start = method.projector[-1].weight.detach().clone()
    other = method.projector[0].weight.detach().clone()
    data = DataConfig(
        dataset="cifar10",
        root=str(cifar_slice),
        batch_size=20,
        views=2,
        view_mode="batched",
        in_memory=True,
        num_workers=0,
    )
    optim = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, weight_decay_end=0.4, exclude_1d=True, clip_grad=1.0)
    trainer = TrainerConfig(out_dir=str(tmp_path / "run"), max_steps=5, logger="none", progress_bar=False)
    record = Record()
    pretrain(
        method,
        data,
        optim,
        trainer,
        MonitorConfig(every_n_epochs=0, spectrum_every_n_steps=0),
        extra_callbacks=[record],
    )
    assert torch.equal(record.weights[0], start) and torch.equal(record.weights[1], start)  # steps 0, 1: frozen
    assert not torch.equal(record.weights[2], start)  # step 2 updates it
    assert not torch.equal(method.projector[0].weight.detach(), other)  # the rest trained from step 0
    # the decay set before step s is cosine(0.04, 0.4, s, 5): recorded after each step
    assert record.decays == pytest.approx([cosine(0.04, 0.4, s, 5) for s in range(5)])


def test_schedules_resume_exactly(tmp_path, cifar_slice):
    """AdamW with the weight-decay cosine and per-parameter clipping, killed at step 11 (newest checkpoint: step 9),
    resumed: the same weights as the uninterrupted run."""
    args = [
        *TINY_MMCR,
        "--data.dataset",
        "cifar10",
        "--data.batch_size",
        "25",
        *BATCHED_IN_MEMORY,
        "--data.root",
        str(cifar_slice),
        "--optim.name",
        "adamw",
        "--optim.lr",
        "3e-3",
        "--optim.weight_decay",
        "0.04",
        "--optim.weight_decay_end",
        "0.4",
        "--optim.clip_grad",
        "0.05",
        "--optim.clip_grad_per_param",
        "true",
        "--trainer.max_epochs",
        "2",
        "--trainer.save_every_n_steps",
        "3",
        "--trainer.logger",
        "none",
        "--trainer.progress_bar",
        "false",
        "--monitor.every_n_epochs",
        "0",
    ]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(11, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run_a, run_b))
    assert a["global_step"] == b["global_step"] == 16
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    decays = sorted({g["weight_decay"] for g in a["optimizer_states"][0]["param_groups"]})
    assert decays == pytest.approx([0.0, cosine(0.04, 0.4, 15, 16)])  # the no-decay group stays at 0
