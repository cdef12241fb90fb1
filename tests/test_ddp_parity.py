"""Real 2-process DDP (CPU, gloo) of the two parity flags, through the methods themselves.

Two methods deliberately differ from their official code under DDP and keep a flag that reproduces it:

* ``MMCR(gather_grad="local")``: OFF-MMCR's gradient-free all-gather. Each rank back-propagates through its own rows
  only, so after DDP's averaging the gradient is ``1/W`` of the exact global one (default ``"all"``); the loss value
  (the nuclear norm over the global batch) is the same.
* ``CAN(gather_distributed=False)``: the public code's per-GPU InfoNCE negatives. Each rank's loss is the loss of its
  own rows, so the DDP gradient is the mean over ranks of the single-process gradients of each rank's local loss.

One spawn of two ranks runs every scenario (the DDP forward goes through the wrapper: ``_MMCRStep`` / ``_CANStep``);
the parent computes the expectations single-process. Global batch: 8 different random images, 4 per rank.

MMCR: TINY_VIT (LayerNorm only) and ``projector=[8]`` (one Linear, no BatchNorm), so nothing in the forward depends on
which rows share a process and the per-rank computation is the global one split in two. CAN: as
``tests/test_ddp_can.py``, the masks, levels and noise of all 16 view rows are drawn once (``CAN.draw``) and each rank
takes its rows, so DDP and the parent see identical numbers.

Tolerances: DDP and the parent run the same float32 operations on the same numbers, except that gradients are summed
in another order (all-reduce, split batches), which moves them by at most about 1e-7 relative (measured: at most 0.15 of
the allowance); rtol 1e-5, atol 1e-6 leave that margin and are far below the factor 2 (MMCR) and the relative
differences of 14-24 % (CAN) that tell the flags apart.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.methods import CAN, MMCR, Batch
from selfsup.methods.can import CANDraw
from selfsup.models import TINY_VIT

WORLD, B, PER = 2, 8, 4  # global images, images per rank
MMCR_VIEWS = 3
MMCR_GRADS = (
    "backbone.patch_embed.proj.weight",
    "backbone.blocks.0.attn.qkv.weight",
    "backbone.blocks.0.mlp.fc2.weight",
    "backbone.cls_token",
    "projector.0.weight",
)
CAN_CASES = {
    "nce": dict(weight_mae=0.0, weight_nce=1.0),  # the InfoNCE term alone
    "total": dict(weight_mae=0.97, weight_nce=0.03),  # the public code's weights (weight_noise 0.3 by default)
}
CAN_GRADS = (
    "backbone.blocks.0.attn.qkv.weight",
    "backbone.patch_embed.proj.weight",
    "projector.0.weight",
    "projector.2.weight",
    "decoder.pred.weight",
    "noise_mlp.2.weight",
)
MAE_ONLY = ("decoder.", "noise_mlp.")  # reached by the reconstruction and noise terms only
RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------------------------------------ set-ups


def _mmcr(gather_grad: str) -> MMCR:
    torch.manual_seed(0)
    method = MMCR(backbone=TINY_VIT, projector=[8], gather_grad=gather_grad).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    return method


def _mmcr_views() -> torch.Tensor:
    return torch.randn(B, MMCR_VIEWS, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _mmcr_batch(views: torch.Tensor, start: int) -> Batch:
    n = views.shape[0]
    return Batch(
        views=views,
        labels=torch.full((n,), -1),
        indices=torch.arange(start, start + n),
        step=0,
        max_steps=10,
        epoch=0,
        generator=torch.Generator().manual_seed(0),
        steps_per_epoch=5,
    )


def _can(case: str, gather: bool) -> tuple[CAN, torch.Tensor, CANDraw]:
    torch.manual_seed(0)
    method = CAN(
        backbone=TINY_VIT,
        decoder={"width": 32, "depth": 1, "heads": 2},
        proj_dim=16,
        temperature=0.1,
        mask_ratio=0.5,
        gather_distributed=gather,
        **CAN_CASES[case],
    ).train()
    views = torch.randn(B, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    draw = method.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(2))  # all 16 view rows, drawn once
    return method, views, draw


def _rows(r: int) -> tuple[slice, slice]:
    """Rank ``r``'s images and its view rows (sample-major: 2 rows per image)."""
    return slice(r * PER, (r + 1) * PER), slice(2 * r * PER, 2 * (r + 1) * PER)


