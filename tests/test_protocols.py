"""Linear-probe protocols as named presets: the seeds' values, recipe defaults, CLI overrides, probe augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from cli_args import StopCommand, tiny_pretrain

from selfsup.cli import _pretrain_parser, main, run_linear
from selfsup.eval import PROTOCOLS, ProbeConfig, ProbeResult, get_protocol
from selfsup.eval.protocols import resolve


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, cifar_slice) -> Path:
    """A tiny checkpoint whose recipe names the min-mmcr protocol."""
    return tiny_pretrain(tmp_path_factory.mktemp("tiny") / "run", cifar_slice, "--protocol", "min-mmcr")


def _fields(p):
    c = p.probe
    return (
        p.augmented,
        p.train_augment,
        c.optimizer,
        c.lrs,
        c.weight_decays,
        c.batch_size,
        c.epochs,
        c.warmup_epochs,
        c.scale_lr,
        c.feature_norm,
    )


def test_presets_hold_the_seed_values():
    """Spec §5.2 / §7: (augmented, train augmentation, optimiser, lr, wd, batch, epochs, warm-up, lr scaling, head)."""
    seeds = {"fast", "off-mmcr-cifar", "off-mmcr-imagenet", "min-mmcr", "mec-imagenet", "mae-linprobe"}
    assert seeds <= set(PROTOCOLS)  # mae-linprobe: tests/test_mae_linprobe.py; the baselines' presets: below
    # SwAV eval_linear.py: SGD 0.3, momentum 0.9, wd 1e-6, batch 256, 100 epochs, crop + flip (bilinear), no BN head
    assert _fields(PROTOCOLS["swav-linear"]) == (
        True,
        "crop_flip",
        "sgd",
        (0.3,),
        (1e-6,),
        256,
        100,
        0.0,
        "none",
        "none",
    )
    assert PROTOCOLS["swav-linear"].crop_interpolation == "bilinear"
    # OFF-MEC main_lincls.py + linear.sh: LARC-wrapped SGD 0.03 x B/256, wd 0, batch 4096, BN(affine=False) head
    assert _fields(PROTOCOLS["mec-imagenet"]) == (
        True,
        "crop_flip",
        "lars",
        (0.03,),
        (0.0,),
        4096,
        100,
        0.0,
        "linear",
        "bn",
    )
    assert PROTOCOLS["mec-imagenet"].probe.peak_lr(0.03) == pytest.approx(0.48)
    assert PROTOCOLS["mec-imagenet"].crop_interpolation == "bilinear"
    assert _fields(PROTOCOLS["off-mmcr-cifar"]) == (True, "ssl", "adam", (0.1,), (1e-6,), 1024, 50, 0.0, "none", "none")
    assert _fields(PROTOCOLS["off-mmcr-imagenet"]) == (
        True,
        "crop_flip",
        "sgd",
        (0.3,),
        (1e-6,),
        2048,
        100,
        0.0,
        "none",
        "none",
    )
    assert (
        PROTOCOLS["off-mmcr-imagenet"].probe.momentum == 0.9
        and PROTOCOLS["off-mmcr-imagenet"].crop_interpolation == "bicubic"
    )
    assert _fields(PROTOCOLS["min-mmcr"]) == (True, "ssl", "adam", (1e-2,), (1e-6,), 512, 50, 5.0, "none", "none")
    assert _fields(PROTOCOLS["fast"]) == (False, None, "sgd", (0.1, 0.3, 1.0), (0.0, 1e-5), 256, 100, 0.0, "none", "bn")
    for p in PROTOCOLS.values():
        assert 0.0 < p.probe.val_fraction < 1.0, p.name  # selection on held-out train, never on test
        assert p.probe.final_lr_ratio == 0.0  # cosine to 0, as the seeds' CosineAnnealingLR
        for text in (p.source, p.differs, p.reproduces, p.eval_transform):
            assert len(text) > 20, p.name
    with pytest.raises(ValueError, match="off-mmcr-cifar"):
        get_protocol("off-mmcr-cifra")


def test_explicit_values_override_only_themselves():
    p = resolve("min-mmcr", epochs=3, lrs=[0.5], optimizer=None, batch_size=None)
    assert p.probe == dataclasses.replace(PROTOCOLS["min-mmcr"].probe, epochs=3, lrs=(0.5,))
    assert (p.augmented, p.train_augment) == (True, "ssl")
    cached = resolve("off-mmcr-imagenet", augmented=False)
    assert (cached.augmented, cached.train_augment) == (False, None) and cached.probe == PROTOCOLS[
        "off-mmcr-imagenet"
    ].probe
    assert resolve("fast", augmented=True).train_augment == "ssl"
    assert PROTOCOLS["fast"].probe == ProbeConfig(epochs=100, lrs=(0.1, 0.3, 1.0), weight_decays=(0.0, 1e-5))


def test_a_protocol_typo_fails_at_parse_time(tmp_path, capsys):
    assert main(["pretrain", "--config", "recipes/cpu-small.yaml", "--protocol", "off-mmcr-cifra"]) == 1
    err = capsys.readouterr().err
    assert "off-mmcr-cifra" in err and "off-mmcr-imagenet" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("recipes/cpu-small.yaml").read_text().replace("protocol: fast", "protocol: fsat"))
    assert main(["pretrain", "--config", str(bad)]) == 1
    assert "fsat" in capsys.readouterr().err
    assert main(["linear", "--checkpoint", "x.ckpt", "--protocol", "fsat"]) == 1
    assert "fsat" in capsys.readouterr().err


def _capture(monkeypatch) -> dict:
    """Replace both probes by fakes that record their config (and the augmented probe's datasets)."""
    from selfsup.eval import linear

    seen: dict = {}

    def result(cfg, mode):
        return ProbeResult(
            val_top1=0.0,
            test_top1=0.0,
            test_top5=0.0,
            test_top1_last=0.0,
            test_top5_last=0.0,
            lr=cfg.lrs[0],
            weight_decay=cfg.weight_decays[0],
            epoch=1,
            epochs=cfg.epochs,
            seconds=0.0,
            mode=mode,
            config=dataclasses.asdict(cfg),
        )

    def cached(train_f, train_y, test_f, test_y, num_classes, cfg, device="cpu"):
        seen.update(mode="cached", cfg=cfg)
        return result(cfg, "cached")

    def augmented(backbone, train_ds, test_ds, num_classes, cfg, val_dataset=None, device="cpu", num_workers=0, **kw):
        seen.update(mode="augmented", cfg=cfg, train_ds=train_ds)
        return result(cfg, "augmented")

    monkeypatch.setattr(linear, "linear_probe_cached", cached)
    monkeypatch.setattr(linear, "linear_probe_augmented", augmented)
    return seen


def test_linear_uses_the_recipe_protocol_else_fast_and_flags_override(tiny_ckpt, tmp_path, monkeypatch):
    """The checkpoint's config holds the recipe's protocol (min-mmcr here); without one, fast."""
    ckpt_cfg = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["selfsup"]["config"]
    assert ckpt_cfg["protocol"] == "min-mmcr"
    seen = _capture(monkeypatch)
    base = ["--checkpoint", str(tiny_ckpt), "--data.num_workers", "0"]

    out = run_linear(base)
    assert out["protocol"] == "min-mmcr" and seen["mode"] == "augmented" and seen["cfg"] == PROTOCOLS["min-mmcr"].probe
    out = run_linear([*base, "--epochs", "2", "--probe_batch_size", "64", "--optimizer", "sgd"])
    assert seen["cfg"] == dataclasses.replace(PROTOCOLS["min-mmcr"].probe, epochs=2, batch_size=64, optimizer="sgd")
    out = run_linear([*base, "--protocol", "fast", "--lrs", "[0.2]"])
    assert (out["protocol"], seen["mode"], seen["cfg"].lrs) == ("fast", "cached", (0.2,))
    assert seen["cfg"].weight_decays == PROTOCOLS["fast"].probe.weight_decays
    run_linear([*base, "--protocol", "min-mmcr", "--augmented", "false"])
    assert seen["mode"] == "cached"

    exported = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(exported)]) == 0
    out = run_linear(
        [
            "--checkpoint",
            str(exported),
            "--data.dataset",
            "cifar10",
            "--data.root",
            str(Path(ckpt_cfg["data"]["root"])),
            "--data.num_workers",
            "0",
        ]
    )
    assert out["protocol"] == "fast" and seen["mode"] == "cached"


