"""The online kNN monitor: bank scored shard by shard (never gathered), any declared backbone, real gloo ranks."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from selfsup.engine import callbacks
from selfsup.engine.callbacks import KNNMonitor, monitored_backbone
from selfsup.eval import knn_accuracy


class SignVectors(Dataset):
    """``n`` vectors in {-1, 1}^4 with labels in ``[0, classes)``: exact cosines, so many exact ties."""

    def __init__(self, n: int, seed: int, classes: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
        self.targets = torch.randint(0, classes, (n,), generator=g).tolist()
        self.classes = list(range(classes))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def _expected(bank: SignVectors, test: SignVectors, world: int, k: int) -> dict:
    """kNN over the bank in the monitor's order: rank 0's shard ``bank[0::W]``, then rank 1's, ..."""
    order = [i for r in range(world) for i in range(r, len(bank), world)]
    return knn_accuracy(
        bank.x[order], torch.tensor(bank.targets)[order], test.x, torch.tensor(test.targets), num_classes=5, k=k
    )


def _no_gather(*args, **kwargs):
    raise AssertionError("the kNN bank must not be gathered")


def test_monitor_single_process_equals_knn_accuracy_and_never_gathers(monkeypatch) -> None:
    """Fails before the rewrite: the monitor all-gathered the whole bank (all_gather_variable)."""
    monkeypatch.setattr(callbacks.distributed, "all_gather_variable", _no_gather)
    bank, test = SignVectors(37, seed=0), SignVectors(23, seed=1)
    for k in (1, 4, 200):
        res = KNNMonitor(bank, test, 5, k=k, batch_size=8).evaluate(nn.Flatten(), torch.device("cpu"))
        expected = _expected(bank, test, 1, k)
        assert (res["top1"], res["top5"]) == (expected["top1"], expected["top5"])
        assert (res["n_bank"], res["n_test"]) == (37, 23)


KS = (3, 30)  # fewer neighbours than a shard holds, and more


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        callbacks.distributed.all_gather_variable = _no_gather  # the bank path must not gather
        seen: list[int] = []
        real = callbacks.knn_topk

        def spy(bank_f, *args, **kwargs):
            seen.append(bank_f.shape[0])
            return real(bank_f, *args, **kwargs)

        callbacks.knn_topk = spy
        net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, affine=False))
        net[1].running_mean.fill_(float(rank))  # ranks disagree; the monitor must use rank 0's statistics
        out = {}
        for k in KS:
            seen.clear()
            monitor = KNNMonitor(SignVectors(37, seed=0), SignVectors(23, seed=1), 5, k=k, batch_size=8)
            out[k] = {**monitor.evaluate(net, torch.device("cpu"), rank, world), "shards": list(seen)}
            assert float(net[1].running_mean[0]) == float(rank)  # restored afterwards
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        torch.distributed.destroy_process_group()


def test_monitor_two_gloo_ranks_score_every_query_against_the_whole_bank(tmp_path) -> None:
    """Two real processes, uneven shards (19 + 18 bank, 12 + 11 queries), exact ties: both ranks report the
    single-process numbers; each rank only ever scores one shard at a time."""
    torch.multiprocessing.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for k in KS:
        expected = _expected(SignVectors(37, seed=0), SignVectors(23, seed=1), 2, k)
        for res in results:
            res = res[str(k)]
            assert (res["top1"], res["top5"]) == (expected["top1"], expected["top5"])
            assert (res["n_bank"], res["n_test"]) == (37, 23)
            assert res["shards"] == [19, 18]


class _Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.teacher_backbone = nn.Flatten(), nn.Sequential(nn.Flatten())
        self.asked: list[str] = []

    def backbone_for(self, which: str) -> nn.Module:
        self.asked.append(which)
        return {"online": self.backbone, "teacher": self.teacher_backbone}[which]


def test_monitor_scores_the_declared_backbone() -> None:
    """``which`` selects the backbone through ``method.backbone_for`` (fails before: no ``which`` argument)."""
    method = _Method()
    monitor = KNNMonitor(SignVectors(20, seed=0), SignVectors(10, seed=1), 5, k=3, which="teacher")
    trainer = SimpleNamespace(current_epoch=0, max_epochs=1, max_steps=-1, global_step=4, global_rank=0, world_size=1)
    logged: dict = {}
    module = SimpleNamespace(method=method, device=torch.device("cpu"), log_dict=lambda d, **kw: logged.update(d))
    monitor.on_train_epoch_end(trainer, module)
    assert method.asked == ["teacher"]
    assert set(monitor.history[0]) == {"epoch", "step", "top1", "top5", "n_bank", "n_test"}
    assert set(logged) == {"knn/top1", "knn/top5"}

    legacy = SimpleNamespace(backbone=nn.Flatten())  # a method without backbone_for: only its online backbone
    assert monitored_backbone(legacy) is legacy.backbone
    with pytest.raises(ValueError, match="teacher"):
        monitored_backbone(legacy, "teacher")
