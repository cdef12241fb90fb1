"""Augmentation configs, the reference presets, and per-image CPU view pipelines.

An :class:`Augment` is a plain description of one augmentation pipeline (what to do, with which
probabilities and ranges). It is turned into something executable in one of two ways:

* :func:`per_image_transform` builds a torchvision (v2) pipeline that augments one image at a time,
  for use in DataLoader workers; :class:`MultiViewTransform` draws ``V`` views of one image from it.
  :func:`crop_flip_transform` is its geometric part alone (uint8 crops, for batched views of images
  that cannot be stacked at full size).
* :class:`selfsup.data.batched.BatchedViews` applies the same augmentations to a whole batch at once,
  vectorised, on whatever device the batch lives on.

Asymmetric recipes (BYOL / Barlow-Twins / MoCo-v3 style) are a *pair* of :class:`Augment`; view ``v``
uses pipeline ``v % 2`` (even slots A, odd slots B), as OFF-MMCR does.

The presets in :data:`PRESETS` reproduce the reference repositories (spec §3.2):

* ``cifar10``: OFF-MMCR CIFAR-10 (RRC 32, flip, jitter 0.8, gray 0.2, CIFAR-10 mean/std).
* ``cifar100``: identical to ``cifar10``, **including the CIFAR-10 mean/std**, as OFF-MMCR does.
* ``cifar_min``: MIN-MMCR (gray 0.1, blur k=3 p=0.1, solarize p=0.2).
* ``stl10``: OFF-MMCR STL-10 (jitter and gray before RRC 64 bicubic, scale (0.2, 1), STL mean/std;
  eval Resize 70 + CenterCrop 64).
* ``imagenet``: the OFF-MMCR asymmetric pair (A: blur 1.0; B: blur 0.1, solarize 0.2; RRC 224 bicubic;
  eval Resize 256 + CenterCrop 224).
* ``mec``: the OFF-MEC / MoCo-v3 asymmetric pair (RRC 224 bilinear, scale (0.2, 1)).
* ``simclr`` / ``simclr_cifar``: symmetric SimCLR set (ImageNet: blur p 0.5; CIFAR: no blur, as the paper).
* ``byol`` / ``byol_cifar``: the asymmetric BYOL pair (ImageNet: blur 1.0 / 0.1, solarize 0 / 0.2;
  CIFAR: 32 px, CIFAR mean/std, no blur, solarize 0 / 0.2, as solo-learn).
* ``mae`` / ``mae_cifar``: MAE's crop (scale (0.2, 1), bicubic) and flip only.
* ``can`` / ``can_cifar``: CAN's symmetric SimCLR-style pair source (crop scale (0.2, 1); ImageNet: blur p 0.5).
* ``swav`` / ``swav_local`` / ``swav_cifar``: SwAV's global (224 px, scale (0.14, 1)) and local (96 px,
  (0.05, 0.14)) views and solo-learn's CIFAR set (strong jitter, blur p 0.5).
* ``dino`` / ``dino_local``: DINO's global pair (224 px, scale (0.4, 1)) and its local crops (96 px, (0.05, 0.4)),
  for multi-crop (``data.local_views``, :mod:`selfsup.data.multicrop`).

One deliberate fix: solarisation thresholds are expressed on ``[0, 1]`` floats (0.5, i.e. 128 on uint8),
never on raw uint8 values (MIN-MMCR's ``RandomSolarize(0.5)`` on PIL images inverts almost every pixel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "STL10_MEAN",
    "STL10_STD",
    "Augment",
    "AugmentSpec",
    "MultiViewTransform",
    "as_pipelines",
    "crop_flip_transform",
    "eval_transform",
    "get_preset",
    "per_image_transform",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
STL10_MEAN: tuple[float, float, float] = (0.43, 0.42, 0.39)
STL10_STD: tuple[float, float, float] = (0.27, 0.26, 0.27)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    t = tuple(float(v) for v in value)
    if len(t) != 2 or t[0] > t[1]:
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {value!r}")
    return t  # type: ignore[return-value]


def _prob(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


@dataclass
class Augment:
    """One augmentation pipeline (the SimCLR / BYOL family of augmentations).

    The ops run in this order (``color_first=False``)::

        RandomResizedCrop -> HorizontalFlip -> ColorJitter (p=jitter_p) -> Grayscale (p=gray_p)
        -> GaussianBlur (p=blur_p) -> Solarize (p=solarize_p) -> to float in [0, 1] -> Normalize

    With ``color_first=True`` (the OFF-MMCR STL-10 order) jitter and grayscale run *before* the crop.
    Flip commutes with every later op (the blur kernel is symmetric), so the MoCo-v3 order "blur,
    solarize, then flip" is the same distribution and needs no flag.

    Attributes:
        crop_size: side of the square output crop, in pixels.
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height); sampled log-uniformly.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` for the crop resize.
        flip_p: probability of a horizontal flip.
        jitter: ColorJitter strengths ``(brightness, contrast, saturation, hue)``: the first three draw a
            factor in ``[max(0, 1 - x), 1 + x]``, the hue a shift in ``[-h, h]`` (``h <= 0.5``). 0 disables
            that component.
        jitter_p: probability of applying the ColorJitter.
        gray_p: probability of converting to grayscale (replicated to 3 channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's standard deviation, in pixels.
        blur_kernel: odd kernel side; ``None`` means about 10 % of ``crop_size``, made odd, at least 3
            (3 at 32 px, 7 at 64 px, 23 at 224 px). See :attr:`kernel_size`.
        solarize_p: probability of solarising.
        solarize_threshold: pixels ``>= threshold`` are inverted (``x -> 1 - x``). Expressed on ``[0, 1]``
            floats: 0.5 is PIL's default 128 on uint8 data.
        mean, std: per-channel normalisation applied last.
        eval_resize: for evaluation, resize the short side to this before the centre crop to
            ``crop_size`` (``None``: no resize, no crop; the image is used at its own size).
        eval_interpolation: interpolation of that evaluation resize.
        color_first: apply ColorJitter and Grayscale before the crop (OFF-MMCR STL-10 order).
    """

    crop_size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    eval_resize: int | None = None
    eval_interpolation: str = "bilinear"
    color_first: bool = False

    def __post_init__(self) -> None:
        # Accept lists (YAML / jsonargparse) and normalise everything to tuples of floats.
        if int(self.crop_size) < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        self.crop_size = int(self.crop_size)
        self.scale = _pair(self.scale, "scale")
        if self.scale[0] <= 0.0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        self.ratio = _pair(self.ratio, "ratio")
        if self.ratio[0] <= 0.0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        for name in ("interpolation", "eval_interpolation"):
            if getattr(self, name) not in _INTERPOLATIONS:
                raise ValueError(f"{name} must be one of {sorted(_INTERPOLATIONS)}, got {getattr(self, name)!r}")
        jitter = tuple(float(v) for v in self.jitter)
        if len(jitter) != 4 or min(jitter) < 0.0:
            raise ValueError(f"jitter must be 4 non-negative strengths (b, c, s, h), got {self.jitter!r}")
        if jitter[3] > 0.5:
            raise ValueError(f"hue jitter must be <= 0.5, got {jitter[3]}")
        self.jitter = jitter  # type: ignore[assignment]
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            setattr(self, name, _prob(getattr(self, name), name))
        self.blur_sigma = _pair(self.blur_sigma, "blur_sigma")
        if self.blur_sigma[0] <= 0.0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        if self.blur_kernel is not None and (int(self.blur_kernel) < 1 or int(self.blur_kernel) % 2 == 0):
            raise ValueError(f"blur_kernel must be a positive odd integer or None, got {self.blur_kernel}")
        if not 0.0 <= float(self.solarize_threshold) <= 1.0:
            raise ValueError(f"solarize_threshold is on [0, 1] floats, got {self.solarize_threshold}")
        self.solarize_threshold = float(self.solarize_threshold)
        for name in ("mean", "std"):
            t = tuple(float(v) for v in getattr(self, name))
            if len(t) != 3:
                raise ValueError(f"{name} must have 3 values, got {getattr(self, name)!r}")
            setattr(self, name, t)
        if min(self.std) <= 0.0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.eval_resize is not None and int(self.eval_resize) < 1:
            raise ValueError(f"eval_resize must be >= 1 or None, got {self.eval_resize}")

    @property
    def kernel_size(self) -> int:
        """The blur kernel side actually used: ``blur_kernel`` or ~10 % of ``crop_size``, odd, >= 3."""
        if self.blur_kernel is not None:
            return int(self.blur_kernel)
        k = int(0.1 * self.crop_size)
        if k % 2 == 0:
            k += 1
        return max(k, 3)


AugmentSpec = Union[Augment, tuple[Augment, Augment]]

# --------------------------------------------------------------------------------------------------
# Presets (spec §3.2)
# --------------------------------------------------------------------------------------------------

_CIFAR10 = Augment()  # all defaults are the OFF-MMCR CIFAR recipe

_IMAGENET_A = Augment(
    crop_size=224,
    scale=(0.08, 1.0),
    interpolation="bicubic",
    flip_p=0.5,
    jitter=(0.4, 0.4, 0.2, 0.1),
    jitter_p=0.8,
    gray_p=0.2,
    blur_p=1.0,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    eval_resize=256,
    eval_interpolation="bilinear",
)

_MEC_1 = Augment(
    crop_size=224,
    scale=(0.2, 1.0),
    interpolation="bilinear",
    flip_p=0.5,
    jitter=(0.4, 0.4, 0.2, 0.1),
    jitter_p=0.8,
    gray_p=0.2,
    blur_p=1.0,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    eval_resize=256,
    eval_interpolation="bilinear",
)

# SimCLR (Chen et al. 2020, appendix A): RRC (0.08, 1) bicubic, flip, jitter p .8, gray .2, blur 10% kernel
# sigma (0.1, 2) p .5; jitter at strength 0.5, i.e. (0.4, 0.4, 0.4, 0.1) (the CIFAR / MoCo-v2 strength).
_SIMCLR = dataclasses.replace(_IMAGENET_A, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)

# BYOL at 32 px (solo-learn scripts/pretrain/cifar/augmentations/asymmetric.yaml): jitter (.4, .4, .2, .1) p .8,
# gray .2, no blur at this size, solarize 0 / 0.2; CIFAR-10 mean/std.
_BYOL_CIFAR = dataclasses.replace(_CIFAR10, jitter=(0.4, 0.4, 0.2, 0.1))

# MAE (spec §4): RandomResizedCrop(224, scale (0.2, 1), bicubic) + flip, nothing photometric; ImageNet mean/std.
_MAE = dataclasses.replace(
    _IMAGENET_A,
    scale=(0.2, 1.0),
    jitter=(0.0, 0.0, 0.0, 0.0),
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=0.0,
    eval_interpolation="bicubic",
)

# DINO (main_dino.py DataAugmentationDINO): global crops RRC(224, (0.4, 1), bicubic), flip, jitter (.4, .4, .2, .1)
# p .8, gray .2; global 1 blur 1.0, global 2 blur 0.1 + solarize 0.2; local crops RRC(96, (0.05, 0.4)), blur 0.5.
_DINO_GLOBAL = dataclasses.replace(_MEC_1, scale=(0.4, 1.0), interpolation="bicubic", eval_interpolation="bicubic")

# SwAV (facebookresearch/swav src/multicropdataset.py): RandomResizedCrop(224, scale (0.14, 1), bilinear), flip,
# get_color_distortion(s=1): ColorJitter(0.8, 0.8, 0.8, 0.2) p .8 + RandomGrayscale .2, PILRandomGaussianBlur radius
# (0.1, 2) p .5, ImageNet mean/std (the official std reads 0.228 for red); the global views of multi-crop.
_SWAV = Augment(
    crop_size=224,
    scale=(0.14, 1.0),
    interpolation="bilinear",
    flip_p=0.5,
    jitter=(0.8, 0.8, 0.8, 0.2),
    jitter_p=0.8,
    gray_p=0.2,
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    eval_resize=256,
    eval_interpolation="bilinear",
)

PRESETS: dict[str, AugmentSpec] = {
    # OFF-MMCR CIFAR-10: RRC(32, (0.08, 1), bilinear), flip .5, jitter(.4,.4,.4,.1) p=.8, gray .2.
    "cifar10": _CIFAR10,
    # OFF-MMCR CIFAR-100: identical, including the CIFAR-10 normalisation constants (as OFF-MMCR does).
    "cifar100": dataclasses.replace(_CIFAR10),
    # MIN-MMCR: gray .1, blur k=3 sigma (0.1, 2) p=.1, solarize p=.2 -- at the *intended* threshold
    # 0.5 on [0, 1] floats, not MIN-MMCR's effective "invert every pixel >= 1 on uint8".
    "cifar_min": dataclasses.replace(
        _CIFAR10, gray_p=0.1, blur_p=0.1, blur_kernel=3, blur_sigma=(0.1, 2.0), solarize_p=0.2, solarize_threshold=0.5
    ),
    # OFF-MMCR STL-10: jitter and gray *before* RRC(64, (0.2, 1), bicubic); eval Resize(70, bicubic) + CenterCrop(64).
    "stl10": Augment(
        crop_size=64,
        scale=(0.2, 1.0),
        ratio=(0.75, 4.0 / 3.0),
        interpolation="bicubic",
        flip_p=0.5,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.1,
        mean=STL10_MEAN,
        std=STL10_STD,
        eval_resize=70,
        eval_interpolation="bicubic",
        color_first=True,
    ),
    # OFF-MMCR ImageNet (Barlow-Twins style): A = blur 1.0 / solarize 0, B = blur 0.1 / solarize 0.2.
    "imagenet": (_IMAGENET_A, dataclasses.replace(_IMAGENET_A, blur_p=0.1, solarize_p=0.2)),
    # OFF-MEC (MoCo-v3): RRC(224, (0.2, 1), bilinear); view 1 blur 1.0, view 2 blur 0.1 + solarize 0.2.
    "mec": (_MEC_1, dataclasses.replace(_MEC_1, blur_p=0.1, solarize_p=0.2)),
    # SimCLR ImageNet, symmetric: RRC(224, (0.08, 1), bicubic), flip, jitter (.4,.4,.4,.1) p .8, gray .2, blur p .5.
    "simclr": _SIMCLR,
    # SimCLR CIFAR (paper B.9: no blur at 32 px, jitter strength 0.5): the same as ``cifar10``.
    "simclr_cifar": dataclasses.replace(_CIFAR10),
    # BYOL ImageNet (Grill et al. table 6): A = blur 1.0 / solarize 0, B = blur 0.1 / solarize 0.2 (as ``imagenet``).
    "byol": (_IMAGENET_A, dataclasses.replace(_IMAGENET_A, blur_p=0.1, solarize_p=0.2)),
    # BYOL CIFAR (solo-learn): crop 32, CIFAR mean/std, no blur; A solarize 0, B solarize 0.2.
    "byol_cifar": (_BYOL_CIFAR, dataclasses.replace(_BYOL_CIFAR, solarize_p=0.2)),
    # MAE pretraining (spec §4): RRC(224, (0.2, 1), bicubic) + flip only; eval Resize 256 (bicubic) + CenterCrop 224.
    "mae": _MAE,
    # MAE at 32 px: the same crop-and-flip-only pipeline, CIFAR-10 mean/std.
    "mae_cifar": dataclasses.replace(_MAE, crop_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, eval_resize=None),
    # CAN (CANc util/datasets, each of the 2 views): RRC(224, (0.2, 1), bilinear), flip, jitter (.4,.4,.4,.1) p .8,
    # gray .2, blur sigma (0.1, 2) p .5, symmetric.
    "can": dataclasses.replace(_SIMCLR, scale=(0.2, 1.0), interpolation="bilinear", eval_interpolation="bicubic"),
    # CAN at 32 px: as ``can`` without blur (SimCLR's CIFAR choice), CIFAR-10 mean/std.
    "can_cifar": dataclasses.replace(_CIFAR10, scale=(0.2, 1.0)),
    # DINO's two global views (multi-crop: data.views 2 with data.local_augment dino_local).
    "dino": (_DINO_GLOBAL, dataclasses.replace(_DINO_GLOBAL, blur_p=0.1, solarize_p=0.2)),
    # DINO's local views: RRC(96, (0.05, 0.4), bicubic), flip, the same jitter and gray, blur p .5.
    "dino_local": dataclasses.replace(_DINO_GLOBAL, crop_size=96, scale=(0.05, 0.4), blur_p=0.5),
    # SwAV's 2 global views (data.views 2; data.local_augment swav_local).
    "swav": _SWAV,
    # SwAV's local views: RandomResizedCrop(96, (0.05, 0.14)), the same photometric ops; kernel 13 covers PIL's blur
    # (about ±3σ at σ 2).
    "swav_local": dataclasses.replace(_SWAV, crop_size=96, scale=(0.05, 0.14), blur_kernel=13),
    # SwAV CIFAR (solo-learn scripts/pretrain/cifar/augmentations/symmetric.yaml): RRC(32, (0.08, 1)), flip, jitter
    # (0.8, 0.8, 0.8, 0.2) p .8, gray .2, PIL blur sigma (0.1, 2) p .5 (kernel 13), CIFAR-10 mean/std.
    "swav_cifar": dataclasses.replace(_CIFAR10, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, blur_kernel=13),
    # DINO at 32 px (solo-learn scripts/pretrain/cifar/dino.yaml: asymmetric.yaml): the ``byol_cifar`` pipelines.
    "dino_cifar": (_BYOL_CIFAR, dataclasses.replace(_BYOL_CIFAR, solarize_p=0.2)),
    # Local crops for 32 px multi-crop (not in solo-learn, which has none at 32 px): RRC(16, (0.05, 0.4)) with the
    # global crops' jitter and gray, DINO's local scale range at half the global side (DINO: 96 of 224).
    "dino_cifar_local": dataclasses.replace(_BYOL_CIFAR, crop_size=16, scale=(0.05, 0.4)),
    # MoCo v3 (main_moco.py augmentation1 / augmentation2 at the default --crop-min 0.08, the ViT runs): ``mec``
    # with RRC scale (0.08, 1).
    "mocov3": (
        dataclasses.replace(_MEC_1, scale=(0.08, 1.0)),
        dataclasses.replace(_MEC_1, scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2),
    ),
    # SimSiam (main_simsiam.py, MoCo v2's augmentation): RRC(224, (0.2, 1)) bilinear, jitter (.4, .4, .4, .1) p .8,
    # gray .2, blur sigma (0.1, 2) p .5, flip; symmetric.
    "simsiam": dataclasses.replace(_MEC_1, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5),
    # SimSiam CIFAR (solo-learn symmetric_weak.yaml): RRC(32, (0.08, 1)) bicubic, jitter (.4, .4, .4, .1) p .8, gray
    # .2, PIL blur sigma (0.1, 2) p .5 (kernel 13), no solarisation; symmetric.
    "simsiam_cifar": dataclasses.replace(_CIFAR10, interpolation="bicubic", blur_p=0.5, blur_kernel=13),
    # VICReg CIFAR (solo-learn scripts/pretrain/cifar/vicreg.yaml, inline): RRC(32, (0.2, 1)) bicubic, jitter (.4, .4,
    # .2, .1) p .8, gray .2, no blur, solarize p .1; symmetric.
    "vicreg_cifar": dataclasses.replace(
        _CIFAR10, interpolation="bicubic", scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), solarize_p=0.1
    ),
    # I-JEPA (facebookresearch/ijepa src/transforms.py make_transforms with configs/in1k_vith14_ep300.yaml: crop_scale
    # (0.3, 1.0), use_horizontal_flip / use_color_distortion / use_gaussian_blur false): RandomResizedCrop(224, (0.3,
    # 1), torchvision's default bilinear and ratio (3/4, 4/3)), no flip, nothing photometric; ImageNet mean/std.
    "ijepa": dataclasses.replace(
        _IMAGENET_A,
        scale=(0.3, 1.0),
        interpolation="bilinear",
        flip_p=0.0,
        jitter=(0.0, 0.0, 0.0, 0.0),
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    ),
    # I-JEPA at 32 px: the same crop-only pipeline, CIFAR-10 mean/std, no eval resize.
    "ijepa_cifar": Augment(
        crop_size=32,
        scale=(0.3, 1.0),
        interpolation="bilinear",
        flip_p=0.0,
        jitter=(0.0, 0.0, 0.0, 0.0),
        jitter_p=0.0,
        gray_p=0.0,
    ),
}


def get_preset(name: str) -> AugmentSpec:
    """Return a fresh copy of preset ``name`` (an :class:`Augment` or an asymmetric pair).

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[name]
    if isinstance(spec, Augment):
        return dataclasses.replace(spec)
    return tuple(dataclasses.replace(a) for a in spec)  # type: ignore[return-value]


def as_pipelines(preset: AugmentSpec | Sequence[Augment] | str) -> list[Augment]:
    """Normalise a preset (name, single :class:`Augment`, or pair/list) to a list of pipelines."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    if isinstance(preset, Augment):
        return [preset]
    pipes = list(preset)
    if not pipes or not all(isinstance(p, Augment) for p in pipes):
        raise TypeError(f"expected an Augment or a non-empty sequence of Augment, got {preset!r}")
    return pipes


# --------------------------------------------------------------------------------------------------
# Per-image CPU pipelines (torchvision v2)
# --------------------------------------------------------------------------------------------------


class _ToPlainTensor(torch.nn.Module):
    """Strip the ``tv_tensors.Image`` subclass so callers get an ordinary ``torch.Tensor``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.as_subclass(torch.Tensor)


def _color_ops(aug: Augment) -> list[torch.nn.Module]:
    """ColorJitter (applied with ``jitter_p``) and RandomGrayscale, skipping disabled ones."""
    ops: list[torch.nn.Module] = []
    b, c, s, h = aug.jitter
    if aug.jitter_p > 0.0 and max(b, c, s, h) > 0.0:
        jitter = v2.ColorJitter(brightness=b or None, contrast=c or None, saturation=s or None, hue=h or None)
        ops.append(v2.RandomApply([jitter], p=aug.jitter_p))
    if aug.gray_p > 0.0:
        ops.append(v2.RandomGrayscale(p=aug.gray_p))
    return ops


def _crop_flip_ops(aug: Augment) -> list[torch.nn.Module]:
    """RandomResizedCrop (antialiased) and, unless ``flip_p`` is 0, RandomHorizontalFlip."""
    ops: list[torch.nn.Module] = [
        v2.RandomResizedCrop(
            aug.crop_size,
            scale=aug.scale,
            ratio=aug.ratio,
            interpolation=_INTERPOLATIONS[aug.interpolation],
            antialias=True,
        )
    ]
    if aug.flip_p > 0.0:
        ops.append(v2.RandomHorizontalFlip(p=aug.flip_p))
    return ops


def per_image_transform(aug: Augment) -> Callable[[Any], torch.Tensor]:
    """Build the per-image training pipeline for ``aug`` with torchvision v2 transforms.

    The returned callable takes a PIL image or a ``uint8 [3, H, W]`` tensor (a float tensor in ``[0, 1]``
    also works) and returns a normalised ``float32 [3, crop, crop]`` tensor.

    Geometric and colour ops run on uint8 (fast paths, as the reference repos do on PIL images); the image
    is converted to float in ``[0, 1]`` before blur and solarize, so the solarize threshold is the float
    ``aug.solarize_threshold`` (0.5 == 128 on uint8).
    """
    ops: list[torch.nn.Module] = [v2.ToImage()]
    if aug.color_first:
        ops += _color_ops(aug)
    ops += _crop_flip_ops(aug)
    if not aug.color_first:
        ops += _color_ops(aug)
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if aug.blur_p > 0.0:
        blur = v2.GaussianBlur(kernel_size=aug.kernel_size, sigma=aug.blur_sigma)
        ops.append(v2.RandomApply([blur], p=aug.blur_p))
    if aug.solarize_p > 0.0:
        ops.append(v2.RandomSolarize(threshold=aug.solarize_threshold, p=aug.solarize_p))
    ops += [v2.Normalize(mean=list(aug.mean), std=list(aug.std)), _ToPlainTensor()]
    return v2.Compose(ops)


def crop_flip_transform(aug: Augment, resize: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The geometric ops of ``aug`` alone, per image: ``RandomResizedCrop`` + ``RandomHorizontalFlip``.

    For batched views of images that cannot be stacked at full size: the loader crops each view from
    the full decoded image here (the box drawn exactly as torchvision's ``RandomResizedCrop`` draws it,
    on the image's own height and width; antialiased resize with ``aug.interpolation``) and
    :class:`selfsup.data.batched.BatchedViews` applies the photometric ops to the stacked crops.

    ``resize`` (optional) first resizes the short side to that many pixels, keeping the aspect ratio,
    so the box distribution relative to the image is unchanged. The callable takes a PIL image or a
    ``uint8 [3, H, W]`` tensor and returns a plain ``uint8 [3, crop, crop]`` tensor; its randomness comes
    from torch's global RNG only (as every torchvision v2 transform's).
    """
    ops: list[torch.nn.Module] = [v2.ToImage()]
    if resize is not None:
        ops.append(v2.Resize(int(resize), antialias=True))
    ops += _crop_flip_ops(aug)
    ops.append(_ToPlainTensor())
    return v2.Compose(ops)


def eval_transform(aug: Augment, size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """Deterministic evaluation transform matching ``aug``'s normalisation and resolution.

    * ``aug.eval_resize`` set: ``Resize(eval_resize, eval_interpolation) -> CenterCrop(crop_size)``
      (STL-10: 70 -> 64; ImageNet: 256 -> 224).
    * otherwise the image is used at its own size (CIFAR eval is ToTensor + Normalize only).

    ``size`` overrides the final side: with ``eval_resize`` set, the resize keeps the preset's
    resize/crop ratio (``round(eval_resize * size / crop_size)``); without it, ``Resize(size) ->
    CenterCrop(size)``. Returns a callable on PIL images or uint8 tensors giving ``float32 [3, H, W]``.
    """
    ops: list[torch.nn.Module] = [v2.ToImage()]
    interp = _INTERPOLATIONS[aug.eval_interpolation]
    if aug.eval_resize is not None:
        side = aug.crop_size if size is None else int(size)
        resize = aug.eval_resize if size is None else round(aug.eval_resize * side / aug.crop_size)
        ops += [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(side)]
    elif size is not None:
        ops += [v2.Resize(int(size), interpolation=interp, antialias=True), v2.CenterCrop(int(size))]
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
        _ToPlainTensor(),
    ]
    return v2.Compose(ops)


def check_view_count(n_views: int, n_pipelines: int) -> None:
    """Views are assigned to pipelines by slot (``v % P``): V must be >= 1 and a multiple of P."""
    if int(n_views) < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if n_views % n_pipelines != 0:
        raise ValueError(
            f"n_views={n_views} must be a multiple of the number of pipelines ({n_pipelines}): "
            "an asymmetric pair needs an even number of views (even slots A, odd slots B)"
        )


class MultiViewTransform:
    """Draw ``n_views`` augmented views of one image: ``img -> float32 [V, 3, H, W]``.

    View ``v`` uses ``pipelines[v % len(pipelines)]``: with an asymmetric pair, even slots are pipeline A
    and odd slots pipeline B (the OFF-MMCR layout). Used as a dataset transform, the DataLoader then
    yields sample-major ``[B, V, 3, H, W]`` batches.

    Args:
        pipelines: per-image callables (e.g. from :func:`per_image_transform`); :class:`Augment`
            entries are converted with :func:`per_image_transform`.
        n_views: number of views per image, >= 1; must be a multiple of ``len(pipelines)`` so every
            pipeline gets the same number of views (an asymmetric pair needs an even ``n_views``).
    """

    def __init__(self, pipelines: Sequence[Callable[[Any], torch.Tensor] | Augment], n_views: int) -> None:
        pipes = [per_image_transform(p) if isinstance(p, Augment) else p for p in pipelines]
        if not pipes:
            raise ValueError("MultiViewTransform needs at least one pipeline")
        check_view_count(n_views, len(pipes))
        self.pipelines = pipes
        self.n_views = int(n_views)

    def __call__(self, img: Any) -> torch.Tensor:
        n = len(self.pipelines)
        return torch.stack([self.pipelines[v % n](img) for v in range(self.n_views)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_views={self.n_views}, pipelines={len(self.pipelines)})"
