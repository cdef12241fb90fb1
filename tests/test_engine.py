"""Engine pieces: the sharded epoch sampler, atomic checkpoint writes, run-directory guard."""

from __future__ import annotations

import functools
import operator
import os

import pytest
import torch

from selfsup.data.sampler import ShardedEpochSampler
from selfsup.engine.checkpoint import atomic_torch_save, resolve_resume


def test_sampler_shards_are_disjoint_equal_and_epoch_seeded():
    shards = []
    for r in range(3):
        s = ShardedEpochSampler(10, seed=1, rank=r, world_size=3)
        s.set_epoch(4)
        shards.append(list(s))
    assert [len(x) for x in shards] == [3, 3, 3]
    flat = functools.reduce(operator.iadd, shards, [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    s = ShardedEpochSampler(10, seed=1)
    s.set_epoch(4)
    again = list(s)
    s.set_epoch(4)
    assert list(s) == again  # same epoch, same order (resume)
    s.set_epoch(5)
    assert list(s) != again
    assert sorted(again) == list(range(10))
    with pytest.raises(ValueError, match="rank 3 outside"):
        ShardedEpochSampler(10, rank=3, world_size=3)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "a" / "x.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["w"].sum() == 3
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in target.parent.iterdir()] == ["x.ckpt"]  # no temporary left behind


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path / "fresh", False) is None
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        resolve_resume(tmp_path / "fresh", True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        resolve_resume(tmp_path / "run", False)
    assert resolve_resume(tmp_path / "run", True).endswith("last.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_resume(tmp_path / "run", str(tmp_path / "nope.ckpt"))


def test_resume_auto_and_slurm_requeue(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert resolve_resume(run, "auto") is None  # nothing to continue: fresh start
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_resume(run, "auto").endswith("last.ckpt")
    (run / "hpc_ckpt_2.ckpt").write_bytes(b"x")
    (run / "hpc_ckpt_10.ckpt").write_bytes(b"x")
    assert resolve_resume(run, "auto").endswith("hpc_ckpt_10.ckpt")  # newest pre-emption checkpoint
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job continues its own run
    assert resolve_resume(run, False).endswith("hpc_ckpt_10.ckpt")


def test_training_loss_contract_logs_scalars_and_refuses_the_rest():
    """What training_loss returns: 'loss' plus scalars, each logged as train/<name>; a vector or a string is an error
    naming the entry, never dropped silently."""
    from selfsup.engine.module import training_logs

    loss = torch.tensor(2.0, requires_grad=True)
    got_loss, logs = training_logs({"loss": loss, "term": torch.tensor([0.5]), "tau": 0.99, "steps": 3}, "M")
    assert got_loss is loss
    assert logs == {"train/loss": 2.0, "train/term": 0.5, "train/tau": pytest.approx(0.99), "train/steps": 3.0}
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())
    with pytest.raises(ValueError, match=r"M.training_loss returned 'per_sample' = a tensor of shape \(4,\)"):
        training_logs({"loss": loss, "per_sample": torch.zeros(4)}, "M")
    with pytest.raises(ValueError, match="returned 'note' = a str: only scalars are logged"):
        training_logs({"loss": loss, "note": "hi"}, "M")
    with pytest.raises(ValueError, match=r"returned no 'loss' \(keys: \['l'\]\)"):
        training_logs({"l": loss}, "M")
    with pytest.raises(ValueError, match="'loss' must be a one-element float tensor, got a tensor of shape"):
        training_logs({"loss": torch.zeros(2)}, "M")
