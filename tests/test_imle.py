"""IMLE-SSL: the method against the MAE and the selection rule, planned epochs, n-way n-shot pretraining data,
resume inside an IMLE epoch, validation monitors and the reconstruction grid for several codes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from kill_harness import pretrain_killed_at

from selfsup.cli import main
from selfsup.data.rounds import EpochPlan, RoundSampler, epoch_examples, rank_examples, steps_per_epoch
from selfsup.engine.optim import method_param_groups
from selfsup.losses.imle import imle_select
from selfsup.methods import IMLE, MAE
from selfsup.methods.base import Batch, EpochExamples

VIT = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
DEC = {"width": 32, "depth": 1, "heads": 2}
LATENT = {"inject": [[1, "adain"]], "code_dim": 8, "mapping": {"depth": 2, "hidden": 16, "lr_mul": 0.5}}


def _imle(seed=0, **kw) -> IMLE:
    torch.manual_seed(seed)
    args = dict(
        backbone=VIT,
        decoder=DEC,
        latent=LATENT,
        examples_per_epoch=12,
        iterations_per_epoch=3,
        num_codes=6,
        codes_per_round=3,
        code_batch=5,
        search_precision="fp32",
    )
    args.update(kw)
    return IMLE(**args)


def _images(n=12, seed=0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prepare(m: IMLE, x: torch.Tensor, seed=1) -> dict:
    ex = EpochExamples(
        views=x[:, None],
        labels=torch.full((x.shape[0],), -1),
        indices=torch.arange(100, 100 + len(x)),
        epoch=0,
        step=0,
        generator=torch.Generator().manual_seed(seed),
    )
    return m.prepare_epoch(ex)


def test_codes_ignored_equals_the_mae_exactly():
    """Same seed: the IMLE's encoder and decoder are the MAE's; scoring with codes ignored is the MAE's per-sample
    loss bit for bit, and so is forward_loss outside a codes block (the hooks do nothing)."""
    torch.manual_seed(0)
    mae = MAE(backbone=VIT, decoder=DEC)
    imle = _imle(0)
    x = _images(6)
    mk = mae.draw_masking(6, torch.Generator().manual_seed(3))
    ref = mae.forward_loss(x, mk, reduction="none")
    assert torch.equal(imle.score_codes(x, mk, None)[:, 0], ref.loss)
    out = imle.forward_loss(x, mk, reduction="none")
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.pred, ref.pred)
    z = imle.latent.sample_codes(6, torch.Generator().manual_seed(4))
    assert not torch.equal(imle.score_codes(x, mk, z)[:, 0], ref.loss)  # codes do change the output


def test_scoring_k_codes_in_one_pass_equals_one_code_at_a_time():
    m = _imle(0)
    x = _images(4)
    mk = m.draw_masking(4, torch.Generator().manual_seed(3))
    z = m.latent.sample_codes(4 * 3, torch.Generator().manual_seed(5))  # [4·3, 1, 8], example-major
    scores = m.score_codes(x, mk, z)  # [4, 3]
    for i in range(4):
        for j in range(3):
            one = m.score_codes(x[i : i + 1], mk.rows(slice(i, i + 1)), z[i * 3 + j : i * 3 + j + 1])
            torch.testing.assert_close(scores[i, j], one[0, 0], rtol=1e-5, atol=1e-6)


def test_the_search_keeps_each_examples_first_strictly_best_code():
    """Replay the search's draws (masks, then sp codes per example per round, chunk by chunk) and score every code
    by hand: the kept code is imle_select's choice and the logged end loss its mean."""
    m = _imle(0)
    x = _images(12)
    logs = _prepare(m, x, seed=7)
    g = torch.Generator().manual_seed(7)
    mk = m.draw_masking(12, g)
    assert torch.equal(mk.keep, m._masking.keep)
    best, best_scores = [], []
    for c in range(0, 12, 5):  # code_batch 5
        n = min(5, 12 - c)
        rounds_z, rounds_s = [], []
        for _ in range(2):  # 6 codes in rounds of 3
            z = m.latent.sample_codes(n * 3, g)
            rounds_z.append(z.view(n, 3, 1, 8))
            rounds_s.append(m.score_codes(x[c : c + n], mk.rows(slice(c, c + n)), z))
        idx, score = imle_select(torch.cat(rounds_s, 1), 3)
        zs = torch.cat(rounds_z, 1)  # [n, 6, 1, 8]
        best.append(zs[torch.arange(n), idx])
        best_scores.append(score)
    assert torch.equal(m._codes, torch.cat(best))
    assert logs["end_loss"] == pytest.approx(torch.cat(best_scores).mean().item(), rel=1e-6)
    assert logs["end_loss"] <= logs["first_loss"]
    assert logs["codes_s"] > 0


