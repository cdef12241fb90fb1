"""SwAV: the loss against swav_loss / sinkhorn_knopp on scores recomputed from the modules (and against the official
per-crop loop), prototype normalisation and freeze, the queue by hand (order, length, use, epoch), its per-rank
state through a SIGKILL and resume, and argument errors."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kill_harness import pretrain_killed_at
from method_cases import make_batch

import selfsup.distributed
import selfsup.methods.swav as swav_module  # registers SwAV until selfsup/methods/__init__.py imports it
from selfsup.cli import main
from selfsup.losses import sinkhorn_knopp, swav_loss
from selfsup.methods.swav import SwAV

B, D, K = 4, 8, 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def _swav(**kw) -> SwAV:
    torch.manual_seed(0)
    return SwAV(**{**SwAV.tiny, **kw}).train()


def _batch(step=0, seed=0, v=2, vl=0, steps_per_epoch=5, b=B):
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(torch.randn(b, v, 3, 32, 32, generator=g), step=step, steps_per_epoch=steps_per_epoch)
    if vl:
        batch.local_views = torch.randn(b, vl, 3, 16, 16, generator=g)
    return batch


def _scores(m: SwAV, batch) -> torch.Tensor:
    """``[B, Vc, K]`` recomputed from the modules: backbone per resolution, head on all crops, normalise, prototypes."""
    b = batch.views.shape[0]
    hs = [m.backbone(batch.views.flatten(0, 1))]
    if batch.local_views is not None:
        hs.append(m.backbone(batch.local_views.flatten(0, 1)))
    z = F.normalize(m.projector(torch.cat(hs)), dim=1)
    s = z @ m.prototypes.weight.T
    parts = s.split([h.shape[0] for h in hs])
    return torch.cat([p.view(b, -1, s.shape[-1]) for p in parts], dim=1)


def _official_loss(scores: torch.Tensor, codes: list[torch.Tensor], crops: list[int], t: float = 0.1) -> torch.Tensor:
    """The "swav loss" block of main_swav.py ``train``, crop by crop."""
    n = scores.shape[1]
    loss = 0.0
    for q, crop in zip(codes, crops):
        subloss = 0.0
        for v in [c for c in range(n) if c != crop]:
            subloss -= torch.mean(torch.sum(q * F.log_softmax(scores[:, v] / t, dim=1), dim=1))
        loss += subloss / (n - 1)
    return loss / len(crops)


def _grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


# -------------------------------------------------------------------------------------------------- the loss
def test_architecture_follows_the_official_head():
    m = _swav()
    lin = [x for x in m.projector if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(m.num_features, 16), (16, D)]
    assert lin[-1].bias is not None and isinstance(m.projector[1], torch.nn.BatchNorm1d)
    assert m.prototypes.weight.shape == (K, D) and m.prototypes.bias is None
    one = SwAV(backbone=SwAV.tiny["backbone"], hidden_dim=0, feat_dim=D, nmb_prototypes=K)  # hidden_mlp 0: one Linear
    assert [type(x) for x in one.projector] == [torch.nn.Linear]
    defaults = {k: p.default for k, p in inspect.signature(SwAV).parameters.items() if k != "backbone"}
    assert defaults == {  # main_swav.py's argument defaults
        "hidden_dim": 2048,
        "feat_dim": 128,
        "nmb_prototypes": 3000,
        "temperature": 0.1,
        "epsilon": 0.05,
        "sinkhorn_iterations": 3,
        "crops_for_assign": None,  # [0, 1]
        "freeze_prototypes_niters": 313,
        "queue_length": 0,
        "epoch_queue_starts": 15,
    }


@pytest.mark.parametrize("crops, vl", [([0, 1], 0), ([0, 1], 3), ([1, 3], 3)])
def test_loss_is_swav_loss_of_recomputed_scores_with_sinkhorn_codes(crops, vl):
    """Global and local crops, codes of the assigned crops (a local one too): the value and every gradient equal
    swav_loss of the recomputed scores with codes = sinkhorn_knopp of their detached scores, and the official loop."""
    m = _swav(crops_for_assign=crops)
    batch = _batch(vl=vl)
    out = m.training_loss(batch)
    out["loss"].backward()
    got = _grads(m)
    m.zero_grad()
    scores = _scores(m, batch)  # train-mode BN: the same statistics as in the step
    codes = [sinkhorn_knopp(scores[:, c].detach(), epsilon=0.05, iters=3) for c in crops]
    order = crops + [c for c in range(scores.shape[1]) if c not in crops]
    ref = swav_loss(scores[:, order], torch.stack(codes, 1), temperature=0.1)
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(_official_loss(scores, codes, crops), ref)
    ref.backward()
    assert set(got) == set(_grads(m)) and "prototypes.weight" in got
    for name, g in _grads(m).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
    emb = out["embeddings"]
    assert emb["backbone"].shape == (B, 2, m.num_features) and emb["projector"].shape == (B, 2, D)
    torch.testing.assert_close(emb["projector"].norm(dim=-1), torch.ones(B, 2))
    assert out["queue_used"] == 0.0


def test_no_gradient_through_the_codes(monkeypatch):
    """Sinkhorn sees detached scores and returns constants: the scores' gradient is (softmax(s/T) - q)/T terms only."""
    seen = []

    def spy(scores, **kw):
        seen.append(scores.requires_grad)
        codes = sinkhorn_knopp(scores, **kw)
        assert not codes.requires_grad
        return codes

    monkeypatch.setattr(swav_module, "sinkhorn_knopp", spy)
    m = _swav()
    batch = _batch()
    scores = _scores(m, batch).detach().requires_grad_(True)
    codes = torch.stack([sinkhorn_knopp(scores[:, c].detach()) for c in (0, 1)], 1)
    swav_loss(scores, codes).backward()
    # by hand: d/ds_v of -(1/2) sum_q (1/(V-1)) mean_b q . log_softmax(s_v / T), V = 2, q = the other crop's code
    p = torch.softmax(scores.detach() / 0.1, dim=-1)
    hand = (p - codes.flip(1)) / 0.1 / B / 2
    torch.testing.assert_close(scores.grad, hand)
    m.training_loss(batch)
    assert seen == [False, False]


