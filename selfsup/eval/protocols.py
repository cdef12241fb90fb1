"""The seeds' linear-probe protocols as named presets (spec §5.2 and §7).

``selfsup linear --protocol NAME`` runs one of :data:`PROTOCOLS`; a pretraining recipe names its
protocol (``protocol:`` at the top level of the YAML, stored in the checkpoint's config), which
``selfsup linear`` then uses by default (``fast`` when the checkpoint names none). Explicit
command-line flags override single values of the preset (:func:`resolve`).

A :class:`Protocol` is data: its :class:`~selfsup.eval.linear.ProbeConfig` (head, optimiser, lr,
batch, epochs, schedule, selection), whether the head trains on fresh augmented views or on cached
features, which augmentation those views get, and the eval transform, each documented with the
seed's own values. The augmentations are expressed *relative to the checkpoint's pretraining
preset* (its crop size and normalisation), so the same protocol works for every dataset it is
meant for.

What every preset keeps right, whatever the seed did (spec §8 OFF-MMCR 6, MIN-MMCR 5, OFF-MEC 5):

* the backbone is frozen **in eval mode** (BatchNorm statistics never drift; the seeds ran it in
  train mode);
* the epoch (and any lr / weight-decay grid) is selected on a stratified held-out part of the
  *train* split; the test split is scored once, after training (the seeds selected on the test
  split, OFF-MMCR CIFAR even twice: over epochs and over checkpoints);
* both the best-on-validation and the last-epoch test accuracy are reported;
* the learning-rate schedule is stepped per optimisation step and a warm-up never has a zero-lr
  first epoch (MIN-MMCR's LambdaLR did).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from selfsup.eval.linear import ProbeConfig

__all__ = ["Protocol", "PROTOCOLS", "CROP_FLIP", "get_protocol", "resolve", "protocol_names"]

#: ``Augment`` fields that turn a pretraining pipeline into RandomResizedCrop + horizontal flip only
#: (no colour jitter, grayscale, blur or solarisation); crop size and normalisation stay the preset's.
CROP_FLIP: dict[str, Any] = {
    "scale": (0.08, 1.0),
    "ratio": (3.0 / 4.0, 4.0 / 3.0),
    "flip_p": 0.5,
    "jitter_p": 0.0,
    "gray_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
    "color_first": False,
}


@dataclass(frozen=True)
class Protocol:
    """One linear-probe protocol.

    Attributes:
        name: the preset name (``--protocol NAME``).
        probe: epochs, lr (grid), weight decay, batch, optimiser, head (``feature_norm``: ``bn`` =
            ``BatchNorm1d(affine=False)`` before the linear layer, ``none`` = bare linear layer),
            schedule and held-out fraction.
        augmented: ``True``: every epoch the frozen backbone sees a fresh augmented view of each
            training image (:func:`~selfsup.eval.linear.linear_probe_augmented`); ``False``: the
            head trains on features of the eval transform, extracted once
            (:func:`~selfsup.eval.linear.linear_probe_cached`).
        train_augment: the probe's training augmentation when ``augmented``: ``ssl`` = one view of
            the checkpoint's pretraining augmentation (its first pipeline, with the run's
            ``augment_overrides``); ``crop_flip`` = RandomResizedCrop + flip only
            (:data:`CROP_FLIP` plus ``crop_interpolation``) at the preset's crop size and
            normalisation; ``None`` for cached features.
        crop_interpolation: interpolation of the ``crop_flip`` RandomResizedCrop.
        eval_transform: the validation / test transform. Always the checkpoint preset's eval
            transform; the text records what it is for the datasets the protocol is meant for.
        source: the seed's protocol and values this preset takes (spec §5.2 / §7).
        differs: where the preset deliberately differs from the seed.
        reproduces: the reported number(s) this protocol is the one to compare against.
    """

    name: str
    probe: ProbeConfig
    augmented: bool
    train_augment: Optional[Literal["ssl", "crop_flip"]]
    eval_transform: str
    source: str
    differs: str
    reproduces: str
    crop_interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.augmented and self.train_augment not in ("ssl", "crop_flip"):
            raise ValueError(f"protocol {self.name!r}: an augmented probe needs train_augment 'ssl' or 'crop_flip'")

    def train_augment_overrides(self, pretrain_overrides: Optional[dict] = None) -> Optional[dict]:
        """``augment_overrides`` for the probe's training dataset, given the pretraining run's own.

        ``ssl`` keeps the pretraining overrides (the probe sees the pretraining augmentation);
        ``crop_flip`` adds :data:`CROP_FLIP` and ``crop_interpolation`` on top of them.
        """
        base = dict(pretrain_overrides or {})
        if self.train_augment == "crop_flip":
            base.update(CROP_FLIP, interpolation=self.crop_interpolation)
        return base or None


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="fast",
            probe=ProbeConfig(epochs=100, lrs=(0.1, 0.3, 1.0), weight_decays=(0.0, 1e-5), batch_size=256,
                              optimizer="sgd", momentum=0.9, feature_norm="bn", val_fraction=0.1),
            augmented=False,
            train_augment=None,
            eval_transform="the preset's eval transform (CIFAR: ToTensor + Normalize; STL-10: Resize 70 bicubic + "
                           "CenterCrop 64; ImageNet: Resize 256 + CenterCrop 224), for training and test features",
            source="not a seed protocol: selfsup's cached-feature default. Head BN(affine=False) + Linear (the OFF-MEC "
                   "head), SGD momentum 0.9, per-step cosine, 100 epochs, batch 256, grid lr {0.1, 0.3, 1} x "
                   "wd {0, 1e-5} selected on a held-out 10% of train",
            differs="no augmentation: one backbone pass over each image, so minutes instead of hours",
            reproduces="no seed number; quick comparisons of checkpoints and methods",
        ),
        Protocol(
            name="off-mmcr-cifar",
            probe=ProbeConfig(epochs=50, lrs=(0.1,), weight_decays=(1e-6,), batch_size=1024, optimizer="adam",
                              feature_norm="none", val_fraction=0.1),
            augmented=True,
            train_augment="ssl",
            eval_transform="the preset's eval transform: CIFAR ToTensor + Normalize at 32x32; STL-10 Resize 70 "
                           "bicubic + CenterCrop 64",
            source="OFF-MMCR train_classifier via model_select_cifar_stl.py (CIFAR-10/100, STL-10): backbone + "
                   "Linear(2048, C), one view of the SSL augmentation, Adam on fc with wd 1e-6, lr 0.1, batch 1024, "
                   "50 epochs, CosineAnnealingLR(T_max=epochs) stepped per epoch; test transform plain",
            differs="cosine per step, not per epoch; fc init N(0, 0.01), no decay on the bias; the seed ran the "
                    "backbone in train mode (BN drift) and reported the max test top-1 over epochs and over "
                    "checkpoints; the shipped script cannot run at all (TypeError, spec §8.2)",
            reproduces="MMCR paper linear top-1 for CIFAR-10 / CIFAR-100 / STL-10 (ResNet-50, 500 epochs); "
                       "the numbers are in the paper, not in the repository",
        ),
        Protocol(
            name="off-mmcr-imagenet",
            probe=ProbeConfig(epochs=100, lrs=(0.3,), weight_decays=(1e-6,), batch_size=2048, optimizer="sgd",
                              momentum=0.9, feature_norm="none", scale_lr="none", val_fraction=0.01),
            augmented=True,
            train_augment="crop_flip",
            crop_interpolation="bicubic",
            eval_transform="Resize 256 + CenterCrop 224 (the imagenet preset's eval transform)",
            source="OFF-MMCR linear_classifier_imagenet.py: ResNet-50 + Linear(2048, C), no BN head; train "
                   "RandomResizedCrop(224, bicubic, scale (0.08, 1)) + flip only; SGD lr 0.3 (not batch-scaled), "
                   "momentum 0.9, wd 1e-6, cosine T_max = 100 epochs, batch 2048",
            differs="the probe does not reuse the pretraining augmentation (no jitter, grayscale, blur, "
                    "solarize); cosine per step; 1% of train held out for selection (the seed tracked the best "
                    "ImageNet-val top-1, i.e. selected on the reported split, ran BN in train mode, and crashes "
                    "without --use_zip, spec §8.3)",
            reproduces="MMCR paper linear top-1 for ImageNet-1k and ImageNet-100 (ResNet-50, 100 epochs); "
                       "not in the repository",
        ),
        Protocol(
            name="min-mmcr",
            probe=ProbeConfig(epochs=50, lrs=(1e-2,), weight_decays=(1e-6,), batch_size=512, optimizer="adam",
                              feature_norm="none", warmup_epochs=5, val_fraction=0.1),
            augmented=True,
            train_augment="ssl",
            eval_transform="the preset's eval transform: CIFAR ToTensor + Normalize",
            source="MIN-MMCR evaluate.py: backbone + Linear(512, 10), the same SSL AUGMENTATION, Adam lr 1e-2 "
                   "(CLI), wd 1e-6, 50 epochs, warm-up 0.1 x 50 = 5 epochs then cosine, batch 512 (the README "
                   "says 1024), 16-mixed",
            differs="warm-up per step with a non-zero first lr (the seed's LambdaLR gives lr 0 for all of epoch "
                    "0); fp32 head; no decay on the bias; selection on held-out train (the seed kept the "
                    "checkpoint with the best CIFAR-10 *test* top-1, BN drifting in train mode)",
            reproduces="MIN-MMCR README: ResNet-18, CIFAR-10, 500 epochs, linear 89.19 top-1 / 99.61 top-5 "
                       "(pretrain with recipes/min-mmcr-cifar10.yaml)",
        ),
        Protocol(
            name="mec-imagenet",
            probe=ProbeConfig(epochs=100, lrs=(0.03,), weight_decays=(0.0,), batch_size=4096, optimizer="lars",
                              momentum=0.9, feature_norm="bn", scale_lr="linear", val_fraction=0.01),
            augmented=True,
            train_augment="crop_flip",
            crop_interpolation="bilinear",
            eval_transform="Resize 256 + CenterCrop 224 (the mec / imagenet presets' eval transform)",
            source="OFF-MEC main_lincls.py + linear.sh: ResNet-50 frozen in eval mode, head BatchNorm1d(2048, "
                   "affine=False, eps 1e-6) + Linear(2048, C) (fc N(0, 0.01), zero bias); train RandomResizedCrop(224, "
                   "bilinear, scale (0.08, 1)) + flip; SGD lr 0.03 x B/256 = 0.48, momentum 0.9, wd 0, wrapped in "
                   "LARC (trust 0.001, no clipping: --lars); cosine, no warm-up, 100 epochs, batch 4096",
            differs="LARS (trust ratio on the weight, bias excluded) instead of apex LARC; cosine per step, not per "
                    "epoch; 1% of train held out for selection (the seed took the max top-1 over epochs on ImageNet "
                    "val, i.e. selected on the reported split); no apex, no DDP requirement",
            reproduces="OFF-MEC README: ResNet-50, 100 epochs of MEC on ImageNet-1k, linear 70.8 top-1 "
                       "(pretrain with recipes/mec-imagenet.yaml)",
        ),
    )
}


def protocol_names() -> tuple[str, ...]:
    """The preset names, in definition order."""
    return tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The preset ``name``; an unknown name is a ``ValueError`` listing the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown linear-probe protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def resolve(name: str, augmented: Optional[bool] = None, **probe_overrides: Any) -> Protocol:
    """Preset ``name`` with explicit values replacing the preset's.

    ``augmented`` (if not ``None``) switches between augmented and cached training (an augmented
    override of a cached preset uses ``ssl`` views); ``probe_overrides`` are
    :class:`~selfsup.eval.linear.ProbeConfig` fields, ``None`` values meaning "the preset's".
    """
    protocol = get_protocol(name)
    given = {k: v for k, v in probe_overrides.items() if v is not None}
    probe = dataclasses.replace(protocol.probe, **given) if given else protocol.probe
    changes: dict[str, Any] = {"probe": probe}
    if augmented is not None and augmented != protocol.augmented:
        changes.update(augmented=augmented, train_augment=(protocol.train_augment or "ssl") if augmented else None)
    return dataclasses.replace(protocol, **changes)
