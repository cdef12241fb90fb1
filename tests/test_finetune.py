"""End-to-end fine-tuning (``selfsup finetune``): layer-wise lr decay, mixup / cutmix targets, selection on held-out
train, a real short fine-tune on CIFAR-10 images, the presets, and ViT / ResNet runs through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_args import TINY_VIT, tiny_pretrain
from torch.utils.data import DataLoader, Dataset

from selfsup.cli import main
from selfsup.engine.config import DataConfig
from selfsup.eval.finetune import (
    FinetuneConfig,
    FinetuneModel,
    build_criterion,
    build_mixup,
    finetune,
    finetune_param_groups,
    lr_scales,
)
from selfsup.eval.finetune_data import finetune_datasets, prepare_backbone
from selfsup.eval.finetune_protocols import FINETUNE_PROTOCOLS, get_finetune_protocol, resolve_finetune
from selfsup.eval.linear import split_train_val
from selfsup.models import build_backbone

VIT = TINY_VIT

#: a plain, deterministic regime: no augmentation, mixing, smoothing, decay or warm-up
PLAIN = dict(
    batch_size=20,
    lr=3e-3,
    scale_lr="none",
    weight_decay=0.0,
    layer_decay=1.0,
    warmup_epochs=0,
    min_lr=0.0,
    drop_path=0.0,
    label_smoothing=0.0,
    mixup=0.0,
    cutmix=0.0,
    augment="none",
    val_fraction=0.1,
)


@pytest.fixture(scope="module")
def slice_data(cifar_slice) -> DataConfig:
    """The 200 / 100 real CIFAR-10 images, decoded once into memory."""
    return DataConfig(dataset="cifar10", root=str(cifar_slice), in_memory=True, augment="cifar10", num_workers=0)


# ------------------------------------------------------------------------------------------ layer decay
def test_layer_decay_scales_by_hand_vit_and_resnet():
    """MAE / BEiT: lr x ld^(L - id); ViT id 0 = patch_embed / cls_token / pos_embed, block i -> i + 1, L = depth + 1 for
    the final norm and the head; ResNet by stage: stem 0, layer k -> k, head L = 5."""
    ld = 0.5
    vit = FinetuneModel(build_backbone("vit_tiny", img_size=32, patch_size=8, depth=3), 10)
    scales = lr_scales(vit, ld)
    expected = {
        "backbone.cls_token": ld**4,
        "backbone.pos_embed": ld**4,
        "backbone.patch_embed.proj.weight": ld**4,
        "backbone.blocks.0.attn.qkv.weight": ld**3,
        "backbone.blocks.1.mlp.fc1.bias": ld**2,
        "backbone.blocks.2.norm2.weight": ld**1,
        "backbone.norm.weight": 1.0,
        "head.weight": 1.0,
        "head.bias": 1.0,
    }
    assert {k: scales[k] for k in expected} == pytest.approx(expected)

    groups = finetune_param_groups(vit, FinetuneConfig(layer_decay=ld, weight_decay=0.05), peak_lr=2e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in vit.named_parameters()}  # every parameter, once
    for name, g in by_name.items():
        assert g["lr"] == pytest.approx(2e-3 * scales[name]), name
    # no decay: 1-D parameters and what timm's no_weight_decay() names (pos_embed, cls_token)
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight", "head.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.2.attn.proj.weight", "head.weight"):
        assert by_name[name]["weight_decay"] == 0.05, name

    resnet = FinetuneModel(build_backbone("resnet10", cifar_stem=True, width=8), 10)
    scales = lr_scales(resnet, ld)
    assert scales["backbone.conv1.weight"] == scales["backbone.bn1.bias"] == ld**5
    assert [scales[f"backbone.layer{k}.0.conv1.weight"] for k in (1, 2, 3, 4)] == [ld**4, ld**3, ld**2, ld]
    assert scales["head.weight"] == 1.0
    assert set(lr_scales(resnet, 1.0).values()) == {1.0}


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_ids_against_timm_param_groups_layer_decay(pool):
    """timm's own grouping agrees for an avg-pooled ViT; for a token-pooled one it files the final norm with the last
    block (L = depth), so every timm factor below the top is ld times ours: the spec follows MAE, not timm."""
    from timm.optim import param_groups_layer_decay

    ld = 0.65
    backbone = build_backbone("vit_tiny", img_size=32, patch_size=8, depth=3, global_pool=pool)
    ours = lr_scales(FinetuneModel(backbone, 10), ld)
    names = {id(p): n for n, p in backbone.named_parameters()}
    timm_scales = {
        f"backbone.{names[id(p)]}": g["lr_scale"]
        for g in param_groups_layer_decay(backbone, 0.05, layer_decay=ld)
        for p in g["params"]
    }
    for name, theirs in timm_scales.items():
        if pool == "avg" or name.startswith("backbone.norm."):
            assert theirs == pytest.approx(ours[name]), name
        else:
            assert theirs == pytest.approx(ours[name] / ld), name


# ------------------------------------------------------------------------------------------ mixup / loss
def _constant_images(n: int) -> torch.Tensor:
    """Image ``i`` filled with the value ``i + 1`` (so every pixel names the image it came from)."""
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()


def _smoothed(y: torch.Tensor, classes: int, s: float) -> torch.Tensor:
    return F.one_hot(y, classes).float() * (1 - s) + s / classes


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_soft_targets_by_hand(kind):
    """timm's batch mode mixes image i with image B-1-i: target = lam y_i + (1 - lam) y_{B-1-i} with y the smoothed
    one-hot (off 0.1 / 10 = 0.01, on 0.91); lam recovered from the pixels (mixup: the blend, cutmix: the box area)."""
    cfg = FinetuneConfig(
        mixup=0.8 if kind == "mixup" else 0.0,
        cutmix=1.0 if kind == "cutmix" else 0.0,
        label_smoothing=0.1,
        batch_size=6,
    )
    mixup = build_mixup(cfg, 10)
    x, y = _constant_images(6), torch.tensor([0, 1, 2, 3, 4, 5])
    np.random.seed(3)
    mixed, target = mixup(x.clone(), y)
    partner = torch.arange(5, -1, -1)
    if kind == "mixup":  # x_i' = lam (i + 1) + (1 - lam) (partner + 1)
        lam = float((mixed[0, 0, 0, 0] - 6.0) / (1.0 - 6.0))
        assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    else:  # the pixels inside the box come from the partner
        lam = 1.0 - float((mixed[0] == 6.0).float().mean())
        assert 0.0 < lam < 1.0
        for i in range(6):
            assert float((mixed[i] == float(partner[i] + 1)).float().mean()) == pytest.approx(1 - lam)
    y_s = _smoothed(y, 10, 0.1)
    assert torch.allclose(target, lam * y_s + (1 - lam) * y_s[partner], atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(6))
    assert float(target.min()) == pytest.approx(0.01)

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    loss = build_criterion(cfg)(logits, target)
    assert float(loss) == pytest.approx(float(-(target * F.log_softmax(logits, 1)).sum(1).mean()), rel=1e-6)


def test_label_smoothing_without_mixup_and_plain_ce():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    smooth = build_criterion(FinetuneConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1))
    by_hand = float(-(_smoothed(y, 10, 0.1) * F.log_softmax(logits, 1)).sum(1).mean())
    assert float(smooth(logits, y)) == pytest.approx(by_hand, rel=1e-6)
    plain = build_criterion(FinetuneConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.0))
    assert float(plain(logits, y)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert build_mixup(FinetuneConfig(mixup=0.0, cutmix=0.0), 10) is None


# ------------------------------------------------------------------------------------------ augmentation
def test_randaugment_is_timms_mae_pipeline_and_survives_zero_bit_posterize(cifar_slice):
    """timm create_transform with MAE's values at the preset's crop and normalisation; RandAugment's PosterizeIncreasing
    at magnitude 10 keeps 0 bits: a black image (MAE's Pillow), not Pillow 13's ValueError that stopped a run."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from selfsup.data.transforms import get_preset
    from selfsup.eval.finetune_data import train_transform

    tf = train_transform(get_preset("cifar10"), get_finetune_protocol("mae-finetune").config)
    crop, flip, ra, _, norm, erase = tf.transform.transforms
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.size == (32, 32)
    assert crop.scale == (0.08, 1.0) and str(crop.interpolation).lower().endswith("bicubic")
    assert flip.p == 0.5 and isinstance(ra, RandAugment) and ra.num_layers == 2
    assert {(op.magnitude, op.magnitude_std) for op in ra.ops} == {(9, 0.5)}
    assert isinstance(erase, RandomErasing) and (erase.probability, erase.mode) == (0.25, "pixel")
    assert torch.allclose(norm.mean, torch.tensor(get_preset("cifar10").mean))
    posterize = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0.0
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize(image)).max() == 0
    x = tf(torch.full((3, 32, 32), 200, dtype=torch.uint8))  # in-memory images are uint8 tensors
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


