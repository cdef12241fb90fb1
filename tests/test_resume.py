"""Resume is exact wherever a run stops: mid-epoch step checkpoints (both view modes, loader workers),
``last.ckpt`` always holding the final step, keyed randomness for views and the method."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from cli_args import TINY_MMCR
from kill_harness import pretrain_killed_at

from selfsup.cli import main

BASE = [
    *TINY_MMCR,
    "--data.dataset",
    "cifar10",
    "--data.batch_size",
    "25",
    "--data.views",
    "2",
    "--data.augment",
    "cifar10",
    "--optim.name",
    "adam",
    "--optim.lr",
    "3e-3",
    "--optim.schedule",
    "cosine",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
    "--trainer.seed",
    "3",
    "--monitor.every_n_epochs",
    "0",
]
MODES = {
    "batched": ["--data.view_mode", "batched", "--data.in_memory", "true", "--data.num_workers", "0"],
    "per_image_workers": ["--data.view_mode", "per_image", "--data.num_workers", "2"],
}


def _losses(metrics_csv: Path) -> dict[int, float]:
    """``{step: train/loss}`` of a run's metrics.csv; a step logged twice is an error."""
    out: dict[int, float] = {}
    for row in csv.DictReader(Path(metrics_csv).read_text().splitlines()):
        if row.get("train/loss"):
            step = int(row["step"])
            assert step not in out, f"step {step} logged twice in {metrics_csv}"
            out[step] = float(row["train/loss"])
    return out


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_after_a_mid_epoch_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, cifar_slice, mode):
    """200 images / 25 = 8 steps per epoch, 2 epochs; step checkpoints every 3 steps; SIGKILL at step 11, so the
    newest checkpoint (step 9) is in the middle of epoch 1. Before the fix the resumed epoch restarted from its
    first batch (and per-image views from fresh worker RNG), so the weights differed."""
    args = [
        *BASE,
        *MODES[mode],
        "--data.root",
        str(cifar_slice),
        "--trainer.max_epochs",
        "2",
        "--trainer.save_every_n_steps",
        "3",
        "--trainer.logger",
        "csv",
        "--trainer.log_every_n_steps",
        "1",
    ]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0

    proc = pretrain_killed_at(11, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _state(run_b / "checkpoints" / "last.ckpt")["global_step"] == 9  # the newest checkpoint, mid-epoch
    assert not list((run_b / "checkpoints").glob("last-v*.ckpt"))  # one last.ckpt, kept by both checkpointers
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0

    a, b = _state(run_a / "checkpoints" / "last.ckpt"), _state(run_b / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    for k in a["state_dict"]:
        torch.testing.assert_close(
            b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=f"resumed run differs at {k}"
        )
    # the resumed run's metrics.csv continues the killed run's: every step's loss once, equal to the uninterrupted run's
    # (Lightning's CSVLogger deleted the file on resume, and with it steps 0-8)
    loss_a, loss_b = (_losses(r / "logs" / "metrics.csv") for r in (run_a, run_b))
    assert sorted(loss_b) == list(range(16)) and set(loss_a) == set(loss_b)
    for step in loss_a:
        assert loss_b[step] == pytest.approx(loss_a[step], abs=1e-5), step


def test_last_checkpoint_is_the_newest_save_of_either_checkpointer(tmp_path, cifar_slice):
    """8 steps per epoch, step saves every 3: killed as epoch 1 starts (global step 8), the newest save is the end of
    epoch 0 (step 8), after the step save at 6. last.ckpt must hold step 8 (it held 6, and the epoch save went to a
    last-v1.ckpt)."""
    args = [
        *BASE,
        *MODES["batched"],
        "--data.root",
        str(cifar_slice),
        "--trainer.max_epochs",
        "2",
        "--trainer.save_every_n_steps",
        "3",
        "--trainer.out_dir",
        str(tmp_path / "run"),
    ]
    proc = pretrain_killed_at(8, args, tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert _state(ckpts / "last.ckpt")["global_step"] == 8
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "epoch0000.ckpt",
        "last.ckpt",
        "step00000003.ckpt",
        "step00000006.ckpt",
    ]


def test_last_checkpoint_always_holds_the_final_step(tmp_path, cifar_slice):
    """Stops between periodic saves: max_steps mid-epoch, and max_epochs not a multiple of the save period."""
    common = [*BASE, *MODES["batched"], "--data.root", str(cifar_slice), "--data.subset", "100"]  # 4 steps / epoch
    run = tmp_path / "steps"
    assert (
        main(
            [
                "pretrain",
                *common,
                "--trainer.max_epochs",
                "5",
                "--trainer.max_steps",
                "6",
                "--trainer.out_dir",
                str(run),
            ]
        )
        == 0
    )
    assert _state(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    run = tmp_path / "epochs"
    assert (
        main(
            [
                "pretrain",
                *common,
                "--trainer.max_epochs",
                "3",
                "--trainer.save_every_n_epochs",
                "2",
                "--trainer.out_dir",
                str(run),
            ]
        )
        == 0
    )
    assert _state(run / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["epoch0001.ckpt", "last.ckpt"]


def test_random_streams_are_keyed_on_step_rank_micro_batch_and_purpose():
    from selfsup.engine.config import OptimConfig
    from selfsup.engine.module import STREAM_METHOD, STREAM_VIEWS, SelfSupModule
    from selfsup.methods import MMCR

    module = SelfSupModule(
        MMCR(backbone={"name": "resnet10", "kwargs": {"width": 4}}, projector=[8, 4]), OptimConfig(), seed=5
    )
    draw = lambda *a: torch.rand(4, generator=module.generator(*a, device=torch.device("cpu")))
    torch.testing.assert_close(draw(STREAM_METHOD, 7, 0), draw(STREAM_METHOD, 7, 0))  # same key, same numbers
    seen = [draw(STREAM_METHOD, 7, 0), draw(STREAM_METHOD, 7, 1), draw(STREAM_METHOD, 8, 0), draw(STREAM_VIEWS, 7, 0)]
    for i in range(len(seen)):
        for j in range(i):
            assert not torch.equal(seen[i], seen[j])  # micro-batches, steps and purposes all differ


@pytest.mark.parametrize("mode", ["batched", "per_image"])
def test_make_views_is_one_keyed_call_the_method_can_make(mode):
    from selfsup.data.batched import BatchedViews
    from selfsup.data.keyed import PerImageViews
    from selfsup.data.transforms import MultiViewTransform, get_preset
    from selfsup.engine.config import OptimConfig
    from selfsup.engine.module import SelfSupModule
    from selfsup.methods import MMCR

    maker = (
        BatchedViews("cifar10", 4)
        if mode == "batched"
        else PerImageViews(MultiViewTransform([get_preset("cifar10")], 4))
    )
    method = MMCR(backbone={"name": "resnet10", "kwargs": {"width": 4}}, projector=[8, 4])
    module = SelfSupModule(method, OptimConfig(), view_maker=maker, views_on_device=mode == "batched", seed=1)
    module.on_fit_start()  # binds the engine's make_views into the method
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = method.make_views(images, 5)
    assert a.shape == (3, 4, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(method.make_views(images, 5), a, rtol=0, atol=0)  # same step: the same views
    torch.testing.assert_close(module.make_views(images, 5), a, rtol=0, atol=0)  # the engine's own call
    assert not torch.equal(method.make_views(images, 6), a)  # another step: other views
    assert not torch.equal(module.make_views(images, 5, micro=1), a)  # another micro-batch: other views


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_a_run_stopped_by_max_steps_inside_an_epoch_continues_that_epoch(tmp_path, cifar_slice):
    """``--trainer.max_steps 3`` ends inside epoch 0 (8 batches of 25): raising max_steps and resuming continues the
    same epoch at its 4th batch, so (constant lr) the result equals the run of 6 steps without a stop. Lightning alone
    would mark the epoch processed and resume at epoch 1, skipping 5 batches."""
    args = [*BASE, *MODES["batched"], "--data.root", str(cifar_slice), "--optim.schedule", "constant"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.max_steps", "6", "--trainer.out_dir", str(a)]) == 0
    assert main(["pretrain", *args, "--trainer.max_steps", "3", "--trainer.out_dir", str(b)]) == 0
    resume = ["--trainer.max_steps", "6", "--trainer.out_dir", str(b), "--trainer.resume", "true"]
    assert main(["pretrain", *args, *resume]) == 0
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"resumed run differs at {k}")


def test_global_random_states_are_saved_and_restored(tmp_path):
    """torch / Python / NumPy global random states go into the checkpoint and come back on load (a method or callback
    drawing from them continues as without the stop), through a real file and a weights-only load."""
    import random

    import numpy as np

    from selfsup.engine.config import OptimConfig
    from selfsup.engine.module import SelfSupModule
    from selfsup.methods import MMCR

    module = SelfSupModule(MMCR(**MMCR.tiny), OptimConfig())

    def draws():
        return (
            torch.rand(3).tolist(),
            [random.random() for _ in range(3)],
            np.random.rand(3).tolist(),
            random.gauss(0, 1),  # a cached second normal is part of each state
            np.random.randn(),
        )

    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    draws()  # somewhere in the middle of each stream, with a normal cached in Python's and NumPy's states
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = draws()
    torch.save(checkpoint, tmp_path / "c.ckpt")
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # what a fresh process would start from
    assert draws() != expected
    module.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
    assert draws() == expected
