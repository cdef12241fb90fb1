"""Every method end to end through its cpu-small recipe (3 steps on real images), and every recipe parses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.cli import _pretrain_parser, main
from selfsup.data.batched import BatchedViews
from selfsup.data.transforms import CIFAR10_MEAN, IMAGENET_MEAN, PRESETS, MultiViewTransform, as_pipelines, get_preset
from selfsup.eval.protocols import PROTOCOLS

TINY = "{name: resnet10, kwargs: {cifar_stem: true, width: 8}}"
TINY_VIT = "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}"

#: recipe -> (method class, small-head overrides)
CPU_SMALL = {
    "cpu-small": ("MMCR", ["--method.init_args.projector", "[32, 16]"]),
    "mec-cpu-small": ("MEC", ["--method.init_args.dim", "32", "--method.init_args.pred_dim", "16"]),
    "simclr-cpu-small": ("SimCLR", ["--method.init_args.projector", "[32, 16]"]),
    "byol-cpu-small": (
        "BYOL",
        ["--method.init_args.projector", "[32, 16]", "--method.init_args.predictor_hidden", "32"],
    ),
    "mae-cpu-small": (
        "MAE",
        ["--method.init_args.backbone", TINY_VIT, "--method.init_args.decoder", "{width: 32, depth: 1, heads: 2}"],
    ),
    "can-cpu-small": (
        "CAN",
        [
            "--method.init_args.backbone",
            TINY_VIT,
            "--method.init_args.decoder",
            "{width: 32, depth: 1, heads: 2}",
            "--method.init_args.proj_dim",
            "16",
        ],
    ),
    **{
        r: (
            "IMLE",
            [
                "--method.init_args.backbone",
                TINY_VIT,
                "--method.init_args.decoder",
                "{width: 32, depth: 1, heads: 2}",
                "--method.init_args.latent",
                "{inject: [[0, adain]], code_dim: 8, mapping: {depth: 2, hidden: 16}}",
                "--method.init_args.examples_per_epoch",
                "48",
                "--method.init_args.num_codes",
                "4",
                "--method.init_args.codes_per_round",
                "2",
                "--monitor.recon_every_n_epochs",
                "0",
            ],
        )
        for r in ("imle-cpu-small", "imle-cpu-small-mae-arm")
    },
}

#: method -> the recipes expected to exist for it
RECIPES = {
    "MEC": ["mec-imagenet", "mec-imagenet100", "mec-cifar10", "mec-cifar100", "mec-cpu-small"],
    "SimCLR": ["simclr-cifar10", "simclr-cifar100", "simclr-cpu-small"],
    "BYOL": ["byol-cifar10", "byol-cifar100", "byol-cpu-small"],
    "MAE": ["mae-imagenet", "mae-cifar10", "mae-cpu-small"],
    "CAN": ["can-imagenet", "can-cifar10", "can-cpu-small"],
    "IMLE": [
        "imle-imagenet",
        "imle-imagenet-mae-arm",
        "imle-cifar10",
        "imle-cifar10-mae-arm",
        "imle-cpu-small",
        "imle-cpu-small-mae-arm",
    ],
}
VIEWS = {"MAE": 1, "IMLE": 1}  #: views per image where not 2


@pytest.mark.parametrize("recipe", list(CPU_SMALL))
def test_cpu_small_recipe_pretrains_and_evaluates(recipe, tmp_path, cifar_slice):
    method, heads = CPU_SMALL[recipe]
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--config",
        f"recipes/{recipe}.yaml",
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
        "--trainer.logger",
        "none",
        "--trainer.progress_bar",
        "false",
        "--trainer.out_dir",
        str(run),
        *([] if "--method.init_args.backbone" in heads else ["--method.init_args.backbone", TINY]),
        *heads,
    ]
    assert main(args) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert meta["global_step"] == 3 and meta["selfsup"]["method"] == method
    assert main(["knn", "--checkpoint", str(ckpt), "--k", "10", "--data.num_workers", "0"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "backbone.safetensors").is_file()
    if "teacher" in meta["selfsup"]["backbones"]:  # MEC, BYOL: the EMA teacher is evaluable by name
        assert method in ("MEC", "BYOL")
        assert (
            main(["knn", "--checkpoint", str(ckpt), "--which", "teacher", "--k", "10", "--data.num_workers", "0"]) == 0
        )


@pytest.mark.parametrize("recipe", sorted(p.stem for p in Path("recipes").glob("*.yaml")))
def test_every_recipe_parses_with_a_known_protocol_and_preset(recipe):
    path = f"recipes/{recipe}.yaml"
    cfg = _pretrain_parser().parse_args(["--config", path])
    assert cfg.protocol in PROTOCOLS, recipe
    assert cfg.data.augment in PRESETS, recipe
    assert cfg.data.views % len(as_pipelines(cfg.data.augment)) == 0, recipe  # asymmetric pairs need even views
    assert yaml.safe_load(Path(path).read_text())["protocol"] == cfg.protocol


@pytest.mark.parametrize("method", list(RECIPES))
def test_new_methods_have_their_recipes(method):
    for recipe in RECIPES[method]:
        cfg = _pretrain_parser().parse_args(["--config", f"recipes/{recipe}.yaml"])
        assert cfg.method.class_path.rsplit(".", 1)[-1] == method, recipe
        assert cfg.data.views == VIEWS.get(method, 2), recipe


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


@pytest.mark.parametrize(
    "name", ["simclr", "simclr_cifar", "byol", "byol_cifar", "mec", "mae", "mae_cifar", "can", "can_cifar"]
)
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
