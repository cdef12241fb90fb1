"""Real 2-process DDP (CPU, gloo) for MEC, SimCLR (InfoNCE) and BYOL: DDP gradient == single-process gradient.

One spawn of two ranks runs every scenario and saves its results to a temporary
directory; the tests compare them with single-process references computed here at
the same global batch. Setup: global batch of B = 16 images, two views each, an
``nn.Linear(12, 8)`` student projector (no BatchNorm), 8 images per rank. Each
rank runs the projector ONCE on its two views concatenated (one DDP forward per
backward) and splits the output.

* MEC: frozen linear teacher ``p`` and trainable student ``z``; all four tensors
  gathered with :func:`selfsup.distributed.gather`, so ``m`` is the global batch
  (16 > d = 8: the d×d form); a second case without teacher.
* SimCLR: ``info_nce_loss`` on the gathered ``z1, z2`` (negatives from both ranks).
* BYOL: ``byol_loss`` is per-sample: no gather; DDP's averaging of the per-rank
  means is the gradient of the global mean (equal local batches).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.distributed import gather
from selfsup.losses import byol_loss, info_nce_loss, mec_loss

WORLD = 2
B, D_IN, D_OUT = 16, 12, 8
EPS_SQ = 1.0  # lamda_inv = 16·1/8 = 2: the higher-order MEC terms matter
TEMPERATURE = 0.5
CASES = ("mec_teacher", "mec_self", "simclr", "byol")


def _data() -> tuple[nn.Linear, nn.Linear, torch.Tensor, torch.Tensor]:
    """Deterministic student projector, frozen teacher/target projector and global views ``[B, D_IN]``."""
    torch.manual_seed(0)
    student = nn.Linear(D_IN, D_OUT)
    teacher = nn.Linear(D_IN, D_OUT)
    teacher.requires_grad_(False)
    x1, x2 = torch.randn(B, D_IN), torch.randn(B, D_IN)
    x2 = x1 + 0.5 * x2  # correlated views
    return student, teacher, x1, x2


def _loss(case: str, z1, z2, p1, p2, gather_fn) -> torch.Tensor:
    """The case's loss from local student outputs ``z`` and teacher outputs ``p`` (``gather_fn``: identity or gather)."""
    if case == "mec_teacher":
        return mec_loss(gather_fn(z1), gather_fn(z2), gather_fn(p1), gather_fn(p2), eps_sq=EPS_SQ)
    if case == "mec_self":
        return mec_loss(gather_fn(z1), gather_fn(z2), eps_sq=EPS_SQ)
    if case == "simclr":
        return info_nce_loss(gather_fn(z1), gather_fn(z2), temperature=TEMPERATURE)
    if case == "byol":  # z = online prediction, p = target (detached), symmetrised, no gather
        return byol_loss(z1, p2.detach()) + byol_loss(z2, p1.detach())
    raise ValueError(case)


def _run(case: str, model: nn.Module, teacher: nn.Module, x1, x2, gather_fn) -> torch.Tensor:
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)  # one forward per backward (DDP)
    with torch.no_grad():
        p1, p2 = teacher(x1), teacher(x2)
    return _loss(case, z1, z2, p1, p2, gather_fn)


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        student, teacher, x1, x2 = _data()
        per = B // WORLD
        sl = slice(r * per, (r + 1) * per)
        for case in CASES:
            model = nn.Linear(D_IN, D_OUT)
            model.load_state_dict(student.state_dict())
            ddp = DDP(model)  # keep a reference: a collected wrapper takes its gradient hooks with it
            loss = _run(case, ddp, teacher, x1[sl], x2[sl], gather)
            loss.backward()
            result[case] = {
                "loss": loss.detach(),
                "weight": model.weight.grad.clone(),
                "bias": model.bias.grad.clone(),
            }


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp_losses"))


def _reference(case: str) -> dict[str, torch.Tensor]:
    """Single-process gradient of the same loss on the whole global batch."""
    student, teacher, x1, x2 = _data()
    loss = _run(case, student, teacher, x1, x2, lambda t: t)
    loss.backward()
    return {"loss": loss.detach(), "weight": student.weight.grad, "bias": student.bias.grad}


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradient_equals_single_process(ddp_results: list[dict[str, Any]], case: str) -> None:
    ref = _reference(case)
    assert ref["weight"].abs().max() > 1e-3  # a non-trivial gradient
    for res in ddp_results:
        got = res[case]
        if case != "byol":  # BYOL's per-rank loss is the local mean (see the test below)
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["weight"], ref["weight"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bias"], ref["bias"], rtol=1e-5, atol=1e-5)


def test_per_rank_losses(ddp_results: list[dict[str, Any]]) -> None:
    # Batch losses see the gathered global batch: identical on both ranks. BYOL's loss is the
    # local mean (different per rank); their average is the global value.
    for case in ("mec_teacher", "mec_self", "simclr"):
        torch.testing.assert_close(ddp_results[0][case]["loss"], ddp_results[1][case]["loss"], rtol=0, atol=0)
    local = [res["byol"]["loss"] for res in ddp_results]
    assert not torch.equal(local[0], local[1])
    torch.testing.assert_close((local[0] + local[1]) / 2, _reference("byol")["loss"], rtol=1e-5, atol=1e-6)
