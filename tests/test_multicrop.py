"""Multi-crop views (issue 15): global and local view groups of different sizes in both view modes, keyed like
single-size views (the same numbers for the same key, the global group drawn first), handed to the method as
``Batch.views`` / ``Batch.local_views``, and exact on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_args import TINY_MMCR
from kill_harness import pretrain_killed_at
from method_cases import LocalViewsMMCR
from PIL import Image

from selfsup.cli import main
from selfsup.data.batched import BatchedViews
from selfsup.data.build import MapDataset, local_pipelines, open_source, train_pipelines, view_makers
from selfsup.data.keyed import KeyedDataset
from selfsup.data.multicrop import BatchedMultiCrop, MultiCrop, split_views
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.pretrain import pretrain
from selfsup.methods import MMCR

TESTS = Path(__file__).resolve().parent
#: DINO's presets at CIFAR size: 2 global views of 32 px, 4 local views of 16 px.
MULTI = dict(
    views=2,
    augment="dino",
    augment_overrides={"crop_size": 32},
    local_views=4,
    local_augment="dino_local",
    local_augment_overrides={"crop_size": 16},
)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cifar10", root=str(root), batch_size=8, num_workers=0, **{**MULTI, **kw})


def _image(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_local_views_need_a_preset_and_keep_their_own_size():
    with pytest.raises(ValueError, match="data.local_views = 4 needs data.local_augment"):
        local_pipelines(DataConfig(local_views=4))
    with pytest.raises(ValueError, match="unknown Augment field"):
        local_pipelines(DataConfig(local_views=4, local_augment="dino_local", local_augment_overrides={"size": 3}))
    assert local_pipelines(DataConfig()) is None
    cfg = DataConfig(**MULTI)
    assert [p.crop_size for p in train_pipelines(cfg)] == [32, 32] and [p.crop_size for p in local_pipelines(cfg)] == [
        16
    ]
    assert local_pipelines(cfg)[0].scale == (0.05, 0.4)  # DINO's local scale, kept under the size override


def test_per_image_multicrop_shapes_and_keyed_draws():
    transform, maker = view_makers(DataConfig(**MULTI, view_mode="per_image"), geometry=False)
    assert isinstance(transform, MultiCrop) and maker is None
    ds = KeyedDataset(MapDataset([(_image(0), 0), (_image(1), 1)], transform), seed=3)
    (g, loc), _, i = ds[(5, 0)]
    assert g.shape == (2, 3, 32, 32) and loc.shape == (4, 3, 16, 16) and i == 0
    (g2, loc2), _, _ = ds[(5, 0)]
    assert torch.equal(g, g2) and torch.equal(loc, loc2)  # the same key: the same crops
    (g3, loc3), _, _ = ds[(6, 0)]
    assert not torch.equal(g, g3) and not torch.equal(loc, loc3)  # another epoch: other crops
    assert not torch.equal(loc[0], loc[1])  # every local view its own crop


def test_batched_multicrop_draws_the_global_group_first():
    _, maker = view_makers(DataConfig(**MULTI, view_mode="batched"), geometry=False)
    assert isinstance(maker, BatchedMultiCrop)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g, loc = maker(images, torch.Generator().manual_seed(7))
    assert g.shape == (5, 2, 3, 32, 32) and loc.shape == (5, 4, 3, 16, 16)
    g2, loc2 = maker(images, torch.Generator().manual_seed(7))
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    alone = BatchedViews(train_pipelines(DataConfig(**MULTI)), 2)(images, torch.Generator().manual_seed(7))
    assert torch.equal(g, alone)  # the global group takes the generator's first numbers, as without local views


def test_loader_crops_for_images_that_cannot_be_stacked(cifar_slice):
    """Batched views without in_memory: the loader crops both groups from the full image (uint8), the device runs
    the photometric ops on each group."""
    ds, maker = open_source(_cfg(cifar_slice, view_mode="batched", in_memory=False)).train_views()
    g, loc = ds[0][0]
    assert g.dtype == loc.dtype == torch.uint8 and g.shape == (2, 3, 32, 32) and loc.shape == (4, 3, 16, 16)
    views = maker((g[None], loc[None]), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(1, 2, 3, 32, 32), (1, 4, 3, 16, 16)]
    assert split_views(views)[1] is views[1] and split_views(g)[1] is None


@pytest.mark.parametrize("mode", ["batched", "per_image"])
def test_the_method_gets_both_groups_in_a_real_run(tmp_path, cifar_slice, mode):
    torch.manual_seed(0)
    method = LocalViewsMMCR(**MMCR.tiny)
    data = _cfg(cifar_slice, view_mode=mode, in_memory=mode == "batched")
    trainer = TrainerConfig(out_dir=str(tmp_path / "run"), max_steps=2, logger="none", progress_bar=False)
    pretrain(method, data, OptimConfig(), trainer, MonitorConfig(every_n_epochs=0, spectrum_every_n_steps=1))
    assert method.seen == ((8, 2, 3, 32, 32), (8, 4, 3, 16, 16))
    records = [json.loads(line) for line in (tmp_path / "run" / "spectrum.jsonl").read_text().splitlines()]
    assert records and all(len(r["singular_values"]["projector"]) > 0 for r in records)


def test_planned_epochs_refuse_local_views(tmp_path, cifar_slice):
    from selfsup.methods import IMLE

    data = _cfg(cifar_slice, views=1, augment="mae_cifar", augment_overrides=None, view_mode="batched", in_memory=True)
    trainer = TrainerConfig(out_dir=str(tmp_path / "run"), max_steps=1, logger="none", progress_bar=False)
    with pytest.raises(ValueError, match="data.local_views must be 0"):
        pretrain(IMLE(**IMLE.tiny), data, OptimConfig(), trainer, MonitorConfig(every_n_epochs=0))


def test_multicrop_resume_is_exact(tmp_path, cifar_slice, monkeypatch):
    """Batched multi-crop, 8 steps per epoch, step checkpoints every 3, SIGKILL at step 11: the resumed run ends with
    the uninterrupted run's weights (the local group's draws are keyed like the global one's)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    args = ["--method", "method_cases.LocalViewsMMCR", *TINY_MMCR[2:], "--data.dataset", "cifar10"]  # MMCR's tiny args
    args += ["--data.root", str(cifar_slice), "--data.batch_size", "25", "--data.view_mode", "batched"]
    args += ["--data.in_memory", "true", "--data.num_workers", "0", "--data.views", "2", "--data.augment", "dino"]
    args += ["--data.augment_overrides", "{crop_size: 32}", "--data.local_views", "2"]
    args += ["--data.local_augment", "dino_local", "--data.local_augment_overrides", "{crop_size: 16}"]
    args += ["--trainer.max_epochs", "2", "--trainer.save_every_n_steps", "3", "--trainer.logger", "none"]
    args += ["--trainer.progress_bar", "false", "--monitor.every_n_epochs", "0", "--optim.lr", "3e-3"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_a)]) == 0
    proc = pretrain_killed_at(11, [*args, "--trainer.out_dir", str(run_b)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert main(["pretrain", *args, "--trainer.out_dir", str(run_b), "--trainer.resume", "true"]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run_a, run_b))
    assert a["global_step"] == b["global_step"] == 16
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