def _probe_augment(monkeypatch, argv):
    """The Augment of the probe's training images that ``selfsup linear argv`` asks the data layer for."""
    from selfsup.data import build

    captured = {}

    def fake(cfg, split, augment=None):
        captured.update(cfg=cfg, split=split, augment=augment)
        raise StopCommand

    monkeypatch.setattr(build, "train_augmented_dataset", fake)
    with pytest.raises(StopCommand):
        run_linear(argv)
    assert captured["augment"] is None
    return build.train_pipelines(captured["cfg"])[0]


def test_off_mmcr_imagenet_probe_trains_on_crop_and_flip_only(tiny_ckpt, monkeypatch):
    """The seeds' ImageNet probe: RandomResizedCrop(224, bicubic) + flip, nothing else; the pretraining
    augmentation (jitter, grayscale, blur, solarize) must not leak into it (it did before: the augmented probe
    reused the pretraining pipeline)."""
    aug = _probe_augment(
        monkeypatch,
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--protocol",
            "off-mmcr-imagenet",
            "--data.augment",
            "imagenet",
            "--data.num_workers",
            "0",
        ],
    )
    assert (aug.crop_size, aug.scale, aug.interpolation, aug.flip_p) == (224, (0.08, 1.0), "bicubic", 0.5)
    assert (aug.jitter_p, aug.gray_p, aug.blur_p, aug.solarize_p) == (0.0, 0.0, 0.0, 0.0)
    assert aug.mean == (0.485, 0.456, 0.406) and aug.eval_resize == 256
    # the SSL protocols keep the pretraining augmentation (one view)
    ssl = _probe_augment(
        monkeypatch, ["--checkpoint", str(tiny_ckpt), "--protocol", "off-mmcr-cifar", "--data.num_workers", "0"]
    )
    assert (ssl.jitter_p, ssl.gray_p, ssl.crop_size) == (0.8, 0.2, 32)


