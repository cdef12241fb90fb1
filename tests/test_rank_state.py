"""Per-rank method state (``Method.rank_state``) outside the state dict, e.g. SwAV's queue: saved with every
checkpoint and given back when a run resumes, so the resumed run's state equals the uninterrupted run's."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cli_args import BATCHED_IN_MEMORY, TINY_MMCR
from kill_harness import pretrain_killed_at

from selfsup.cli import main

TESTS = Path(__file__).resolve().parent


def mid_total(checkpoint: dict) -> torch.Tensor:
    return checkpoint["selfsup_rank_state"][0]["total"]


def test_a_queue_outside_the_state_dict_resumes_exactly(tmp_path, cifar_slice, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    args = ["--method", "method_cases.QueueMMCR", *TINY_MMCR[2:], "--data.dataset", "cifar10", *BATCHED_IN_MEMORY]
    args += ["--data.root", str(cifar_slice), "--data.batch_size", "25", "--trainer.max_epochs", "2"]
    args += ["--trainer.save_every_n_steps", "3", "--trainer.logger", "none", "--trainer.progress_bar", "false"]
    args += ["--monitor.every_n_epochs", "0"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(11, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    mid = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = mid["selfsup_rank_state"]
    assert mid["global_step"] == 9 and state["total"].shape == (8,)  # the projector's width
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run_a, run_b))
    # the resumed run continued from the saved sum (starting from 0 again would miss steps 0-8)
    total_a, total_b = (c["selfsup_rank_state"][0]["total"] for c in (a, b))
    torch.testing.assert_close(total_b, total_a, rtol=1e-6, atol=1e-4)
    assert (total_a - mid_total(mid)).abs().max() > 1e-2  # steps 9-15 added to it: a reset would show
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
