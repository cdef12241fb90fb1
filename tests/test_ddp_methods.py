"""Every registered method under real 2-process DDP (CPU, gloo): the DDP gradient equals the single-process gradient
of the same global batch. Derived from the registry (``tests/method_cases.py``): a new method is covered as soon as it
is registered with a ``tiny`` configuration.

Set-up: both ranks hold the same images and draw the same random numbers (same seed), so the global batch is the
local batch twice, ``[x; x]``, with every method's own randomness (masks, noise, codes) and train-mode BatchNorm
statistics equal on both ranks and in the reference. The single-process reference runs the method on ``x`` with
``selfsup.distributed.gather`` replaced by the concatenation ``[t; t]`` (the value the real all-gather returns), so its
loss is the global loss and its gradient the exact gradient. A method that gathers with ``gather_grad="local"`` (the
official MMCR code's gradient-free gather) must give exactly half of it (each rank back-propagates its own slot only,
DDP averages); a method that forgot to gather would see a different loss (``L(x)`` instead of ``L([x; x])``) and fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_harness import gloo_rank, run_spawned
from method_cases import make_batch, method_cases, random_views, step_outputs
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import selfsup.distributed

WORLD = 2
CASES = method_cases()


class _Step(nn.Module):
    """DDP needs the forward to go through the wrapper: this one returns the method's loss."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch) -> torch.Tensor:
        return step_outputs(self.method, batch)["loss"]


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        for case in CASES:
            method = case.build(seed=0).train()
            step = DDP(_Step(method), find_unused_parameters=True)
            loss = step(make_batch(random_views(case.cls, b=4, seed=1), seed=2))
            loss.backward()
            result[case.id] = {"loss": loss.detach(), "grads": _grads(method)}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp_methods"), timeout=300)


def _reference(case, monkeypatch) -> dict[str, Any]:
    """Single process, the gather replaced by ``[t] * WORLD`` (with gradient to every slot)."""
    monkeypatch.setattr(selfsup.distributed, "gather", lambda t, group=None, grad="all": torch.cat([t] * WORLD))
    method = case.build(seed=0).train()
    loss = step_outputs(method, make_batch(random_views(case.cls, b=4, seed=1), seed=2))["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(method), "scale": 0.5 if method.gather_grad == "local" else 1.0}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ddp_gradient_equals_the_single_process_gradient(ddp_results, case, monkeypatch):
    ref = _reference(case, monkeypatch)
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    assert scale > 1e-4, "a non-trivial gradient"
    for res in ddp_results:
        got = res[case.id]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        assert set(got["grads"]) == set(ref["grads"]), case.id
        for name, g in ref["grads"].items():
            # float reduction order differs between DDP and one process: an absolute tolerance relative to the largest
            # gradient (a bias before BatchNorm has a gradient of exactly 0, ~1e-4 of the largest after rounding)
            torch.testing.assert_close(
                got["grads"][name], ref["scale"] * g, rtol=1e-4, atol=1e-3 * scale, msg=lambda m, n=name: f"{n}: {m}"
            )
