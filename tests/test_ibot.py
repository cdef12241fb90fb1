"""iBOT and the DINOv2 configuration: the losses by hand (ibot_patch_loss, koleo_loss, masked_sinkhorn_knopp), the
block-wise masks over many seeds, the method against the loss functions recomputed from its modules (student
perturbed), the mask token at the masked patches only, the centres, the DINOv2 step, and real 2-process gloo DDP
for the losses (gradients, centre and masked Sinkhorn-Knopp at the same global batch as one process)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from ddp_harness import gloo_rank, run_spawned
from method_cases import make_batch, random_views
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from selfsup.losses.dino import dino_batch_mean, dino_center_update, dino_loss
from selfsup.losses.ibot import ibot_patch_loss, masked_patch_cross_entropy, masked_sinkhorn_knopp
from selfsup.losses.koleo import koleo_loss
from selfsup.losses.swav import sinkhorn_knopp
from selfsup.methods.ibot import IBOT, vit_tokens
from selfsup.models.blockwise_mask import BlockwiseMaskGenerator, block_mask


# ------------------------------------------------------------------------------------------------ losses by hand
def test_ibot_patch_loss_by_hand():
    tau_s = 0.1
    # image 0: patch 0 masked; image 1: no patch masked (contributes 0); teacher uniform at every patch
    student = torch.zeros(2, 2, 2)
    student[0, 0] = torch.tensor([0.0, math.log(3.0) * tau_s])  # softmax(s/τs) = (1/4, 3/4)
    student[0, 1] = torch.tensor([5.0, -5.0])  # unmasked: ignored
    student[1] = torch.randn(2, 2)
    teacher = torch.zeros(2, 2, 2)
    mask = torch.tensor([[True, False], [False, False]])
    ce0 = -0.5 * (math.log(0.25) + math.log(0.75))
    loss = ibot_patch_loss(student, teacher, mask, torch.zeros(2), student_temp=tau_s, teacher_temp=0.04)
    assert loss.item() == pytest.approx(ce0 / 2, rel=1e-5)
    # a centre and a sharp teacher: t = softmax(([1, 0] − [0.5, 0]) / 0.5) = (e, 1)/(e + 1); two masked patches
    teacher[0, 0] = torch.tensor([1.0, 0.0])
    teacher[0, 1] = torch.tensor([1.0, 0.0])
    student[0, 1] = student[0, 0]
    mask = torch.tensor([[True, True], [True, False]])
    t0 = math.e / (math.e + 1)
    ce_sharp = -(t0 * math.log(0.25) + (1 - t0) * math.log(0.75))
    ls1 = F.log_softmax(student[1, 0] / tau_s, dim=-1)
    t1 = F.softmax((torch.zeros(2) - torch.tensor([0.5, 0.0])) / 0.5, dim=-1)
    ce1 = -(t1 * ls1).sum().item()
    loss = ibot_patch_loss(student, teacher, mask, torch.tensor([0.5, 0.0]), student_temp=tau_s, teacher_temp=0.5)
    assert loss.item() == pytest.approx((ce_sharp + ce1) / 2, rel=1e-5)
    # every patch masked with equal rows: the plain cross-entropy; nothing masked at all: exactly 0
    assert ibot_patch_loss(student, teacher, torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2)).item() == 0.0
    with pytest.raises(TypeError, match="bool"):
        ibot_patch_loss(student, teacher, mask.float(), torch.zeros(2))
    with pytest.raises(FloatingPointError, match="teacher contains NaN"):
        ibot_patch_loss(student, torch.full_like(teacher, float("nan")), mask, torch.zeros(2))


def test_ibot_patch_loss_gradient_reaches_masked_student_patches_only():
    student = torch.randn(3, 4, 5, requires_grad=True)
    mask = torch.rand(3, 4) < 0.5
    mask[0, 0] = True
    ibot_patch_loss(student, torch.randn(3, 4, 5), mask, torch.randn(5)).backward()
    assert (student.grad[~mask] == 0).all() and (student.grad[mask].abs().sum(-1) > 0).all()


def test_koleo_by_hand():
    # e1, e2, −e1: nearest others e2 (for e1 and −e1, dot 0 > −1) and e1 (for e2, tie broken by the first index);
    # every distance sqrt(2): loss = −log sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)
    assert koleo_loss(3.0 * x).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)  # rows normalised first
    t = 0.3  # two rows at angle t: chord 2 sin(t/2)
    two = torch.tensor([[1.0, 0.0], [math.cos(t), math.sin(t)]], dtype=torch.float64)
    assert koleo_loss(two).item() == pytest.approx(-math.log(2 * math.sin(t / 2)), rel=1e-6)
    # equal rows: distance = PairwiseDistance's eps·sqrt(D), as the official (huge but finite)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert koleo_loss(same).item() == pytest.approx(-math.log(1e-8 * math.sqrt(2) + 1e-8), rel=1e-6)
    # the official formula on random rows (nearest neighbour by inner product, PairwiseDistance(2, eps=1e-8))
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, 8, generator=g)
    z = F.normalize(r, dim=-1, eps=1e-8)
    dots = z @ z.T
    dots.view(-1)[::17].fill_(-1)
    ref = -torch.log(nn.PairwiseDistance(2, eps=1e-8)(z, z[dots.argmax(1)]) + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(r), ref)
    with pytest.raises(ValueError, match="N >= 2"):
        koleo_loss(torch.randn(1, 4))


def test_masked_sinkhorn_knopp_by_hand_and_as_sinkhorn_knopp():
    codes = masked_sinkhorn_knopp(torch.zeros(3, 2), teacher_temp=0.1)
    torch.testing.assert_close(codes, torch.full((3, 2), 0.5))
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 5, generator=g)
    got = masked_sinkhorn_knopp(s, teacher_temp=0.07, iters=3)
    torch.testing.assert_close(got, sinkhorn_knopp(s, epsilon=0.07, iters=3))
    torch.testing.assert_close(got.sum(1), torch.ones(7))
    # DINOv2's sinkhorn_knopp_teacher written out (single process, no max shift)
    q = torch.exp(s / 0.07).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(1, keepdim=True)
        q /= 5
        q /= q.sum(0, keepdim=True)
        q /= 7
    torch.testing.assert_close(got, (q * 7).T)
    assert masked_sinkhorn_knopp(torch.zeros(0, 5), teacher_temp=0.07).shape == (0, 5)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("sampler", ["ibot", "dinov2"])
def test_block_masks_over_many_seeds(sampler):
    gen = BlockwiseMaskGenerator(0.3, 0.2, 1.0 if sampler == "ibot" else 0.5, sampler=sampler)
    state = torch.random.get_rng_state()
    py_state = random.getstate()
    ratios = []
    for seed in range(200):
        masks = gen(8, (14, 14), torch.Generator().manual_seed(seed))
        again = gen(8, (14, 14), torch.Generator().manual_seed(seed))
        assert torch.equal(masks, again), "a pure function of the generator"
        counts = masks.sum(1)
        assert masks.shape == (8, 196) and masks.dtype == torch.bool
        assert (counts <= int(0.5 * 196)).all(), "never above the largest ratio"
        if sampler == "ibot":
            assert (counts >= 1).all(), "every crop masked (mask_probability 1, target >= 19.6 patches)"
        else:
            assert int((counts > 0).sum()) <= 4 and int((counts >= 4).sum()) >= 1
        ratios += [c / 196 for c in counts.tolist() if c > 0]
    assert min(ratios) + 0.05 >= 0.1 and max(ratios) <= 0.5
    assert 0.2 < sum(ratios) / len(ratios) < 0.35  # U(0.1, 0.5) targets, each met or slightly undershot
    assert torch.equal(torch.random.get_rng_state(), state) and random.getstate() == py_state, "no global RNG"
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(gen(8, (14, 14), g), gen(8, (14, 14), g)), "the generator advances"


def test_block_mask_targets_and_block_aspect_ratios():
    for seed in range(300):
        rng = random.Random(seed)
        target = rng.uniform(16, 40)
        mask = torch.tensor(block_mask(14, 14, target, rng, min_block=16.0))
        n = int(mask.sum())
        assert 0 < n <= target
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        if h * w == n:  # one rectangle: h = round(sqrt(A·a)), w = round(sqrt(A/a)), a in (0.3, 1/0.3)
            assert 0.2 <= h / w <= 5.0, (seed, h, w)
            assert h < 14 and w < 14


# ------------------------------------------------------------------------------------------------ the method
def _perturbed(kwargs, seed=0) -> IBOT:
    torch.manual_seed(seed)
    m = IBOT(**kwargs).train()
    with torch.no_grad():  # student != teacher; non-zero centres
        for name, p in m.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        m.mask_token.normal_()
        m.center.normal_()
        m.center2.normal_()
    return m


@pytest.mark.parametrize("patch_head", ["shared", "last_layer", "separate"])
def test_loss_equals_the_loss_functions_on_the_modules(patch_head):
    kw = {**IBOT.tiny, "patch_head": patch_head, "patch_out_dim": 32 if patch_head == "shared" else 24}
    m = _perturbed(kw)
    views = random_views(IBOT, b=4, seed=1)
    batch = make_batch(views, step=7, seed=3, steps_per_epoch=5)  # epoch 1: inside the temperature warm-up
    c0, c20 = m.center.clone(), m.center2.clone()
    out = m.training_loss(batch)
    x = views.flatten(0, 1)
    mask = m.masks(8, (4, 4), torch.Generator().manual_seed(3))
    assert torch.equal(out["mask_ratio"], mask.float().mean()) and mask.any()
    tok = vit_tokens(m.backbone, x, mask, m.mask_token)
    tt = vit_tokens(m.teacher.backbone, x)
    s_cls, t_cls = m.head(tok[:, 0]).view(4, 2, -1), m.teacher.head(tt[:, 0]).view(4, 2, -1)
    if patch_head == "shared":
        s_p, t_p = m.head(tok[:, 1:]), m.teacher.head(tt[:, 1:])
    elif patch_head == "last_layer":
        s_p, t_p = (
            m.patch_last_layer(m.head.project(tok[:, 1:])),
            m.teacher.patch_last_layer(m.teacher.head.project(tt[:, 1:])),
        )
    else:
        s_p, t_p = m.patch_head(tok[:, 1:]), m.teacher.patch_head(tt[:, 1:])
    temp = 0.04 + (0.04 - 0.04) / 29  # teacher_temp 0.04 in tiny: no change
    temp2 = 0.04 + (0.07 - 0.04) * 1 / 29  # linspace(0.04, 0.07, 30)[1]
    assert out["teacher_patch_temp"] == pytest.approx(temp2)
    expected = dino_loss(s_cls, t_cls, c0, teacher_temp=temp) + ibot_patch_loss(s_p, t_p, mask, c20, teacher_temp=temp2)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cls_loss"], dino_loss(s_cls, t_cls, c0, teacher_temp=temp).detach())
    # the centres moved with this step's (single-process = global) batch means: c ← 0.9 c + 0.1 mean
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t_cls.mean(dim=(0, 1)))
    torch.testing.assert_close(m.center2, 0.9 * c20 + 0.1 * t_p.mean(dim=(0, 1)))
    torch.testing.assert_close(m.center2, dino_center_update(c20, t_p, 0.9, batch_mean=dino_batch_mean(t_p)))
    # the student's gradient equals the formula's
    grads = torch.autograd.grad(out["loss"], [m.mask_token, m.backbone.patch_embed.proj.weight], retain_graph=True)
    ref = torch.autograd.grad(expected, [m.mask_token, m.backbone.patch_embed.proj.weight])
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in m.teacher.parameters())


def test_mask_token_appears_only_at_masked_patches():
    m = _perturbed(IBOT.tiny)
    seen = []
    for vit in (m.backbone, m.teacher.backbone):  # record what enters the position embedding
        vit._pos_embed = lambda t, f=vit._pos_embed: (seen.append(t.detach().clone()), f(t))[1]
    views = random_views(IBOT, b=3, seed=2)
    m.training_loss(make_batch(views, seed=5))
    mask = m.masks(6, (4, 4), torch.Generator().manual_seed(5))
    student_in, teacher_in = seen[0].reshape(6, 16, -1), seen[1].reshape(6, 16, -1)
    embedded = m.backbone.patch_embed(views.flatten(0, 1)).reshape(6, 16, -1)
    assert mask.any() and (~mask).any()
    assert torch.equal(student_in[mask], m.mask_token.detach().expand(int(mask.sum()), -1))
    torch.testing.assert_close(student_in[~mask], embedded[~mask].detach())
    assert not (student_in[~mask] == m.mask_token.detach()).all(-1).any()
    teacher_embedded = m.teacher.backbone.patch_embed(views.flatten(0, 1)).reshape(6, 16, -1)
    torch.testing.assert_close(teacher_in, teacher_embedded, msg="the teacher sees the clean crops")


def test_pred_start_epoch_and_local_crops():
    m = _perturbed({**IBOT.tiny, "pred_start_epoch": 2, "backbone": {**IBOT.tiny["backbone"],
                    "kwargs": {**IBOT.tiny["backbone"]["kwargs"], "dynamic_img_size": True}}})  # fmt: skip
    batch = make_batch(random_views(IBOT, b=2, seed=0), step=0)
    batch.local_views = torch.randn(2, 3, 3, 16, 16)
    out = m.training_loss(batch)
    assert out["mask_ratio"].item() == 0.0 and out["patch_loss"].item() == 0.0  # no masks before epoch 2
    assert out["teacher_patch_temp"] == pytest.approx(0.04)
    out["loss"].backward()
    assert m.head.mlp[0].weight.grad.abs().sum() > 0


def test_dinov2_configuration_builds_and_trains_a_step():
    kw = {**IBOT.tiny, **IBOT.tiny_variants["dinov2"]}
    kw["backbone"] = {"name": "vit_tiny", "kwargs": {**IBOT.tiny["backbone"]["kwargs"], "init_values": 1e-5}}
    torch.manual_seed(0)
    m = IBOT(**kw).train()
    assert m.backbone.blocks[0].ls1.gamma.detach().eq(1e-5).all(), "layer scale (timm init_values)"
    groups = m.param_groups()
    mults = {g["name"]: g["lr_mult"] for g in groups}
    assert mults["layer2"] == 1.0 and mults["layer1"] == pytest.approx(0.9)
    assert mults["layer0"] == pytest.approx(0.81) and mults["layer0_patch_embed"] == pytest.approx(0.81 * 0.2)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 1e-3 * g["lr_mult"]} for g in groups])
    c, c2 = m.center.clone(), m.center2.clone()
    batch = make_batch(random_views(IBOT, b=4, seed=1), seed=2)
    out = m.training_loss(batch)
    assert set(out) >= {"loss", "cls_loss", "patch_loss", "koleo_loss", "embeddings"}
    assert torch.equal(m.center, c) and torch.equal(m.center2, c2), "sinkhorn centering: the centres are unused"
    h = out["embeddings"]["backbone"]
    koleo = koleo_loss(h[:, 0]) + koleo_loss(h[:, 1])
    torch.testing.assert_close(out["koleo_loss"], koleo)
    torch.testing.assert_close(out["loss"].detach(), out["cls_loss"] + out["patch_loss"] + 0.1 * koleo)
    out["loss"].backward()
    before = m.patch_head.mlp[0].weight.detach().clone()
    opt.step()
    m.on_train_step_end(0, 10)
    assert not torch.equal(before, m.patch_head.mlp[0].weight) and math.isfinite(out["loss"].item())
    assert m.frozen(0, 0) and all(p.requires_grad is not None for p in m.frozen(0, 0))


def test_sinkhorn_targets_in_the_method_are_the_codes():
    kw = {**IBOT.tiny, "centering": "sinkhorn", "patch_head": "separate", "patch_out_dim": 24}
    m = _perturbed(kw)
    views = random_views(IBOT, b=4, seed=1)
    out = m.training_loss(make_batch(views, seed=4))
    x = views.flatten(0, 1)
    mask = m.masks(8, (4, 4), torch.Generator().manual_seed(4))
    tok, tt = vit_tokens(m.backbone, x, mask, m.mask_token), vit_tokens(m.teacher.backbone, x)
    t_p = m.teacher.patch_head(tt[:, 1:])
    targets = torch.zeros_like(t_p)
    targets[mask] = sinkhorn_knopp(t_p[mask], epsilon=0.04)  # one process: the plain Sinkhorn of the masked rows
    expected = masked_patch_cross_entropy(m.patch_head(tok[:, 1:]), targets, mask)
    torch.testing.assert_close(out["patch_loss"], expected.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ real DDP
WORLD, PER, N, K, D = 2, 3, 5, 4, 6


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "x": torch.randn(WORLD * PER, N, D, generator=g),
        "teacher": 2.0 * torch.randn(WORLD * PER, N, K, generator=g),
        "mask": torch.tensor(
            [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0]]
        ).bool(),  # 9 masked patches on rank 0, 4 on rank 1; a crop without
        "center": 0.3 * torch.randn(K, generator=g),
        "head": nn.Linear(D, K),
        "feat": nn.Linear(D, D),
    }


def _patch_run(head, x, teacher, mask, center):
    return ibot_patch_loss(head(x), teacher, mask, center, teacher_temp=0.07)


def _koleo_run(feat, x):
    return koleo_loss(feat(x[:, 0]))


def _ddp_worker(r: int, port: int, out_dir: str) -> None:
    with gloo_rank(r, port, WORLD, out_dir) as result:
        d = _ddp_data()
        sl = slice(r * PER, (r + 1) * PER)
        head = DDP(d["head"])
        loss = _patch_run(head, d["x"][sl], d["teacher"][sl], d["mask"][sl], d["center"])
        loss.backward()
        result["patch_grad"] = d["head"].weight.grad.clone()
        result["center2"] = dino_center_update(
            d["center"], d["teacher"][sl], 0.9, batch_mean=dino_batch_mean(d["teacher"][sl])
        )
        feat = DDP(d["feat"])
        _koleo_run(feat, d["x"][sl]).backward()
        result["koleo_grad"] = d["feat"].weight.grad.clone()
        rows = d["teacher"][sl][d["mask"][sl]]  # a different number of masked patches on each rank
        result["n_rows"] = rows.shape[0]
        result["codes"] = masked_sinkhorn_knopp(rows, teacher_temp=0.5)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_spawned(_ddp_worker, WORLD, tmp_path_factory.mktemp("ddp_ibot"), timeout=180)


def test_ddp_patch_loss_gradient_and_centre_equal_the_global_batch(ddp_results):
    d = _ddp_data()
    _patch_run(d["head"], d["x"], d["teacher"], d["mask"], d["center"]).backward()
    center = dino_center_update(d["center"], d["teacher"], 0.9)
    for res in ddp_results:
        torch.testing.assert_close(res["patch_grad"], d["head"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["center2"], center, rtol=1e-6, atol=1e-6)
    local_center = dino_center_update(d["center"], d["teacher"][:PER], 0.9)
    assert not torch.allclose(local_center, center), "the comparison has teeth"


def test_ddp_koleo_is_per_rank_as_dinov2(ddp_results):
    d = _ddp_data()
    x = d["x"]
    ref = (_koleo_run(d["feat"], x[:PER]) + _koleo_run(d["feat"], x[PER:])) / 2  # DDP averages per-rank KoLeo
    ref.backward()
    for res in ddp_results:
        torch.testing.assert_close(res["koleo_grad"], d["feat"].weight.grad, rtol=1e-5, atol=1e-6)


def test_ddp_masked_sinkhorn_equals_one_process_with_unequal_counts(ddp_results):
    d = _ddp_data()
    rows = d["teacher"][d["mask"]]
    full = masked_sinkhorn_knopp(rows, teacher_temp=0.5)
    n0 = ddp_results[0]["n_rows"]
    assert n0 != ddp_results[1]["n_rows"], "unequal masked counts per rank"
    torch.testing.assert_close(
        torch.cat([ddp_results[0]["codes"], ddp_results[1]["codes"]]), full, rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(ddp_results[0]["codes"], masked_sinkhorn_knopp(rows[:n0], teacher_temp=0.5))
