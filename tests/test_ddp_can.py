"""Real 2-process DDP (CPU, gloo) for CAN: the gradients equal the single-process ones at the same global batch.

Global batch: B = 8 real CIFAR-10 images x 2 views, 4 images per rank; the masks, noise levels and noise of all 16
view rows are drawn once (:meth:`CAN.draw`) and each rank takes its rows, so both set-ups see identical numbers.
The InfoNCE negatives are gathered over ranks (:func:`selfsup.distributed.gather`), so its DDP gradient equals the
single-process gradient only if the gather's backward is right (a plain all-gather would give half of it). The
reconstruction and noise terms are masked means with equal counts on every rank, which DDP's averaging makes the
global mean.

Cases: ``nce`` (w_mae 0, w_nce 1: the InfoNCE term alone), ``total`` (the paper's weights), and ``local`` (negatives
not gathered: must differ from the single-process gradient, showing the comparison can fail).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_harness import gloo_rank, run_spawned
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.methods import CAN
from selfsup.methods.can import CANDraw

WORLD, B = 2, 8
VIT = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
CASES = {
    "nce": dict(weight_mae=0.0, weight_nce=1.0),
    "total": dict(weight_mae=0.97, weight_nce=0.03),
    "local": dict(weight_mae=0.0, weight_nce=1.0, gather_distributed=False),
}
CHECKED = (
    "backbone.blocks.0.attn.qkv.weight",
    "backbone.patch_embed.proj.weight",
    "projector.0.weight",
    "decoder.pred.weight",
    "noise_mlp.2.weight",
)


class _Step(nn.Module):
    """DDP needs the forward to go through the wrapper: this one returns CAN's loss terms."""

    def __init__(self, method: CAN):
        super().__init__()
        self.method = method

    def forward(self, views: torch.Tensor, draw: CANDraw) -> dict[str, Any]:
        return self.method.forward_losses(views, draw)


def _setup(case: str, views_path: str) -> tuple[CAN, torch.Tensor, CANDraw]:
    torch.manual_seed(0)
    method = CAN(
        backbone=VIT,
        decoder={"width": 32, "depth": 1, "heads": 2},
        proj_dim=16,
        temperature=0.1,
        mask_ratio=0.5,
        **CASES[case],
    )
    views = torch.load(views_path, weights_only=True)  # [B, 2, 3, 32, 32]
    draw = method.draw(2 * B, (3, 32, 32), torch.Generator().manual_seed(1))
    return method, views, draw


def _grads(method: CAN) -> dict[str, torch.Tensor]:
    params = dict(method.named_parameters())
    return {k: params[k].grad.clone() for k in CHECKED}


def _worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        per = B // WORLD
        for case in CASES:
            method, views, draw = _setup(case, f"{out_dir}/views.pt")
            ddp = DDP(_Step(method))  # keep a reference: a collected wrapper takes its gradient hooks with it
            out = ddp(views[r * per : (r + 1) * per], draw.rows(slice(2 * r * per, 2 * (r + 1) * per)))
            out["loss"].backward()
            result[case] = {"loss_nce": out["loss_nce"], "grads": _grads(method)}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory, cifar_slice) -> tuple[list[dict[str, Any]], str]:
    from selfsup.data.build import build_eval_dataset
    from selfsup.engine.config import DataConfig

    out = tmp_path_factory.mktemp("ddp_can")
    ds = build_eval_dataset(DataConfig(dataset="folder", root=str(cifar_slice), augment="can_cifar"), "test")
    views = torch.stack([torch.stack([ds[10 * i][0], ds[10 * i][0].flip(-1)]) for i in range(B)])  # real images
    torch.save(views, out / "views.pt")
    return run_spawned(_worker, WORLD, out), str(out / "views.pt")


def _reference(case: str, views_path: str) -> dict[str, Any]:
    method, views, draw = _setup(case, views_path)
    out = method.forward_losses(views, draw)
    out["loss"].backward()
    return {"loss_nce": out["loss_nce"], "grads": _grads(method)}


@pytest.mark.parametrize("case", ["nce", "total"])
def test_ddp_gradient_equals_single_process(ddp_results, case: str) -> None:
    results, views_path = ddp_results
    ref = _reference(case, views_path)
    assert ref["grads"]["projector.0.weight"].abs().max() > 1e-4  # a non-trivial InfoNCE gradient
    for res in results:
        torch.testing.assert_close(res[case]["loss_nce"], ref["loss_nce"], rtol=1e-5, atol=1e-5)  # global negatives
        for k in CHECKED:
            torch.testing.assert_close(
                res[case]["grads"][k],
                ref["grads"][k],
                rtol=1e-5,
                atol=1e-5,
                msg=f"{case}: DDP gradient of {k} differs from the single-process one",
            )


def test_per_rank_negatives_give_another_gradient(ddp_results) -> None:
    results, views_path = ddp_results
    ref = _reference("nce", views_path)
    got = results[0]["local"]
    assert not torch.allclose(got["loss_nce"], ref["loss_nce"], rtol=1e-3)  # fewer negatives: a lower loss
    assert not torch.allclose(
        got["grads"]["projector.0.weight"], ref["grads"]["projector.0.weight"], rtol=1e-3, atol=1e-6
    )
