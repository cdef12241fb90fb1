"""Real 2-process DDP (CPU, gloo) for SwAV's distributed Sinkhorn-Knopp, DINO's centre and the DINO / SwAV losses.

One spawn of two ranks runs every scenario and saves its results; the tests compare them with single-process
references at the same global batch of B = 8 images (4 per rank):

* Sinkhorn: each rank's codes of its 4 rows, concatenated in rank order, equal ``sinkhorn_knopp`` of the 8 rows on
  one process (the all-reduced total, row sums and global N = 4·2 inside make it so; the codes of 4 rows alone
  differ, checked here so the comparison has teeth).
* DINO centre: ``dino_batch_mean`` (all-reduced sum / (B·Vt·W), as ``DINOLoss.update_center``) and
  ``dino_center_update(..., batch_mean=...)`` are equal on both ranks and equal the update on the global batch;
  a hand-written all-reduce in the worker gives the same.
* DINO loss: an ``nn.Linear`` student head under DDP (teacher: a frozen linear head on the 2 global views, a fixed
  centre); the loss is per-sample, so DDP's averaging of the two local means is the gradient of the global mean.
* SwAV: a linear prototype layer under DDP on normalised features of 4 crops, codes of crops 0 and 1 from the
  distributed Sinkhorn; DDP's gradient equals the single-process gradient at the global batch (and differs from
  the gradient with codes computed per half, which the all-reduces avoid).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.losses.dino import dino_batch_mean, dino_center_update, dino_loss
from selfsup.losses.swav import sinkhorn_knopp, swav_loss

WORLD = 2
B, PER = 8, 4  # global batch, rows per rank
K = 5  # prototypes / DINO output dimensions
D_IN = 6
VS, VT = 4, 2  # DINO student and teacher views; SwAV: 4 crops, codes of 2
EPS = 0.05
MOMENTUM = 0.9
RTOL, ATOL = 1e-5, 1e-6


def _data() -> dict[str, Any]:
    """Deterministic global inputs and modules (every rank and the reference build the same)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = nn.Linear(D_IN, K)
    teacher = nn.Linear(D_IN, K).requires_grad_(False)
    prototypes = nn.Linear(D_IN, K, bias=False)
    with torch.no_grad():
        prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))  # SwAV normalises the prototypes
    return {
        "scores": F.normalize(torch.randn(B, D_IN, generator=g), dim=1) @ prototypes.weight.detach().T,  # [B, K]
        "scores64": torch.randn(B, K, generator=g, dtype=torch.float64) * 0.3,
        "x": torch.randn(B, VS, D_IN, generator=g),  # DINO crops (0, 1 global)
        "center": 0.2 * torch.randn(K, generator=g),
        "teacher_logits": 3.0 * torch.randn(B, VT, K, generator=g),
        "feats": F.normalize(torch.randn(B, VS, D_IN, generator=g), dim=-1),  # SwAV crop features
        "student": student,
        "teacher": teacher,
        "prototypes": prototypes,
    }


