"""Real 2-process DDP (CPU, gloo) for VICReg, Barlow Twins, MoCo v3 and SimSiam: DDP gradient == single-process.

One spawn of two ranks runs every case and saves its results; the tests compare them with single-process
references computed here at the same global batch. Setup as ``tests/test_ddp_losses.py``: global batch of
B = 16 images, two views each, an ``nn.Linear(12, 8)`` student projector (no BatchNorm) wrapped in DDP, 8 images
per rank, ONE DDP forward per backward (the two views concatenated, then split).

* VICReg, Barlow Twins: batch losses; ``z1, z2`` gathered with :func:`selfsup.distributed.gather` (backward sums
  over ranks), so the DDP gradient is the single-process gradient of the global loss.
* Barlow Twins, official scale: ``gather(..., grad="local")``; each rank back-propagates only its own rows'
  share, as the official all-reduce of ``c`` (no gradient) with SyncBatchNorm does: DDP gives 1/W of the exact
  gradient.
* MoCo v3: queries local; keys from a frozen "momentum" projector, gathered WITHOUT gradient
  (:func:`selfsup.distributed.all_gather_variable`), positives at ``offset = rank · 8``. Each rank's loss is the
  mean over its 8 queries against all 16 keys; DDP averages the ranks' gradients, so the gradient is that of
  ``(1/W) Σ_r loss_r`` = ``moco_v3_loss(Q1, Q2, K1, K2)`` on the global batch (offset 0). A second case takes the
  keys from the student itself through the autograd-aware ``gather`` and relies on the loss's own detach.
* SimSiam: per-sample, no gather; a frozen linear predictor on the student projections; DDP's averaging of the
  per-rank means is the gradient of the global mean.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.distributed import all_gather_variable, gather
from selfsup.losses.barlow_twins import barlow_twins_loss
from selfsup.losses.moco_v3 import moco_v3_loss
from selfsup.losses.simsiam import simsiam_loss
from selfsup.losses.vicreg import vicreg_loss

WORLD = 2
B, D_IN, D_OUT = 16, 12, 8
PER = B // WORLD
TEMPERATURE = 0.2
CASES = ("vicreg", "barlow_twins", "barlow_twins_local", "moco_v3", "moco_v3_self_keys", "simsiam")
BATCH_CASES = ("vicreg", "barlow_twins", "barlow_twins_local")  # the same global loss on every rank
LOCAL_CASES = ("moco_v3", "moco_v3_self_keys", "simsiam")  # each rank's loss is the mean over its own rows


def _data() -> tuple[nn.Linear, nn.Linear, nn.Linear, torch.Tensor, torch.Tensor]:
    """Student projector, frozen key projector (MoCo), frozen predictor (SimSiam), global views ``[B, D_IN]``."""
    torch.manual_seed(0)
    student = nn.Linear(D_IN, D_OUT)
    teacher = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    predictor = nn.Linear(D_OUT, D_OUT).requires_grad_(False)
    x1 = torch.randn(B, D_IN)
    x2 = x1 + 0.5 * torch.randn(B, D_IN)  # correlated views
    return student, teacher, predictor, x1, x2


def _loss(case: str, model: nn.Module, teacher, predictor, x1, x2, *, world: int, rank: int) -> torch.Tensor:
    """The case's loss on this rank's views (``world == 1``: the single-process reference on the global batch)."""
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)  # one forward per backward (DDP)
    if case == "vicreg":
        return vicreg_loss(gather(z1), gather(z2))
    if case == "barlow_twins":
        return barlow_twins_loss(gather(z1), gather(z2))
    if case == "barlow_twins_local":
        return barlow_twins_loss(gather(z1, grad="local"), gather(z2, grad="local"))
    if case == "moco_v3":
        with torch.no_grad():
            k1, k2 = all_gather_variable(teacher(x1)), all_gather_variable(teacher(x2))
        return moco_v3_loss(z1, z2, k1, k2, temperature=TEMPERATURE, offset=rank * z1.shape[0])
    if case == "moco_v3_self_keys":
        if world == 1:  # the reference: keys explicitly without gradient
            return moco_v3_loss(z1, z2, z1.detach(), z2.detach(), temperature=TEMPERATURE)
        return moco_v3_loss(z1, z2, gather(z1), gather(z2), temperature=TEMPERATURE, offset=rank * z1.shape[0])
    if case == "simsiam":
        return simsiam_loss(predictor(z1), predictor(z2), z1, z2)
    raise ValueError(case)


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        student, teacher, predictor, x1, x2 = _data()
        sl = slice(r * PER, (r + 1) * PER)
        for case in CASES:
            model = nn.Linear(D_IN, D_OUT)
            model.load_state_dict(student.state_dict())
            ddp = DDP(model)  # keep a reference: a collected wrapper takes its gradient hooks with it
            loss = _loss(case, ddp, teacher, predictor, x1[sl], x2[sl], world=WORLD, rank=r)
            loss.backward()
            result[case] = {"loss": loss.detach(), "weight": model.weight.grad.clone(), "bias": model.bias.grad.clone()}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp_losses_joint"))


def _reference(case: str) -> dict[str, torch.Tensor]:
    """Single-process loss and gradient on the whole global batch (no process group: gather is the identity)."""
    student, teacher, predictor, x1, x2 = _data()
    loss = _loss(case, student, teacher, predictor, x1, x2, world=1, rank=0)
    loss.backward()
    return {"loss": loss.detach(), "weight": student.weight.grad, "bias": student.bias.grad}


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradient_equals_single_process(ddp_results: list[dict[str, Any]], case: str) -> None:
    ref = _reference(case)
    assert ref["weight"].abs().max() > 1e-2  # a non-trivial gradient
    if case in BATCH_CASES:  # both views share the bias and both losses centre each branch: no bias gradient
        assert ref["bias"].abs().max() < 1e-6
    else:
        assert ref["bias"].abs().max() > 1e-3
    # Official Barlow Twins scale (gradient-free all-reduce of c): 1/W of the exact gradient.
    scale = 1 / WORLD if case == "barlow_twins_local" else 1.0
    for res in ddp_results:
        got = res[case]
        torch.testing.assert_close(got["weight"], scale * ref["weight"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["bias"], scale * ref["bias"], rtol=1e-5, atol=1e-6)


def test_per_rank_losses(ddp_results: list[dict[str, Any]]) -> None:
    # Batch losses see the gathered global batch: the same value on both ranks, equal to the reference.
    for case in BATCH_CASES:
        ref = _reference(case)["loss"]
        for res in ddp_results:
            torch.testing.assert_close(res[case]["loss"], ref, rtol=1e-5, atol=1e-6)
    # MoCo v3 and SimSiam: each rank's loss is its local mean (different per rank); their average is the global
    # single-process value, whose gradient the DDP gradient equals (test above).
    for case in LOCAL_CASES:
        local = [res[case]["loss"] for res in ddp_results]
        assert not torch.equal(local[0], local[1])
        torch.testing.assert_close(sum(local) / WORLD, _reference(case)["loss"], rtol=1e-5, atol=1e-6)