def test_min_mmcr_solarize_parity_through_the_cli(tmp_path, cifar_slice, monkeypatch):
    """The recipe comment's override, given on the command line, inverts every uint8 pixel >= 1 like the original's
    RandomSolarize(0.5) on PIL images; the min-mmcr probe then sees the same augmentation."""
    from selfsup.data.build import train_pipelines
    from selfsup.data.transforms import per_image_transform

    parser = _pretrain_parser()
    cfg = parser.parse_args(
        ["--config", "recipes/min-mmcr-cifar10.yaml", "--data.augment_overrides", "{solarize_threshold: 0.0039}"]
    )
    aug = train_pipelines(parser.instantiate(cfg).data)[0]
    assert (aug.solarize_threshold, aug.solarize_p, aug.gray_p) == (0.0039, 0.2, 0.1)
    image = torch.tensor([0, 1, 2, 127, 128, 255], dtype=torch.uint8).view(1, 1, 6).expand(3, 6, 6).contiguous()
    only_solarize = dict(
        crop_size=6,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=0.0,
        solarize_p=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    for threshold, expected in ((0.0039, [0, 254, 253, 128, 127, 0]), (0.5, [0, 1, 2, 127, 127, 0])):
        out = per_image_transform(dataclasses.replace(aug, solarize_threshold=threshold, **only_solarize))(image)
        assert out[0, 0].mul(255).round().int().tolist() == expected, threshold

    ckpt = tiny_pretrain(
        tmp_path / "run",
        cifar_slice,
        "--data.augment",
        "cifar_min",
        "--data.augment_overrides",
        "{solarize_threshold: 0.0039}",
        "--protocol",
        "min-mmcr",
    )
    probe_aug = _probe_augment(monkeypatch, ["--checkpoint", str(ckpt), "--data.num_workers", "0"])
    assert (probe_aug.solarize_threshold, probe_aug.solarize_p) == (0.0039, 0.2)


def test_the_docs_document_every_protocol():
    text = Path("docs/evaluation.md").read_text()  # the protocols' reference page
    assert all(f"`{name}`" in text for name in PROTOCOLS)