def test_prototypes_are_normalised_at_the_start_of_each_step():
    m = _swav()
    with torch.no_grad():
        m.prototypes.weight.mul_(torch.linspace(0.5, 3.0, K)[:, None])  # rows of different norms
    expected = F.normalize(m.prototypes.weight.detach().clone(), dim=1)
    used = []
    m.prototypes.register_forward_pre_hook(lambda mod, inp: used.append(mod.weight.detach().clone()))
    m.training_loss(_batch())
    torch.testing.assert_close(used[0], expected)  # the forward already used unit rows
    torch.testing.assert_close(m.prototypes.weight.detach(), expected)  # in place, as the official copy_
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(K))


def test_prototypes_frozen_before_freeze_prototypes_niters_only():
    m = _swav(freeze_prototypes_niters=5)
    assert all(m.frozen(step, 0) == [m.prototypes.weight] for step in range(5))
    assert m.frozen(5, 0) == [] and m.frozen(6, 3) == []
    assert _swav(freeze_prototypes_niters=0).frozen(0, 0) == []


# ------------------------------------------------------------------------------------------------- the queue
def test_queue_keeps_the_newest_embeddings_first_and_joins_the_sinkhorn_once_full(monkeypatch):
    """queue_length 14, B 4, one rank: rounded to 12 rows (3 batches) per crop for assign. Each step writes the
    batch's normalised embeddings of crops 0 and 1 on top; the queue is used from the step after it is full, its
    scores against the current prototypes stacked before the batch's, the batch's codes kept."""
    inputs = []

    def spy(scores, **kw):
        inputs.append(scores.clone())
        return sinkhorn_knopp(scores, **kw)

    monkeypatch.setattr(swav_module, "sinkhorn_knopp", spy)
    m = _swav(queue_length=14, epoch_queue_starts=0)
    embeddings, used = [], []
    for step in range(5):
        before = None if m.queue is None else m.queue.clone()
        batch = _batch(step=step, seed=step)
        inputs.clear()
        out = m.training_loss(batch)
        embeddings.append(out["embeddings"]["projector"])  # [B, 2, D] normalised, crops 0 and 1
        used.append(out["queue_used"])
        assert m.queue.shape == (2, 12, D)
        if step == 3:  # the first step with a full queue: its scores (current prototypes) then the batch's
            scores = _scores(m, batch).detach()
            for i in range(2):
                assert inputs[i].shape == (12 + B, K)
                torch.testing.assert_close(inputs[i][:12], before[i] @ m.prototypes.weight.detach().T)
                torch.testing.assert_close(inputs[i][12:], scores[:, i])
            codes = torch.stack([sinkhorn_knopp(inputs[i])[-B:] for i in range(2)], 1)
            torch.testing.assert_close(out["loss"], swav_loss(_scores(m, batch), codes))
        elif step < 3:
            assert [x.shape for x in inputs] == [(B, K), (B, K)]
    assert used == [0.0, 0.0, 0.0, 1.0, 1.0]  # full after steps 0, 1, 2 (its last row non-zero)
    for i in range(2):  # newest first: steps 4, 3, 2
        expected = torch.cat([embeddings[s][:, i] for s in (4, 3, 2)])
        torch.testing.assert_close(m.queue[i], expected)


def test_queue_exists_only_from_epoch_queue_starts():
    m = _swav(queue_length=8, epoch_queue_starts=2)
    for step in range(2):  # epochs 0 and 1 (one step per epoch)
        m.training_loss(_batch(step=step, steps_per_epoch=1))
        assert m.queue is None and m.rank_state() is None
    m.training_loss(_batch(step=2, steps_per_epoch=1))
    assert m.queue.shape == (2, 8, D) and m.queue[:, B:].abs().sum() == 0  # created empty, one batch written
    off = _swav(queue_length=0, epoch_queue_starts=0)
    off.training_loss(_batch())
    assert off.queue is None and off.rank_state() is None


