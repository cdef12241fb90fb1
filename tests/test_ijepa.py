"""I-JEPA: the loss by hand, the multi-block masks' properties over many seeds, the method's loss against the formula
recomputed from its modules where student and target encoder differ, the target encoder's lack of gradient, keyed
(resumable) masks, the linear momentum schedule, and the loss's DDP gradient on 2 real gloo processes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ddp_harness import gloo_rank, run_spawned
from method_cases import make_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.losses.ijepa import ijepa_loss
from selfsup.methods.ijepa import IJEPA
from selfsup.models.ijepa_predictor import encode_tokens
from selfsup.models.multiblock_mask import MultiBlockMaskSampler

# ------------------------------------------------------------------------------------------------------ the loss


def test_loss_by_hand():
    # target token (1, 3): mean 2, biased variance 1 -> layer-normed (-s, s), s = 1 / sqrt(1 + 1e-5)
    s = 1.0 / math.sqrt(1.0 + 1e-5)
    pred = torch.tensor([[0.0, 3.0]])
    target = torch.tensor([[1.0, 3.0]])
    d0, d1 = 0.0 + s, 3.0 - s  # |d0| < 1: 0.5 d0²; |d1| >= 1: |d1| - 0.5
    expected = (0.5 * d0**2 + (d1 - 0.5)) / 2
    assert ijepa_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # [2, 2, 3]: two tokens of three features; every element counts once in the mean
    t = torch.tensor([[[0.0, 0.0, 3.0], [1.0, 2.0, 3.0]], [[5.0, 5.0, 5.0], [2.0, 0.0, -2.0]]])
    p = torch.zeros_like(t)
    tn = F.layer_norm(t, (3,), eps=1e-5)
    by_hand = torch.where(tn.abs() < 1, 0.5 * tn**2, tn.abs() - 0.5).mean()
    assert ijepa_loss(p, t).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # [0, 0, 3] normalises to (-1/sqrt(2), -1/sqrt(2), sqrt(2)) up to eps: one element past beta = 1
    v = 1 / math.sqrt(2)
    first = (2 * 0.5 * v**2 + (math.sqrt(2) - 0.5)) / 3
    assert F.smooth_l1_loss(torch.zeros(3), tn[0, 0]).item() == pytest.approx(first, rel=1e-4)


def test_loss_degenerate_cases_and_checks():
    t = torch.randn(4, 5, 8)
    assert ijepa_loss(F.layer_norm(t, (8,), eps=1e-5), t).item() == pytest.approx(0.0, abs=1e-7)  # perfect prediction
    assert ijepa_loss(2 * t, 2 * t + 7).item() == pytest.approx(ijepa_loss(2 * t, t).item(), rel=1e-5)  # shift-free
    const = torch.full((3, 6), 4.0)  # a constant token normalises to 0: the loss is smooth_l1(pred, 0)
    pred = torch.linspace(-2, 2, 18).view(3, 6)
    assert ijepa_loss(pred, const).item() == pytest.approx(F.smooth_l1_loss(pred, torch.zeros(3, 6)).item(), rel=1e-6)
    assert ijepa_loss(t.half(), t.half()).dtype == torch.float32  # fp32 maths
    with pytest.raises(FloatingPointError, match="pred contains NaN"):
        ijepa_loss(torch.full((2, 4), float("nan")), torch.randn(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        ijepa_loss(torch.randn(2, 4), torch.randn(2, 5))


# ------------------------------------------------------------------------------------------------------ the masks

OFFICIAL = {"enc_scale": (0.85, 1.0), "pred_scale": (0.15, 0.2), "aspect": (0.75, 1.5), "min_keep": 10}


def _check_masks(sampler: MultiBlockMaskSampler, b: int, seed: int, disjoint: bool) -> None:
    masks = sampler(b, torch.Generator().manual_seed(seed))
    hg, wg = sampler.height, sampler.width
    ne, m = sampler.n_enc, sampler.n_pred
    assert masks.context.shape[:2] == (ne, b) and masks.targets.shape[:2] == (m, b)  # equal counts across the batch
    kc, kt = masks.context.shape[-1], masks.targets.shape[-1]
    assert kc > sampler.min_keep and kt > sampler.min_keep  # min_keep honoured (after the truncation too)
    # block sizes: target area within the scale range (floor, rounding), aspect h / w near the range, inside the grid
    h, w = masks.target_size
    assert 1 <= h <= hg - 1 and 1 <= w <= wg - 1
    lo, hi = sampler.pred_scale
    assert int(hg * wg * lo) * 0.5 <= h * w <= hg * wg * hi * 1.6
    assert sampler.aspect[0] * 0.5 <= h / w <= sampler.aspect[1] * 2.0
    assert (h, w) in {sampler.block_size(u / 2000, sampler.pred_scale, sampler.aspect) for u in range(2001)}
    eh, ew = masks.context_size
    assert eh == ew and eh <= hg - 1
    assert kt <= h * w and kc <= eh * ew
    for idx in (*masks.context.flatten(0, 1), *masks.targets.flatten(0, 1)):
        assert int(idx.min()) >= 0 and int(idx.max()) < hg * wg
        assert bool((idx[1:] > idx[:-1]).all())  # ascending, no repeats
    for bi in range(b):  # each target's patches fit its h x w box; the context avoids every target of its image
        for t in masks.targets[:, bi]:
            rows, cols = t // wg, t % wg
            assert int(rows.max() - rows.min()) < h and int(cols.max() - cols.min()) < w
        if disjoint:
            taken = set(masks.targets[:, bi].flatten().tolist())
            for c in masks.context[:, bi]:
                assert taken.isdisjoint(c.tolist())


@pytest.mark.parametrize("grid", [14, 16])
def test_mask_properties_over_many_seeds(grid):
    sampler = MultiBlockMaskSampler(grid, **OFFICIAL)  # official settings: the context never needs relaxing
    for seed in range(60):
        _check_masks(sampler, b=1 + seed % 7, seed=seed, disjoint=True)


def test_mask_properties_small_grid_and_two_contexts():
    sampler = MultiBlockMaskSampler(8, min_keep=4)
    for seed in range(60):
        _check_masks(sampler, b=8, seed=seed, disjoint=False)  # 8 x 8: the relaxation may let the context overlap
    two = MultiBlockMaskSampler(16, n_enc=2, allow_overlap=True, min_keep=10)
    for seed in range(10):
        _check_masks(two, b=3, seed=seed, disjoint=False)


def test_masks_come_from_the_generator_only():
    sampler = MultiBlockMaskSampler(16, **OFFICIAL)
    torch.manual_seed(0)
    a = sampler(6, torch.Generator().manual_seed(123))
    torch.manual_seed(1)  # the global RNG plays no part
    b = sampler(6, torch.Generator().manual_seed(123))
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    c = sampler(6, torch.Generator().manual_seed(124))
    assert not (c.context.shape == a.context.shape and torch.equal(c.context, a.context))
    g = torch.Generator().manual_seed(5)  # the same generator state, saved and restored, gives the same masks
    state = g.get_state()
    d = sampler(4, g)
    g.set_state(state)
    e = sampler(4, g)
    assert torch.equal(d.targets, e.targets) and torch.equal(d.context, e.context)


def test_sampler_refuses_a_block_that_can_never_exceed_min_keep():
    with pytest.raises(ValueError, match="never finish"):
        MultiBlockMaskSampler(8, min_keep=10)  # a 3 x 3 target block holds 9 patches
    with pytest.raises(ValueError, match="at least 2 x 2"):
        MultiBlockMaskSampler(1)


# ------------------------------------------------------------------------------------------------------ the method


def _tiny(**overrides) -> IJEPA:
    torch.manual_seed(0)
    return IJEPA(**{**IJEPA.tiny, **overrides}).train()


@torch.no_grad()
def _perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))


def _reference_loss(method: IJEPA, imgs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss from the formula, each piece recomputed here: timm's forward_features of the target encoder (all
    patches), per-image indexing of the masks, the student's blocks on its context tokens, the predictor module.
    Also returns the same formula with the *student* as the target encoder (what a wrong target would give)."""
    masks = method.sampler(imgs.shape[0], torch.Generator().manual_seed(seed))
    ne, b, _ = masks.context.shape
    m = masks.targets.shape[0]

    def targets_of(vit):
        with torch.no_grad():
            h = vit.forward_features(imgs)  # [B, L, D]
        return torch.cat(
            [torch.stack([h[i, masks.targets[j, i]] for i in range(b)]) for j in range(m) for _ in range(ne)]
        )

    vit = method.backbone
    x = vit.patch_embed(imgs) + vit.pos_embed
    ctx = torch.cat([torch.stack([x[i, masks.context[e, i]] for i in range(b)]) for e in range(ne)])
    z = vit.norm(vit.blocks(ctx))
    pred = method.predictor(z, masks.context, masks.targets)
    return ijepa_loss(pred, targets_of(method.teacher.backbone)), ijepa_loss(pred, targets_of(vit))


