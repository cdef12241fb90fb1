"""lightly's transforms from a recipe's Augment pipelines (and the notes where lightly cannot take a recipe value),
and the training images as the PIL images lightly's examples transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from torch.utils.data import Dataset

from .api import Ctx, Unsupported


def normalize_kwargs(aug) -> dict:
    """lightly's ``normalize`` argument from a recipe Augment."""
    return {"mean": list(aug.mean), "std": list(aug.std)}


def jitter_kwargs(aug) -> dict:
    """lightly's colour-jitter arguments (``cj_*``, strength 1: the recipe's four amounts as they are)."""
    b, c, s, h = aug.jitter
    return {"cj_prob": aug.jitter_p, "cj_strength": 1.0, "cj_bright": b, "cj_contrast": c, "cj_sat": s, "cj_hue": h}


def view_kwargs(aug) -> dict:
    """lightly's per-view transform arguments (SimCLR / BYOL / VICReg / SimSiam / MMCR style) from a recipe Augment."""
    return {
        "input_size": aug.crop_size,
        "min_scale": aug.scale[0],
        "random_gray_scale": aug.gray_p,
        "gaussian_blur": aug.blur_p,
        "hf_prob": aug.flip_p,
        "sigmas": tuple(aug.blur_sigma),
        "normalize": normalize_kwargs(aug),
        **jitter_kwargs(aug),
    }


def aug_notes(augs: Sequence, interpolation: str, what: str, fixed_flip: Optional[float] = None) -> list[str]:
    """Where lightly's transform cannot take a recipe value."""
    notes = []
    for i, a in enumerate(augs):
        tag = f"{what}" + (f" view {i + 1}" if len(augs) > 1 else "")
        if a.interpolation != interpolation:
            notes.append(f"{tag}: crop resize {interpolation} in lightly's transform, {a.interpolation} in the recipe")
        if tuple(a.ratio) != (3.0 / 4.0, 4.0 / 3.0):
            notes.append(f"{tag}: crop aspect ratio (3/4, 4/3) in lightly's transform, {tuple(a.ratio)} in the recipe")
        if a.color_first:
            notes.append(f"{tag}: lightly jitters after the crop, the recipe before it")
        if fixed_flip is not None and a.flip_p != fixed_flip:
            notes.append(f"{tag}: horizontal flip p {fixed_flip} in lightly's transform, {a.flip_p} in the recipe")
        if a.blur_p > 0:
            notes.append(f"{tag}: lightly blurs with PIL's GaussianBlur(radius = sigma), the recipe with a kernel")
    return notes


def crop_max_notes(augs: Sequence, what: str) -> list[str]:
    """lightly's view transforms crop up to scale 1: a recipe crop maximum below it is noted."""
    return [
        f"{what}: lightly's transform crops scale ({a.scale[0]}, 1.0), the recipe ({a.scale[0]}, {a.scale[1]})"
        for a in augs
        if a.scale[1] != 1.0
    ]


def photometric_notes(augs: Sequence, what: str) -> list[str]:
    """lightly's MAE / I-JEPA transforms have no photometric ops: a recipe that has some is noted."""
    return [
        f"{what}: the recipe jitters / greys / blurs / solarises, lightly's transform does not"
        for a in augs
        if a.jitter_p > 0 or a.gray_p > 0 or a.blur_p > 0 or a.solarize_p > 0
    ]


def two_view_transform(ctx: Ctx) -> tuple[Callable, str, list[str]]:
    """SimCLRTransform for a symmetric pipeline, BYOLTransform (View1 / View2) for an asymmetric pair."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    augs = ctx.pipelines
    notes = aug_notes(augs, "bilinear", "views") + crop_max_notes(augs, "views")
    if len(augs) == 1:
        a = augs[0]
        if a.solarize_p > 0:
            raise Unsupported("SimCLRTransform has no solarisation; the recipe solarises")
        return SimCLRTransform(**view_kwargs(a)), "SimCLRTransform", notes
    a, b = augs
    return (
        BYOLTransform(
            BYOLView1Transform(**view_kwargs(a), solarization_prob=a.solarize_p),
            BYOLView2Transform(**view_kwargs(b), solarization_prob=b.solarize_p),
        ),
        "BYOLTransform(BYOLView1Transform, BYOLView2Transform)",
        notes,
    )


def dino_transform(ctx: Ctx, ibot: bool = False) -> tuple[Callable, str, list[str]]:
    """DINOTransform / IBOTTransform from the recipe's global pair and local pipeline."""
    from lightly.transforms import DINOTransform, IBOTTransform

    g = ctx.pipelines if len(ctx.pipelines) == 2 else [ctx.pipelines[0], ctx.pipelines[0]]
    loc = ctx.local[0] if ctx.local else None
    nloc = int(ctx.data.local_views or 0)
    a, b = g
    photometric = ("jitter", "jitter_p", "gray_p", "flip_p", "blur_sigma", "mean", "std")
    if any(getattr(a, k) != getattr(b, k) for k in (*photometric, "scale", "crop_size")) or (
        loc is not None and any(getattr(loc, k) != getattr(a, k) for k in photometric)
    ):
        raise Unsupported("lightly's DINO/iBOT transform shares jitter, grey, flip and normalisation across crops")
    if a.solarize_p > 0 or (loc is not None and loc.solarize_p > 0):
        raise Unsupported("lightly's DINO/iBOT transform solarises the second global crop only")
    kw = {
        "global_crop_size": a.crop_size,
        "global_crop_scale": tuple(a.scale),
        "local_crop_size": loc.crop_size if loc is not None else 96,
        "local_crop_scale": tuple(loc.scale) if loc is not None else (0.05, 0.4),
        "n_local_views": nloc,
        "hf_prob": a.flip_p,
        "random_gray_scale": a.gray_p,
        "gaussian_blur": (a.blur_p, b.blur_p, loc.blur_p if loc is not None else 0.0),
        "sigmas": tuple(a.blur_sigma),
        "solarization_prob": b.solarize_p,
        "normalize": normalize_kwargs(a),
        **jitter_kwargs(a),
    }
    cls, name = (IBOTTransform, "IBOTTransform") if ibot else (DINOTransform, "DINOTransform")
    notes = aug_notes(g, "bicubic", "global crops") + aug_notes([loc] if loc else [], "bicubic", "local crops")
    return cls(**kw), name, notes


class PILImages(Dataset):
    """The training images as ``(transform(PIL image), label)``: decoded once into memory, as
    ``torchvision.datasets.CIFAR10`` holds CIFAR-10 and hands PIL images to lightly's transforms in its examples
    (a dataset that is not in memory is read per image, as lightly's ``LightlyDataset`` of a folder)."""

    def __init__(self, data_cfg, transform: Callable):
        from selfsup.data.build import open_source

        if data_cfg.subset is not None or data_cfg.n_way is not None or data_cfg.n_shot is not None:
            raise ValueError("bench_peers trains on the whole training split: data.subset / n_way / n_shot are unset")
        source = open_source(data_cfg)
        self.transform = transform
        if source.in_memory:
            ds = source.decoded(data_cfg.train_split)
            self.images = ds.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, 3] uint8
            self.labels = ds.labels.tolist()
            self.raw = None
        else:
            self.raw = source.raw(data_cfg.train_split)
            self.labels = list(self.raw.targets)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i]) if self.raw is None else self.raw[i][0]
        return self.transform(img), self.labels[i]