def test_training_loss_uses_the_epochs_fixed_mask_and_chosen_code():
    m = _imle(0)
    x = _images(12)
    _prepare(m, x)
    rows = torch.tensor([7, 2, 9])
    batch = Batch(
        views=x[rows][:, None],
        labels=torch.full((3,), -1),
        indices=100 + rows,
        step=0,
        max_steps=10,
        epoch=0,
        generator=torch.Generator().manual_seed(99),
    )
    loss = m.training_loss(batch)["loss"]
    with m.latent.codes(m._codes[rows]):
        ref = m.forward_loss(x[rows], m._masking.rows(rows)).loss
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    mk = m._masking.rows(rows)
    torch.testing.assert_close(ref, m.score_codes(x[rows], mk, m._codes[rows]).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not prepared"):
        m.training_loss(
            Batch(
                views=x[:1, None],
                labels=torch.tensor([-1]),
                indices=torch.tensor([5]),
                step=0,
                max_steps=10,
                epoch=0,
                generator=torch.Generator(),
            )
        )


def test_mae_arm_has_no_codes_and_skips_the_search():
    m = _imle(0, ignore_codes=True)
    assert m.latent is None and not any(n.startswith("latent.") for n, _ in m.named_parameters())
    assert _prepare(m, _images(12)) == {}  # no search, nothing scored
    assert m._codes is None and m._masking.keep.shape == (12, 4)  # 16 patches, 4 kept


def test_mapping_net_gets_its_own_learning_rate():
    m = _imle(0, latent_lr_mult=0.1)
    groups = {g["name"]: g for g in method_param_groups(m, 1e-3, 0.05, exclude=True)}
    assert groups["latent"]["lr"] == pytest.approx(1e-4) and groups["mae"]["lr"] == pytest.approx(1e-3)
    latent = {id(p) for p in m.latent.parameters()}
    assert all(id(p) in latent for g in groups.values() if g["name"].startswith("latent") for p in g["params"])
    assert not any(id(p) in latent for g in groups.values() if g["name"].startswith("mae") for p in g["params"])


def test_bad_search_settings_are_named():
    with pytest.raises(ValueError, match="multiple of codes_per_round"):
        _imle(0, num_codes=10, codes_per_round=4)
    with pytest.raises(ValueError, match="iterations"):
        _imle(0, iterations_per_epoch=0)
    with pytest.raises(ValueError, match="IMLE takes exactly 1 view per image, got 2"):
        _imle(0).prepare_epoch(
            EpochExamples(
                views=_images(4)[:, None].expand(-1, 2, -1, -1, -1),
                labels=torch.zeros(4),
                indices=torch.arange(4),
                epoch=0,
                step=0,
                generator=torch.Generator(),
            )
        )


# --------------------------------------------------------------------------------------------- planned epochs
def test_each_example_is_drawn_k_or_k_minus_one_times_and_ranks_split_the_epoch():
    plan = EpochPlan(examples=8, iterations=2)
    counts = Counter(i for e in range(7) for i in epoch_examples(20, plan, e, seed=3))  # 56 draws of 20 images
    assert set(counts) == set(range(20)) and set(counts.values()) <= {2, 3}
    assert epoch_examples(20, plan, 4, seed=3) == epoch_examples(20, plan, 4, seed=3)  # a pure function
    assert epoch_examples(20, plan, 4, seed=3) != epoch_examples(20, plan, 4, seed=4)
    r0, r1 = (rank_examples(20, plan, 1, 3, r, 2) for r in (0, 1))
    assert sorted(r0 + r1) == sorted(epoch_examples(20, plan, 1, 3)) and not set(r0) & set(r1)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        rank_examples(20, EpochPlan(9, 2), 0, 3, 0, 2)
    with pytest.raises(ValueError, match="exceed the 20 training images"):
        epoch_examples(20, EpochPlan(21, 2), 0, 3)


def test_epoch_steps_are_whole_passes_over_the_examples():
    # 24 examples, batch 4: 6 minibatches per pass; ipe 13 -> 2 passes = 12 steps; ipe 3 -> 1 pass = 6 steps
    assert steps_per_epoch(EpochPlan(24, 13), 4) == 12 and steps_per_epoch(EpochPlan(24, 3), 4) == 6
    assert steps_per_epoch(EpochPlan(24, 13), 4, world_size=2) == 12  # 12 per rank: 3 minibatches, 4 passes
    with pytest.raises(ValueError, match="larger than"):
        steps_per_epoch(EpochPlan(8, 2), 16)
    s = RoundSampler(50, EpochPlan(24, 13), 4, seed=1, epoch=2)
    keys = list(s)
    assert len(keys) == len(s) == 48 and {e for e, _ in keys} == {2}
    mine = [i for _, i in keys]
    assert Counter(mine) == Counter(epoch_examples(50, EpochPlan(24, 13), 2, 1) * 2)  # every example once a pass
    assert mine[:24] != mine[24:]  # each pass shuffled anew
    s.start = lambda e: 8  # a resumed epoch skips the batches already trained on
    assert [i for _, i in s] == mine[8:]


# --------------------------------------------------------------------------------------------- end to end
VIT_ARG = "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}}"
MAE_ARGS = ["--method.init_args.backbone", VIT_ARG, "--method.init_args.decoder", "{width: 32, depth: 1, heads: 2}"]
IMLE_ARGS = [
    "--method",
    "IMLE",
    *MAE_ARGS,
    "--method.init_args.latent",
    "{inject: [[1, adain]], code_dim: 8, mapping: {depth: 2, hidden: 16}}",
    "--method.init_args.examples_per_epoch",
    "40",
    "--method.init_args.iterations_per_epoch",
    "4",
    "--method.init_args.num_codes",
    "6",
    "--method.init_args.codes_per_round",
    "3",
    "--method.init_args.code_batch",
    "16",
    "--method.init_args.search_precision",
    "fp32",
]
COMMON = [
    "--data.dataset",
    "folder",
    "--data.batch_size",
    "10",
    "--data.views",
    "1",
    "--data.augment",
    "mae_cifar",
    "--data.view_mode",
    "batched",
    "--data.in_memory",
    "true",
    "--data.num_workers",
    "0",
    "--optim.name",
    "adamw",
    "--optim.lr",
    "2e-3",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
    "--trainer.seed",
    "5",
    "--monitor.every_n_epochs",
    "0",
    "--monitor.spectrum_every_n_steps",
    "0",
]
BASE = [*IMLE_ARGS, *COMMON]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_inside_an_imle_epoch_equals_the_uninterrupted_run(tmp_path, cifar_slice):
    """3 epochs of 4 steps; step checkpoints every 3 steps; SIGKILL at step 7, so the newest checkpoint (step 6) is
    in the middle of epoch 1, after its search. The resumed run must train on the same views, masks and codes
    (restored, not searched again with the mid-epoch weights) and end with the same weights."""
    args = [*BASE, "--data.root", str(cifar_slice), "--trainer.max_epochs", "3", "--trainer.save_every_n_steps", "3"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(7, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    mid = _state(run_b / "checkpoints" / "last.ckpt")
    assert mid["global_step"] == 6
    (state,) = mid["selfsup_rank_state"]  # one process: one rank's epoch state
    assert state["epoch"] == 1 and state["codes"].shape == (40, 1, 8) and state["indices"].shape == (40,)
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = _state(run_a / "checkpoints" / "last.ckpt"), _state(run_b / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    assert any(k.startswith("method.latent.") for k in a["state_dict"])
    for k in a["state_dict"]:
        torch.testing.assert_close(
            b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=f"resumed run differs at {k}"
        )
    torch.testing.assert_close(b["selfsup_rank_state"][0]["codes"], a["selfsup_rank_state"][0]["codes"])


def test_imle_on_an_nway_nshot_subset_with_monitors_init_from_mae_and_code_grid(tmp_path, cifar_slice):
    """A 5-way 8-shot subset (40 images = one epoch's examples), started from an MAE checkpoint: the baseline
    (codes ignored, before training) is that MAE's held-out loss; few-shot and held-out losses are logged; the
    reconstruction grid has one column per code."""
    from selfsup.reconstruct import load_method

    common = [*COMMON, "--data.root", str(cifar_slice), "--trainer.logger", "csv"]
    mae_run = tmp_path / "mae"
    assert (
        main(
            [
                "pretrain",
                "--method",
                "MAE",
                *MAE_ARGS,
                *common,
                "--trainer.max_steps",
                "3",
                "--trainer.out_dir",
                str(mae_run),
            ]
        )
        == 0
    )
    mae_ckpt = mae_run / "checkpoints" / "last.ckpt"
    run = tmp_path / "imle"
    assert (
        main(
            [
                "pretrain",
                *IMLE_ARGS,
                *common,
                "--method.init_args.init_from",
                str(mae_ckpt),
                "--data.n_way",
                "5",
                "--data.n_shot",
                "8",
                "--trainer.max_epochs",
                "2",
                "--monitor.recon_every_n_epochs",
                "1",
                "--monitor.recon_examples",
                "20",
                "--monitor.recon_codes",
                "4",
                "--monitor.fewshot_every_n_epochs",
                "2",
                "--monitor.fewshot",
                "{n_way: 5, n_shot: 2, n_query: 3, episodes: 4}",
                "--trainer.out_dir",
                str(run),
            ]
        )
        == 0
    )
    import csv

    rows = list(csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines()))
    baseline = [float(r["val/recon_loss_baseline"]) for r in rows if r.get("val/recon_loss_baseline")]
    recon = [float(r["val/recon_loss"]) for r in rows if r.get("val/recon_loss")]
    fewshot = [float(r["fewshot/acc"]) for r in rows if r.get("fewshot/acc")]
    assert len(baseline) == 1 and len(recon) == 2 and len(fewshot) == 1 and 0 <= fewshot[0] <= 100
    # the baseline is the MAE checkpoint's own held-out loss (same images, same seeded masks)
    mae, _ = load_method(mae_ckpt)
    from selfsup.data.build import build_eval_dataset
    from selfsup.engine.config import DataConfig

    data = DataConfig(dataset="folder", root=str(cifar_slice), augment="mae_cifar", n_way=5, n_shot=8, views=1)
    held = build_eval_dataset(data, "test", limit=20)
    assert len(held) == 20 and set(held.targets) <= set(range(5))  # the pretraining classes only
    x = torch.stack([held[i][0] for i in range(20)])
    ref = mae.heldout_loss(x, torch.Generator().manual_seed(5), 0).mean().item()
    assert baseline[0] == pytest.approx(ref, rel=1e-5)
    epochs = [r for r in rows if r.get("epoch/end_loss")]
    assert len(epochs) == 2 and all(float(r["epoch/end_loss"]) <= float(r["epoch/first_loss"]) for r in epochs)

    ckpt = run / "checkpoints" / "last.ckpt"
    # a resumed run does not need its init_from file again (its weights come from the checkpoint)
    mae_ckpt.rename(mae_ckpt.with_name("moved.ckpt"))
    assert (
        main(
            [
                "pretrain",
                *IMLE_ARGS,
                *common,
                "--method.init_args.init_from",
                str(mae_ckpt),
                "--data.n_way",
                "5",
                "--data.n_shot",
                "8",
                "--trainer.max_epochs",
                "3",
                "--trainer.out_dir",
                str(run),
                "--trainer.resume",
                "true",
            ]
        )
        == 0
    )
    assert _state(ckpt)["global_step"] == 12
    res = main(
        [
            "reconstruct",
            "--checkpoint",
            str(ckpt),
            "--codes",
            "3",
            "--num_images",
            "2",
            "--output",
            str(tmp_path / "grid.png"),
        ]
    )
    assert res == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 + 5 * 34, 2 + 2 * 34)  # 5 columns: original, masked, 3 codes
    assert (
        main(
            [
                "fewshot",
                "--checkpoint",
                str(ckpt),
                "--fewshot.n_way",
                "5",
                "--fewshot.n_shot",
                "2",
                "--fewshot.episodes",
                "3",
                "--fewshot.n_query",
                "3",
                "--output",
                str(tmp_path / "fs.json"),
            ]
        )
        == 0
    )


def test_ddp_two_processes_search_their_own_shares_of_the_epoch(tmp_path, cifar_slice):
    """2-process gloo DDP: each rank searches and trains on its half of the epoch's 40 examples (disjoint, together
    the epoch's draw); both ranks' codes are in the checkpoint; 20 examples per rank, batch 10: 2 minibatches a
    pass, ipe 4 -> 2 passes = 4 steps per epoch."""
    run = tmp_path / "ddp"
    assert (
        main(
            [
                "pretrain",
                *BASE,
                "--data.root",
                str(cifar_slice),
                "--trainer.strategy",
                "ddp_spawn",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "2",
                "--trainer.max_epochs",
                "1",
                "--trainer.out_dir",
                str(run),
            ]
        )
        == 0
    )
    ckpt = _state(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    states = ckpt["selfsup_rank_state"]
    assert len(states) == 2 and all(s["epoch"] == 0 and s["codes"].shape == (20, 1, 8) for s in states)
    r0, r1 = (s["indices"].tolist() for s in states)
    plan = EpochPlan(40, 4)
    assert r0 == rank_examples(200, plan, 0, 5, 0, 2) and r1 == rank_examples(200, plan, 0, 5, 1, 2)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(epoch_examples(200, plan, 0, 5))
    assert not torch.equal(states[0]["codes"], states[1]["codes"])
