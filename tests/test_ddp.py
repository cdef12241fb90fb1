"""Real 2-process DDP (CPU, gloo): the gathered MMCR gradient equals the single-process one.

One spawn of two ranks runs every scenario and saves its results to a temporary
directory; the tests compare them with single-process references computed here.
Setup: ``nn.Linear(12, 8)`` projector (no BatchNorm), global batch of B = 8 images
× V = 4 views, sample-major, 4 images per rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.distributed import all_gather_variable, gather, is_dist, rank, world_size
from selfsup.losses import mmcr_loss, mmcr_momentum_loss

WORLD = 2
B, V, D_IN, D_OUT = 8, 4, 12, 8
LMBDA = 0.5
CASES = ("plain", "lmbda", "momentum", "naive")


def _data() -> tuple[nn.Linear, nn.Linear, torch.Tensor]:
    """Deterministic online projector, EMA projector and global views ``[B, V, D_IN]``."""
    torch.manual_seed(0)
    online = nn.Linear(D_IN, D_OUT)
    ema = nn.Linear(D_IN, D_OUT)
    ema.requires_grad_(False)
    x = torch.randn(B, V, D_IN)
    return online, ema, x


def _project(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)


def _loss(case: str, z: torch.Tensor, z_ema: torch.Tensor) -> torch.Tensor:
    if case == "momentum":
        return mmcr_momentum_loss(z, z_ema, lmbda=LMBDA)
    return mmcr_loss(z, lmbda=LMBDA if case == "lmbda" else 0.0)


def _naive_gather(z: torch.Tensor) -> torch.Tensor:
    """The official MMCR code: gradient-free all-gather, own slot replaced by the local tensor."""
    out = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(out, z.detach().contiguous())
    out[dist.get_rank()] = z
    return torch.cat(out, dim=0)


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        result["env"] = (is_dist(), world_size(), rank())
        online, ema, x = _data()
        per = B // WORLD
        x_local = x[r * per : (r + 1) * per]
        for case in CASES:
            model = nn.Linear(D_IN, D_OUT)
            model.load_state_dict(online.state_dict())
            ddp = DDP(model)
            z = _project(ddp, x_local)
            z_ema = _project(ema, x_local)
            if case == "naive":
                z_all, ema_all = _naive_gather(z), _naive_gather(z_ema)
            else:
                z_all, ema_all = gather(z), gather(z_ema)
            loss = _loss(case, z_all, ema_all)
            loss.backward()
            result[case] = {
                "loss": loss.detach(),
                "weight": model.weight.grad.clone(),
                "bias": model.bias.grad.clone(),
            }
        # Variable-length gather: rank 0 holds 3 rows, rank 1 holds 5.
        rows = 3 if r == 0 else 5
        feats = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * r
        result["variable"] = all_gather_variable(feats)
        # Unequal local batches must raise (on every rank, without hanging).
        try:
            gather(torch.zeros(3 + r, 2))
            result["mismatch"] = None
        except ValueError as e:
            result["mismatch"] = str(e)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp"))


def _reference(case: str) -> dict[str, torch.Tensor]:
    """Single-process gradient of the same loss on the whole global batch."""
    online, ema, x = _data()
    z = _project(online, x)
    loss = _loss("plain" if case == "naive" else case, z, _project(ema, x))
    loss.backward()
    return {"loss": loss.detach(), "weight": online.weight.grad, "bias": online.bias.grad}


def test_process_group_helpers(ddp_results: list[dict[str, Any]]) -> None:
    assert [res["env"] for res in ddp_results] == [(True, 2, 0), (True, 2, 1)]
    assert (is_dist(), world_size(), rank()) == (False, 1, 0)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather(x) is x  # identity when not distributed


@pytest.mark.parametrize("case", ["plain", "lmbda", "momentum"])
def test_gathered_gradient_equals_single_process(ddp_results: list[dict[str, Any]], case: str) -> None:
    ref = _reference(case)
    for res in ddp_results:
        got = res[case]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["weight"], ref["weight"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bias"], ref["bias"], rtol=1e-5, atol=1e-5)
        assert ref["weight"].abs().max() > 1e-3  # a non-trivial gradient


def test_naive_gather_gives_one_over_world_size(ddp_results: list[dict[str, Any]]) -> None:
    # Documents the OFF-MMCR bug: without gradient through the gather, each rank
    # back-propagates its own slice only and DDP's averaging leaves 1/W of the gradient.
    ref = _reference("naive")
    for res in ddp_results:
        got = res["naive"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["weight"], ref["weight"] / WORLD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bias"], ref["bias"] / WORLD, rtol=1e-5, atol=1e-5)


def test_all_gather_variable(ddp_results: list[dict[str, Any]]) -> None:
    expected = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(10.0).reshape(5, 2) + 100], dim=0)
    for res in ddp_results:
        torch.testing.assert_close(res["variable"], expected)


def test_gather_rejects_unequal_batches(ddp_results: list[dict[str, Any]]) -> None:
    for res in ddp_results:
        assert res["mismatch"] is not None
        assert "same tensor shape" in res["mismatch"] and "[(3, 2), (4, 2)]" in res["mismatch"]
