"""Every cpu-small recipe end to end (3 steps on real images, the method's tiny configuration), and every recipe
parses with a known protocol and preset. Derived from the shipped recipes and the method registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli import _pretrain_parser, main
from selfsup.data.batched import BatchedViews
from selfsup.data.transforms import CIFAR10_MEAN, IMAGENET_MEAN, PRESETS, MultiViewTransform, as_pipelines, get_preset
from selfsup.eval.protocols import PROTOCOLS
from selfsup.methods import get_method
from selfsup.recipes import RECIPES_DIR, available_recipes, resolve_recipe


def tiny_overrides(method: type) -> list[str]:
    """``--method.init_args.<key> <json>`` for each entry of the method's ``tiny`` configuration."""
    return [arg for k, v in method.tiny.items() for arg in (f"--method.init_args.{k}", json.dumps(v))]


def _method_of(recipe: str) -> type:
    return get_method(yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())["method"]["class_path"])


CPU_SMALL = [r for r in available_recipes() if r.endswith("cpu-small")]


@pytest.mark.parametrize("recipe", CPU_SMALL)
def test_cpu_small_recipe_pretrains_and_evaluates(recipe, tmp_path, cifar_slice):
    """Every cpu-small recipe, with its method's ``tiny`` configuration, trains 3 steps on real images through the
    CLI; the checkpoint then serves kNN and export (and kNN of every declared teacher)."""
    method = _method_of(recipe)
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--config",
        recipe,  # by name: the shipped recipe
        "--data.dataset",
        "folder",
        "--data.root",
        str(cifar_slice),
        "--trainer.max_steps",
        "3",
        "--data.batch_size",
        "16",
        "--monitor.every_n_epochs",
        "0",
        "--monitor.recon_every_n_epochs",
        "0",
        "--monitor.fewshot_every_n_epochs",
        "0",
        "--trainer.logger",
        "none",
        "--trainer.progress_bar",
        "false",
        "--trainer.out_dir",
        str(run),
        *tiny_overrides(method),
    ]
    assert main(args) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert meta["global_step"] == 3 and meta["selfsup"]["method"] == method.__name__
    assert main(["knn", "--checkpoint", str(ckpt), "--k", "10", "--data.num_workers", "0"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "backbone.safetensors").is_file()
    for teacher in meta["selfsup"]["backbones"]:
        if teacher != "online":  # a declared teacher's backbone is evaluable by name
            knn = ["knn", "--checkpoint", str(ckpt), "--which", teacher, "--k", "10", "--data.num_workers", "0"]
            assert main(knn) == 0


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_parses_with_a_known_protocol_and_preset(recipe):
    cfg = _pretrain_parser().parse_args(["--config", resolve_recipe(recipe)])
    text = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    assert "protocol" in text, f"{recipe}: name the linear-probe protocol that measures it (protocol: ...)"
    assert cfg.protocol in PROTOCOLS and text["protocol"] == cfg.protocol, recipe
    assert cfg.data.augment in PRESETS, recipe
    assert cfg.data.views % len(as_pipelines(cfg.data.augment)) == 0, recipe  # asymmetric pairs need even views
    assert get_method(cfg.method.class_path) is _method_of(recipe)


def test_simclr_and_byol_presets():
    s, sc = get_preset("simclr"), get_preset("simclr_cifar")
    assert (s.crop_size, s.scale, s.jitter, s.jitter_p, s.gray_p, s.blur_p, s.solarize_p, s.mean) == (
        224,
        (0.08, 1.0),
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
        0.5,
        0.0,
        IMAGENET_MEAN,
    )
    assert (sc.crop_size, sc.jitter, sc.blur_p, sc.mean) == (32, (0.4, 0.4, 0.4, 0.1), 0.0, CIFAR10_MEAN)
    a, b = get_preset("byol")
    assert (a.crop_size, a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (224, 1.0, 0.0, 0.1, 0.2)
    a, b = get_preset("byol_cifar")
    assert (a.crop_size, a.mean, a.jitter) == (32, CIFAR10_MEAN, (0.4, 0.4, 0.2, 0.1))
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (0.0, 0.0, 0.0, 0.2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_new_presets_work_in_both_view_modes(name):
    """Batched views (uint8 batch on the device) and per-image views (PIL or uint8, loader workers)."""
    size = as_pipelines(name)[0].crop_size
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = BatchedViews(name, n_views=2)(images, torch.Generator().manual_seed(1))
    assert views.shape == (3, 2, 3, size, size) and torch.isfinite(views).all()
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for image in (pil, images[0]):
        per_image = MultiViewTransform(as_pipelines(name), 2)(image)
        assert per_image.shape == (2, 3, size, size) and torch.isfinite(per_image).all()