# ------------------------------------------------------------------------------------------ selection
class _Logged(Dataset):
    """A labelled dataset logging ``(tag, index)`` of every access; ``shift`` relabels ``y -> (y + shift) % 10``."""

    def __init__(self, base: Dataset, tag: str, log: list, shift: int = 0):
        self.base, self.tag, self.log, self.shift = base, tag, log, shift
        self.classes = base.classes
        self.targets = [(int(t) + shift) % 10 for t in base.targets]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.log.append((self.tag, i))
        x, y = self.base[i]
        return x, (int(y) + self.shift) % 10


def test_selection_on_held_out_train_never_on_test(slice_data):
    """Training reads only the train part of the split, validation only its held-out part, the test split only after
    training; corrupting every test label leaves the validation curve, the selected epoch and the weights unchanged."""
    cfg = FinetuneConfig(epochs=2, **{**PLAIN, "augment": "crop_flip"})
    train, val, test, classes = finetune_datasets(slice_data, cfg)
    runs = []
    for shift in (0, 1):
        log: list = []
        torch.manual_seed(0)
        backbone = build_backbone("resnet10", cifar_stem=True, width=8)
        res = finetune(
            backbone,
            _Logged(train, "train", log),
            _Logged(val, "val", log),
            _Logged(test, "test", log, shift),
            classes,
            cfg,
        )
        runs.append((res, log))
    tr_idx, va_idx = split_train_val(torch.as_tensor(train.targets), cfg.val_fraction, cfg.seed)
    for res, log in runs:
        seen = {tag: {i for t, i in log if t == tag} for tag in ("train", "val", "test")}
        assert seen["train"] <= set(tr_idx.tolist()) and not seen["train"] & set(va_idx.tolist())
        assert seen["val"] == set(va_idx.tolist()) and len(va_idx) == 20 and (res.n_train, res.n_val) == (180, 20)
        first_test = next(k for k, (t, _) in enumerate(log) if t == "test")
        assert all(t == "test" for t, _ in log[first_test:])  # the test split is read after everything else
        assert len(res.val_top1) == 2 and res.best_val_top1 == max(res.val_top1)
        assert res.best_val_epoch == res.val_top1.index(max(res.val_top1)) + 1  # earliest best
    (clean, _), (corrupt, _) = runs
    assert corrupt.val_top1 == clean.val_top1 and corrupt.train_loss == clean.train_loss
    assert corrupt.best_val_epoch == clean.best_val_epoch
    for (k, a), b in zip(clean.model.state_dict().items(), corrupt.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the reported test number is the selected model scored against the labels the test split holds
    with torch.no_grad():
        preds = torch.cat([corrupt.model(x).argmax(1) for x, _ in DataLoader(test, batch_size=100)])
    shifted = (torch.as_tensor(test.targets) + 1) % 10
    assert corrupt.test_top1_at_best_val == pytest.approx(100.0 * float((preds == shifted).float().mean()))


# ------------------------------------------------------------------------------------------ learning
def test_short_real_finetune_trains_backbone_and_head(slice_data):
    """4 epochs on the 200 real CIFAR-10 train images (no held-out part: the reported model is the last one): the
    training loss falls from ln(10) (a 2e-5-std head gives ~zero logits) by a clear margin, in eval mode too, and the
    backbone (weights and BatchNorm statistics) is trained, not only the head."""
    cfg = FinetuneConfig(epochs=4, **{**PLAIN, "val_fraction": 0.0})
    train, val, test, classes = finetune_datasets(slice_data, cfg)
    torch.manual_seed(0)
    backbone = build_backbone("resnet10", cifar_stem=True, width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x_train = torch.stack([val[i][0] for i in range(len(val))])
    y_train = torch.as_tensor(train.targets)

    res = finetune(backbone, train, val, test, classes, cfg, device="cpu")
    assert res.train_loss[0] == pytest.approx(math.log(10), abs=0.05)
    assert res.train_loss[-1] < res.train_loss[0] - 0.2, res.train_loss
    with torch.no_grad():
        eval_loss = float(F.cross_entropy(res.model.eval()(x_train), y_train))
    assert eval_loss < math.log(10) - 0.2, eval_loss
    after = backbone.state_dict()
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert res.best_val_epoch == 4 and res.test_top1_at_best_val == res.test_top1_last  # no validation: last
    assert all(math.isnan(v) for v in res.val_top1) and (res.n_train, res.n_val, res.n_test) == (200, 0, 100)
    assert res.steps == 4 * (200 // 20) and res.layer_scales == [1.0] * 6 and res.drop_path == 0.0
    assert res.pool == "avg"


def test_bad_input_is_named(slice_data):
    with pytest.raises(ValueError, match="batch_size must be even"):
        FinetuneConfig(batch_size=33)
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneConfig(layer_decay=0.0)
    with pytest.raises(ValueError, match="augment"):
        FinetuneConfig(augment="autoaugment")
    with pytest.raises(ValueError, match="pool 'token' needs a ViT"):
        finetune(
            build_backbone("resnet10", cifar_stem=True, width=8),
            *finetune_datasets(slice_data, FinetuneConfig()),
            cfg=FinetuneConfig(epochs=1, **{**PLAIN, "batch_size": 20}),
            pool="token",
        )
    train, val, test, classes = finetune_datasets(slice_data, FinetuneConfig(**PLAIN))
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(
            build_backbone("resnet10", cifar_stem=True, width=8),
            train,
            val,
            test,
            classes,
            FinetuneConfig(epochs=1, **{**PLAIN, "batch_size": 256}),
        )
    with pytest.raises(ValueError, match="drop_path_rate 0 but FinetuneConfig.drop_path is 0.1"):
        finetune(
            build_backbone("vit_tiny", img_size=32, patch_size=8, depth=1),
            train,
            val,
            test,
            classes,
            FinetuneConfig(epochs=1, **{**PLAIN, "drop_path": 0.1}),
        )
    with pytest.raises(ValueError, match="unknown fine-tune protocol 'mae-finetuen'"):
        get_finetune_protocol("mae-finetuen")


# ------------------------------------------------------------------------------------------ presets
def test_presets_hold_the_seed_values():
    """spec-can-mae-imle 2.6 (MAE ViT-B / ViT-L) and spec-mmcr-mec 5.2 (MIN-MMCR backbone+linear)."""
    assert list(FINETUNE_PROTOCOLS) == ["fast", "mae-finetune", "mae-finetune-large", "min-mmcr-finetune"]
    b = FINETUNE_PROTOCOLS["mae-finetune"].config
    assert (b.epochs, b.batch_size, b.lr, b.scale_lr, b.layer_decay, b.weight_decay, b.drop_path) == (
        100,
        1024,
        5e-4,
        "linear",
        0.65,
        0.05,
        0.1,
    )
    assert (b.optimizer, b.betas, b.warmup_epochs, b.min_lr, b.pool, b.head_init_std) == (
        "adamw",
        (0.9, 0.999),
        5,
        1e-6,
        "avg",
        2e-5,
    )
    assert (b.mixup, b.cutmix, b.mixup_prob, b.mixup_switch_prob, b.mixup_mode, b.label_smoothing) == (
        0.8,
        1.0,
        1.0,
        0.5,
        "batch",
        0.1,
    )
    assert (b.augment, b.randaugment, b.reprob, b.crop_scale, b.interpolation) == (
        "randaugment",
        "rand-m9-mstd0.5-inc1",
        0.25,
        (0.08, 1.0),
        "bicubic",
    )
    assert b.peak_lr() == pytest.approx(2e-3)  # 5e-4 x 1024 / 256
    large = FINETUNE_PROTOCOLS["mae-finetune-large"].config
    assert (large.epochs, large.lr, large.layer_decay, large.drop_path, large.peak_lr()) == (
        50,
        1e-3,
        0.75,
        0.2,
        pytest.approx(4e-3),
    )
    m = FINETUNE_PROTOCOLS["min-mmcr-finetune"].config
    assert (m.optimizer, m.lr, m.scale_lr, m.weight_decay, m.epochs, m.batch_size, m.warmup_epochs, m.augment) == (
        "adam",
        1e-2,
        "none",
        1e-6,
        50,
        512,
        5,
        "ssl",
    )
    assert (m.layer_decay, m.mixup_active, m.label_smoothing, m.drop_path, m.head_init_std) == (
        1.0,
        False,
        0.0,
        0.0,
        None,
    )
    for p in FINETUNE_PROTOCOLS.values():
        assert 0.0 < p.config.val_fraction < 1.0, p.name  # selection on held-out train, never on test
        for text in (p.source, p.differs, p.reproduces):
            assert len(text) > 20, p.name
    r = resolve_finetune("mae-finetune", epochs=2, lr=None)
    assert r.config.epochs == 2 and r.config.lr == 5e-4 and r.config.layer_decay == 0.65
    text = Path("docs/evaluation.md").read_text()  # the protocols' reference page
    assert all(f"`{name}`" in text for name in FINETUNE_PROTOCOLS)


# ------------------------------------------------------------------------------------------ command line
def test_vit_finetune_through_the_cli(vit_ckpt, tmp_path):
    """MAE's ViT-B protocol on a 2-block ViT-Tiny: drop path 0.1 on the last block, mean-token pooling, layer scales
    0.65^(3 - id), mixup + cutmix + RandAugment; the result lands in RUN_DIR/eval when no --output is given."""
    cfg = get_finetune_protocol("mae-finetune").config
    backbone, spec = prepare_backbone(vit_ckpt, cfg)
    assert spec["kwargs"]["drop_path_rate"] == 0.1 and backbone.global_pool == "avg"
    assert type(backbone.blocks[0].drop_path1).__name__ == "Identity"
    assert backbone.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    weights = torch.load(vit_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(backbone.pos_embed, weights["method.backbone.pos_embed"])

    args = [
        "finetune",
        "--checkpoint",
        str(vit_ckpt),
        "--protocol",
        "mae-finetune",
        "--epochs",
        "1",
        "--batch_size",
        "20",
        "--val_fraction",
        "0.1",
        "--data.in_memory",
        "true",
        "--data.num_workers",
        "0",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = vit_ckpt.parent.parent / "eval" / "finetune-last.json"
    r = json.loads(out.read_text())
    assert (r["protocol"], r["pool"], r["drop_path"], r["epochs"], r["n_train"], r["n_val"]) == (
        "mae-finetune",
        "avg",
        0.1,
        1,
        180,
        20,
    )
    assert r["layer_scales"] == pytest.approx([0.65**3, 0.65**2, 0.65, 1.0])
    assert r["peak_lr"] == pytest.approx(5e-4 * 20 / 256)
    assert len(r["val_top1"]) == 1 and r["best_val_epoch"] == 1 and r["steps"] == 180 // 20
    assert r["config"]["mixup"] == 0.8 and r["config"]["augment"] == "randaugment"
    assert r["backbone"]["name"] == "vit_tiny" and r["backbone"]["kwargs"]["drop_path_rate"] == 0.1


def test_resnet_min_mmcr_finetune_through_the_cli(tmp_path, cifar_slice, capsys):
    """MIN-MMCR's backbone+linear run on a ResNet: Adam, no layer decay, the SSL augmentation; --output is honoured
    and a typo in a flag or a protocol is one error line naming it."""
    ckpt = tiny_pretrain(tmp_path / "run", cifar_slice)
    out = tmp_path / "ft.json"
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ckpt),
                "--protocol",
                "min-mmcr-finetune",
                "--epochs",
                "1",
                "--batch_size",
                "20",
                "--data.in_memory",
                "true",
                "--data.num_workers",
                "0",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert (r["config"]["optimizer"], r["config"]["augment"], r["layer_scales"], r["drop_path"]) == (
        "adam",
        "ssl",
        [1.0] * 6,
        0.0,
    )
    assert r["steps"] == 180 // 20 and r["best_val_epoch"] == 1
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(ckpt), "--protocol", "mae-finetuen"]) == 1
    assert "mae-finetuen" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(ckpt), "--layer_decay", "1.5", "--data.num_workers", "0"]) == 1
    assert "layer_decay" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(ckpt), "--output", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