def _dino_run(head: nn.Module, teacher: nn.Module, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    student_out = head(x.flatten(0, 1)).view(b, VS, K)  # one forward per backward (DDP)
    with torch.no_grad():
        teacher_out = teacher(x[:, :VT].flatten(0, 1)).view(b, VT, K)
    return dino_loss(student_out, teacher_out, center)


def _swav_run(protos: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    b = feats.shape[0]
    scores = protos(feats.flatten(0, 1)).view(b, VS, K)
    codes = torch.stack([sinkhorn_knopp(scores[:, q], epsilon=EPS) for q in range(2)], dim=1)  # collective
    return swav_loss(scores, codes)


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        d = _data()
        sl = slice(r * PER, (r + 1) * PER)
        result["codes"] = sinkhorn_knopp(d["scores"][sl], epsilon=EPS)
        result["codes100"] = sinkhorn_knopp(d["scores"][sl], epsilon=0.1, iters=100)
        result["codes64"] = sinkhorn_knopp(d["scores64"][sl], epsilon=0.1, iters=5)

        t_local = d["teacher_logits"][sl]
        result["batch_mean"] = dino_batch_mean(t_local)
        result["center"] = dino_center_update(d["center"], t_local, MOMENTUM, batch_mean=dino_batch_mean(t_local))
        total = t_local.sum(dim=(0, 1))  # the caller's own all-reduce, written as DINOLoss.update_center does
        dist.all_reduce(total)
        result["center_manual"] = dino_center_update(
            d["center"], t_local, MOMENTUM, batch_mean=total / (PER * VT * dist.get_world_size())
        )

        head = nn.Linear(D_IN, K)
        head.load_state_dict(d["student"].state_dict())
        ddp = DDP(head)  # keep a reference: a collected wrapper takes its gradient hooks with it
        loss = _dino_run(ddp, d["teacher"], d["x"][sl], d["center"])
        loss.backward()
        result["dino"] = {"loss": loss.detach(), "weight": head.weight.grad.clone(), "bias": head.bias.grad.clone()}

        protos = nn.Linear(D_IN, K, bias=False)
        protos.load_state_dict(d["prototypes"].state_dict())
        ddp_p = DDP(protos)
        loss = _swav_run(ddp_p, d["feats"][sl])
        loss.backward()
        result["swav"] = {"loss": loss.detach(), "weight": protos.weight.grad.clone()}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp_dino_swav"))


def test_distributed_sinkhorn_equals_single_process(ddp_results: list[dict[str, Any]]) -> None:
    d = _data()
    for key, scores, kwargs, tol in [
        ("codes", d["scores"], {"epsilon": EPS}, {"rtol": RTOL, "atol": ATOL}),
        ("codes100", d["scores"], {"epsilon": 0.1, "iters": 100}, {"rtol": RTOL, "atol": ATOL}),
        ("codes64", d["scores64"], {"epsilon": 0.1, "iters": 5}, {"rtol": 1e-12, "atol": 1e-12}),
    ]:
        got = torch.cat([res[key] for res in ddp_results])
        ref = sinkhorn_knopp(scores, **kwargs)
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(got.sum(dim=1), torch.ones(B, dtype=got.dtype), rtol=0, atol=1e-5)
        # the codes of one rank's rows alone (no all-reduce) are not the global codes
        assert (sinkhorn_knopp(scores[:PER], **kwargs) - ref[:PER]).abs().max() > 1e-3
    # after 100 iterations (ε = 0.1: a kernel flat enough to converge) the global batch is equipartitioned:
    # B/K per prototype over both ranks together
    codes100 = torch.cat([res["codes100"] for res in ddp_results])
    torch.testing.assert_close(codes100.sum(dim=0), torch.full((K,), B / K), rtol=1e-4, atol=0)


def test_dino_center_update_all_reduced(ddp_results: list[dict[str, Any]]) -> None:
    d = _data()
    ref_mean = d["teacher_logits"].mean(dim=(0, 1))
    ref = dino_center_update(d["center"], d["teacher_logits"], MOMENTUM)
    torch.testing.assert_close(ref, MOMENTUM * d["center"] + (1 - MOMENTUM) * ref_mean)
    for res in ddp_results:
        torch.testing.assert_close(res["batch_mean"], ref_mean, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["center"], ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["center_manual"], ref, rtol=RTOL, atol=ATOL)
    assert torch.equal(ddp_results[0]["center"], ddp_results[1]["center"])  # bit-identical on both ranks
    # the local update (this rank's rows only) would differ: the all-reduce matters
    local = dino_center_update(d["center"], d["teacher_logits"][:PER], MOMENTUM)
    assert (local - ref).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["dino", "swav"])
def test_ddp_gradient_equals_single_process(ddp_results: list[dict[str, Any]], case: str) -> None:
    d = _data()
    if case == "dino":
        head = d["student"]
        loss = _dino_run(head, d["teacher"], d["x"], d["center"])
    else:
        head = d["prototypes"]
        loss = _swav_run(head, d["feats"])
    loss.backward()
    assert head.weight.grad.abs().max() > 1e-3  # a non-trivial gradient
    for res in ddp_results:
        torch.testing.assert_close(res[case]["weight"], head.weight.grad, rtol=RTOL, atol=ATOL)
        if case == "dino":
            torch.testing.assert_close(res[case]["bias"], head.bias.grad, rtol=RTOL, atol=ATOL)
    # per-sample losses: each rank's loss is its local mean, their average the global value
    local = [res[case]["loss"] for res in ddp_results]
    assert not torch.equal(local[0], local[1])
    torch.testing.assert_close((local[0] + local[1]) / 2, loss.detach(), rtol=RTOL, atol=ATOL)


def test_swav_gradient_needs_the_global_codes() -> None:
    # Codes computed per half (no all-reduce) give another gradient: the DDP test above would catch a Sinkhorn
    # that skipped its collectives.
    d = _data()
    full = d["prototypes"]
    _swav_run(full, d["feats"]).backward()
    halves = []
    for r in range(WORLD):
        protos = nn.Linear(D_IN, K, bias=False)
        protos.load_state_dict(d["prototypes"].state_dict())
        _swav_run(protos, d["feats"][r * PER : (r + 1) * PER]).backward()
        halves.append(protos.weight.grad)
    assert ((halves[0] + halves[1]) / 2 - full.weight.grad).abs().max() > 1e-4