@pytest.mark.parametrize("overrides", [{}, {"num_enc_masks": 2, "allow_overlap": True}], ids=["one", "two_contexts"])
def test_loss_equals_the_formula_with_a_perturbed_student(overrides):
    method = _tiny(**overrides)
    _perturb(method.backbone, seed=1)  # student != target encoder
    _perturb(method.predictor, seed=2)
    views = torch.randn(5, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = method.training_loss(make_batch(views, step=2, seed=7))
    ref, with_student = _reference_loss(method, views[:, 0], seed=7)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    assert abs(out["loss"].item() - with_student.item()) > 1e-3  # the target encoder is what the loss reads
    # the student's gradient is the formula's
    grads = torch.autograd.grad(out["loss"], [method.backbone.patch_embed.proj.weight, method.predictor.mask_token])
    ref_grads = torch.autograd.grad(ref, [method.backbone.patch_embed.proj.weight, method.predictor.mask_token])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_target_encoder_gets_no_gradient_and_positions_are_frozen():
    method = _tiny()
    out = method.training_loss(make_batch(torch.randn(4, 1, 3, 32, 32), seed=0))
    out["loss"].backward()
    for name, p in method.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert method.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert method.predictor.mask_token.grad.abs().sum() > 0
    assert not method.backbone.pos_embed.requires_grad and method.backbone.pos_embed.grad is None
    assert not method.predictor.pos_embed.requires_grad
    grouped = {id(p) for g in method.param_groups() for p in g["params"]}
    assert grouped.isdisjoint(id(p) for p in method.teacher.parameters())
    assert set(out) == {"loss", "momentum", "context_tokens", "target_tokens", "embeddings"}
    assert out["embeddings"]["backbone"].shape == (4, 32) and not out["embeddings"]["backbone"].requires_grad


def test_same_keyed_generator_same_masks_and_loss():
    views = torch.randn(4, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = _tiny(), _tiny()
    out_a = a.training_loss(make_batch(views, step=3, seed=11))
    torch.randn(100)  # the global RNG moves between the runs
    out_b = b.training_loss(make_batch(views, step=3, seed=11))
    assert out_a["loss"].item() == out_b["loss"].item()
    assert out_a["context_tokens"] == out_b["context_tokens"] and out_a["target_tokens"] == out_b["target_tokens"]
    other = a.training_loss(make_batch(views, step=3, seed=12))
    assert other["loss"].item() != out_a["loss"].item()


def test_momentum_is_linear_and_pooled_forward_is_the_mean_of_normed_tokens():
    method = _tiny()
    assert method.teacher.tau_at(0, 100) == pytest.approx(0.996)
    assert method.teacher.tau_at(50, 100) == pytest.approx(0.998)
    assert method.teacher.tau_at(100, 100) == pytest.approx(1.0)
    assert method.teacher.tau_at(250, 100) == pytest.approx(1.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method(x), encode_tokens(method.backbone, x).mean(1))
        torch.testing.assert_close(encode_tokens(method.backbone, x), method.backbone.forward_features(x))
    with pytest.raises(ValueError, match="class token"):
        IJEPA(backbone={"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2}})  # fmt: skip


# ------------------------------------------------------------------------------------------------------ DDP

WORLD, B, K, D_IN, D = 2, 8, 5, 6, 4


def _ddp_data() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D), torch.randn(B, K, D_IN), 3 * torch.randn(B, K, D) + 1


def _ddp_worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        model, x, target = _ddp_data()
        ddp = DDP(model)
        sl = slice(r * (B // WORLD), (r + 1) * (B // WORLD))
        loss = ijepa_loss(ddp(x[sl]), target[sl])
        loss.backward()
        result["weight"], result["bias"] = model.weight.grad.clone(), model.bias.grad.clone()


def test_ddp_gradient_equals_single_process(tmp_path):
    results: list[dict[str, Any]] = run_spawned(_ddp_worker, WORLD, tmp_path)
    model, x, target = _ddp_data()
    ijepa_loss(model(x), target).backward()
    assert model.weight.grad.abs().max() > 1e-3
    for res in results:
        torch.testing.assert_close(res["weight"], model.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["bias"], model.bias.grad, rtol=1e-5, atol=1e-7)