def _grads(method: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    params = dict(method.named_parameters())
    return {k: params[k].grad.detach().clone() for k in names}


class _MMCRStep(nn.Module):
    """DDP needs the forward to go through the wrapper: this one returns the method's training loss."""

    def __init__(self, method: MMCR):
        super().__init__()
        self.method = method

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.method.training_loss(batch)["loss"]


class _CANStep(nn.Module):
    def __init__(self, method: CAN):
        super().__init__()
        self.method = method

    def forward(self, views: torch.Tensor, draw: CANDraw) -> dict[str, Any]:
        return self.method.forward_losses(views, draw)


# ------------------------------------------------------------------------------------------------------ DDP


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        images, rows = _rows(r)
        for grad in ("all", "local"):
            method = _mmcr(grad)
            ddp = DDP(_MMCRStep(method))  # keep a reference: a collected wrapper takes its gradient hooks with it
            loss = ddp(_mmcr_batch(_mmcr_views()[images], images.start))
            loss.backward()
            result[f"mmcr-{grad}"] = {"loss": loss.detach(), "grads": _grads(method, MMCR_GRADS)}
        for case in CAN_CASES:
            for gather in (True, False):
                method, views, draw = _can(case, gather)
                ddp = DDP(_CANStep(method))
                out = ddp(views[images], draw.rows(rows))
                out["loss"].backward()
                result[f"can-{case}-{gather}"] = {
                    "loss": out["loss"].detach(),
                    "loss_nce": out["loss_nce"],
                    "grads": _grads(method, CAN_GRADS),
                }


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp_parity"))


# ------------------------------------------------------------------------------------------------------ MMCR


def _mmcr_reference() -> dict[str, Any]:
    """Single process, the whole global batch (the flag changes nothing without a process group)."""
    method = _mmcr("all")
    loss = method.training_loss(_mmcr_batch(_mmcr_views(), 0))["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(method, MMCR_GRADS)}


@pytest.mark.parametrize(("grad", "factor"), [("all", 1.0), ("local", 1.0 / WORLD)])
def test_mmcr_gather_grad_under_ddp(one_thread, ddp_results, grad: str, factor: float) -> None:
    """``all``: the DDP gradient of every checked parameter is the single-process gradient at the global batch;
    ``local`` (OFF-MMCR parity): exactly ``1/W`` of it. Both: the loss is the global loss on every rank."""
    ref = _mmcr_reference()
    for k in MMCR_GRADS:
        assert ref["grads"][k].abs().max() > 1e-4, f"{k}: a trivial gradient"
    for r, res in enumerate(ddp_results):
        got = res[f"mmcr-{grad}"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=RTOL, atol=ATOL, msg=f"rank {r}: not the global loss")
        for k in MMCR_GRADS:
            torch.testing.assert_close(
                got["grads"][k],
                factor * ref["grads"][k],
                rtol=RTOL,
                atol=ATOL,
                msg=f"gather_grad={grad}, rank {r}: DDP gradient of {k} is not {factor} x the single-process one",
            )


def test_mmcr_local_is_half_of_all_under_ddp(ddp_results) -> None:
    """The two DDP runs against each other, without the reference: ``local`` = ``all / W`` and the same loss."""
    for res in ddp_results:
        torch.testing.assert_close(res["mmcr-local"]["loss"], res["mmcr-all"]["loss"], rtol=RTOL, atol=ATOL)
        for k in MMCR_GRADS:
            torch.testing.assert_close(
                res["mmcr-local"]["grads"][k], res["mmcr-all"]["grads"][k] / WORLD, rtol=RTOL, atol=ATOL
            )


# ------------------------------------------------------------------------------------------------------ CAN


def _can_run(case: str, gather: bool, images: slice, rows: slice) -> dict[str, Any]:
    """Single process: the method on the given images and their rows of the shared draw."""
    method, views, draw = _can(case, gather)
    out = method.forward_losses(views[images], draw.rows(rows))
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "loss_nce": out["loss_nce"], "grads": _grads(method, CAN_GRADS)}


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(CAN_CASES))
def test_can_per_gpu_negatives_under_ddp(one_thread, ddp_results, case: str) -> None:
    """``gather_distributed=False`` (CAN parity): rank ``r``'s loss is the single-process loss of its own rows, and
    the DDP gradient is the mean over ranks of the single-process gradients of those local losses; it differs from
    the gathered (default) DDP gradient, which is the single-process gradient at the global batch."""
    local = [_can_run(case, False, *_rows(r)) for r in range(WORLD)]
    expected = {k: sum(res["grads"][k] for res in local) / WORLD for k in CAN_GRADS}
    global_ref = _can_run(case, True, slice(0, B), slice(0, 2 * B))
    for k in CAN_GRADS:
        if case == "nce" and k.startswith(MAE_ONLY):  # weight_mae = 0: no gradient reaches the decoder side
            assert expected[k].abs().max() == 0, f"{case}: {k} gets a gradient without the MAE terms"
        else:
            assert expected[k].abs().max() > 1e-5, f"{case}: trivial expected gradient of {k}"
    for r, res in enumerate(ddp_results):
        got, gathered = res[f"can-{case}-False"], res[f"can-{case}-True"]
        torch.testing.assert_close(got["loss"], local[r]["loss"], rtol=RTOL, atol=ATOL, msg=f"rank {r}: loss")
        torch.testing.assert_close(got["loss_nce"], local[r]["loss_nce"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(gathered["loss_nce"], global_ref["loss_nce"], rtol=RTOL, atol=ATOL)
        # 4 images x 2 views have fewer negatives than 8 x 2: a lower InfoNCE than the global one.
        assert local[r]["loss_nce"] < global_ref["loss_nce"] - 0.1
        for k in CAN_GRADS:
            torch.testing.assert_close(
                got["grads"][k],
                expected[k],
                rtol=RTOL,
                atol=ATOL,
                msg=f"{case}, rank {r}: DDP gradient of {k} is not the mean of the per-rank gradients",
            )
            torch.testing.assert_close(gathered["grads"][k], global_ref["grads"][k], rtol=RTOL, atol=ATOL)
        # Per-GPU vs gathered negatives: every gradient the InfoNCE term reaches (encoder, projector) moves by more than
        # 1 % (14-24 % here); the decoder side, reached by the per-rank reconstruction and noise means only, does not.
        for k in CAN_GRADS:
            if k.startswith(MAE_ONLY):
                torch.testing.assert_close(got["grads"][k], gathered["grads"][k], rtol=RTOL, atol=ATOL)
            else:
                assert _rel_diff(got["grads"][k], gathered["grads"][k]) > 1e-2, f"{case}: {k} is the gathered gradient"