def test_queue_length_per_rank_and_rank_state_round_trip(monkeypatch):
    """Official rounding: queue_length − queue_length mod (B·W) rows over W ranks, each rank holding 1/W of them."""
    monkeypatch.setattr(selfsup.distributed, "world_size", lambda group=None: 2)
    m = _swav(queue_length=18, epoch_queue_starts=0)  # 18 − 18 mod 8 = 16 rows, 8 per rank
    m.training_loss(_batch())
    assert m.queue.shape == (2, 8, D)
    monkeypatch.undo()
    m.training_loss(_batch(step=1, seed=1))
    state = m.rank_state()
    assert set(state) == {"queue"} and state["queue"] is m.queue
    fresh = _swav(queue_length=18, epoch_queue_starts=0)
    fresh.load_state_dict(m.state_dict())
    fresh.load_rank_state({"queue": state["queue"].clone()})
    a, b = m.training_loss(_batch(step=2, seed=2)), fresh.training_loss(_batch(step=2, seed=2))
    torch.testing.assert_close(a["loss"], b["loss"])  # the same queue, the same codes (used: 2 batches were full)
    assert a["queue_used"] == 1.0
    torch.testing.assert_close(m.queue, fresh.queue)
    assert "queue" not in m.state_dict()


def test_queue_resumes_exactly_after_a_kill(tmp_path, cifar_slice, monkeypatch):
    """SIGKILL at step 7, after the queue started (epoch 1 = step 4; the last checkpoint, step 6, holds it full but
    not yet used), resume: the final queue and weights equal the uninterrupted run's (a queue that restarted empty
    would not be used at steps 6-7)."""
    from cli_args import BATCHED_IN_MEMORY

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed subprocess computes as this process (one thread)
    backbone = "{name: resnet10, kwargs: {cifar_stem: true, width: 8}}"
    args = ["--method", "selfsup.methods.swav.SwAV", "--method.init_args.backbone", backbone]
    for key, value in (("hidden_dim", 16), ("feat_dim", 8), ("nmb_prototypes", 12), ("freeze_prototypes_niters", 2)):
        args += [f"--method.init_args.{key}", str(value)]
    args += ["--method.init_args.queue_length", "32", "--method.init_args.epoch_queue_starts", "1"]
    args += ["--data.dataset", "cifar10", *BATCHED_IN_MEMORY, "--data.root", str(cifar_slice), "--data.subset", "64"]
    args += ["--data.batch_size", "16", "--trainer.max_epochs", "3", "--trainer.save_every_n_steps", "3"]
    args += ["--trainer.logger", "none", "--trainer.progress_bar", "false", "--monitor.every_n_epochs", "0"]
    args += ["--monitor.spectrum_every_n_steps", "0"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(7, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    mid = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = mid["selfsup_rank_state"]
    # 4 steps per epoch: the queue started at step 4, steps 4 and 5 filled its 2 batches of 16 rows
    assert mid["global_step"] == 6 and state["queue"].shape == (2, 32, 8) and state["queue"][:, -1].abs().sum() > 0
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = (torch.load(Path(r) / "checkpoints" / "last.ckpt", weights_only=True) for r in (run_a, run_b))
    assert a["global_step"] == b["global_step"] == 12
    qa, qb = (c["selfsup_rank_state"][0]["queue"] for c in (a, b))
    torch.testing.assert_close(qb, qa, rtol=0, atol=1e-6)
    assert (qa - state["queue"]).abs().max() > 1e-2  # steps 6-11 rewrote it
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crops_for_assign": [0, 0]}, "crops_for_assign must be distinct"),
        ({"crops_for_assign": []}, "crops_for_assign must be distinct"),
        ({"crops_for_assign": [-1]}, "crops_for_assign must be distinct"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"epsilon": -1.0}, "epsilon must be > 0"),
        ({"nmb_prototypes": 0}, "nmb_prototypes must be >= 1"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations must be >= 1"),
        ({"queue_length": -1}, "queue_length, epoch_queue_starts must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _swav(**kwargs)


def test_bad_batches():
    with pytest.raises(ValueError, match=r"crops_for_assign \[0, 2\] needs crops 0..2"):
        _swav(crops_for_assign=[0, 2]).training_loss(_batch())
    with pytest.raises(ValueError, match="at least 2 crops"):
        _swav(crops_for_assign=[0]).training_loss(_batch(v=1))
    _swav(crops_for_assign=[0]).training_loss(_batch(v=1, vl=2))  # one global + locals: fine (official allows it)
    with pytest.raises(ValueError, match="rounds to 0"):
        _swav(queue_length=3, epoch_queue_starts=0).training_loss(_batch())
