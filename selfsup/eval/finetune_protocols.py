"""The fine-tune protocols as named presets: ``selfsup finetune --protocol NAME`` runs one of
:data:`FINETUNE_PROTOCOLS`, each a :class:`FinetuneProtocol` of a :class:`~selfsup.eval.finetune.FinetuneConfig`
(MAE's ViT-B and ViT-L fine-tunes, MIN-MMCR's ResNet-18 ``backbone+linear`` run and a CPU-sized ``fast``) with its
provenance, held to the rules of the linear-probe presets (:mod:`selfsup.eval.protocols`): selection on held-out
train, test scored once, best-on-val and last reported. Explicit command-line flags override single values
(:func:`resolve_finetune`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from selfsup.eval.finetune import FinetuneConfig

__all__ = [
    "FINETUNE_PROTOCOLS",
    "FinetuneProtocol",
    "finetune_protocol_names",
    "get_finetune_protocol",
    "resolve_finetune",
]


@dataclass(frozen=True)
class FinetuneProtocol:
    """One fine-tune protocol: a named :class:`~selfsup.eval.finetune.FinetuneConfig` with its provenance.

    Attributes:
        name: the preset name (``selfsup finetune --protocol NAME``).
        config: every value the fine-tune trains and selects with.
        source: the seed's protocol and values this preset takes.
        differs: where the preset deliberately differs from the seed.
        reproduces: the reported number(s) to compare against.
    """

    name: str
    config: FinetuneConfig
    source: str
    differs: str
    reproduces: str


_MAE_FT_SOURCE = (
    "MAE main_finetune.py + FINETUNE.md (spec-can-mae-imle 2.6): all patches, drop path, global average "
    "of the patch tokens + fc_norm, head trunc-normal std 2e-5; AdamW (0.9, 0.999), wd 0.05 except 1-D "
    "and pos_embed / cls_token; layer-wise lr decay ld^(depth + 1 - id); lr = blr x B/256 at effective "
    "batch 1024, {warm} warm-up epochs, cosine to min_lr 1e-6; timm create_transform: "
    "RandomResizedCrop bicubic (0.08, 1), flip, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25 "
    "pixel; Mixup 0.8 / CutMix 1.0, prob 1, switch 0.5, batch mode, label smoothing 0.1 folded into "
    "SoftTargetCrossEntropy; eval Resize 256 bicubic + CenterCrop 224; AMP"
)
_MAE_FT_DIFFERS = (
    "selection of the reported epoch on 1% of train held out (MAE reported the max ImageNet-val top-1 "
    "over epochs, i.e. selected on the reported split); both best-on-val and last are reported; "
    "per-step warm-up with a non-zero first lr; a ViT pretrained with global_pool token that is "
    "switched to avg averages the tokens after its pretrained final LayerNorm (MAE drops it and trains "
    "a fresh fc_norm; pretrain with global_pool avg for that layout); a ResNet gets stage-wise lr "
    "decay and no drop path"
)

FINETUNE_PROTOCOLS: dict[str, FinetuneProtocol] = {
    p.name: p
    for p in (
        FinetuneProtocol(
            name="fast",
            config=FinetuneConfig(
                epochs=10,
                batch_size=128,
                lr=1e-3,
                scale_lr="none",
                optimizer="adamw",
                weight_decay=0.05,
                layer_decay=0.75,
                warmup_epochs=1,
                min_lr=0.0,
                drop_path=0.1,
                pool=None,
                head_init_std=2e-5,
                label_smoothing=0.1,
                mixup=0.0,
                cutmix=0.0,
                augment="crop_flip",
                val_fraction=0.1,
            ),
            source="not a seed protocol: a CPU-sized fine-tune for quick comparisons. AdamW lr 1e-3 (not "
            "batch-scaled), wd 0.05, layer decay 0.75, drop path 0.1 (ViT), label smoothing 0.1, "
            "RandomResizedCrop + flip, 10 epochs, batch 128, 1 warm-up epoch, cosine to 0",
            differs="no mixup / cutmix / RandAugment (they need far more epochs than a quick run has); the "
            "backbone's own pooling",
            reproduces="no seed number; quick comparisons of checkpoints and methods",
        ),
        FinetuneProtocol(
            name="mae-finetune",
            config=FinetuneConfig(
                epochs=100,
                batch_size=1024,
                lr=5e-4,
                layer_decay=0.65,
                drop_path=0.1,
                warmup_epochs=5,
                pool="avg",
                val_fraction=0.01,
            ),
            source=_MAE_FT_SOURCE.format(warm=5)
            + "; ViT-B recipe: 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1",
            differs=_MAE_FT_DIFFERS,
            reproduces="MAE README / FINETUNE.md: ViT-B/16 fine-tuned on ImageNet-1k 83.6 top-1 (reproduced "
            "83.57 +- 0.08)",
        ),
        FinetuneProtocol(
            name="mae-finetune-large",
            config=FinetuneConfig(
                epochs=50,
                batch_size=1024,
                lr=1e-3,
                layer_decay=0.75,
                drop_path=0.2,
                warmup_epochs=5,
                pool="avg",
                val_fraction=0.01,
            ),
            source=_MAE_FT_SOURCE.format(warm=5) + "; ViT-L recipe: 50 epochs, blr 1e-3, layer decay 0.75, drop path "
            "0.2 (ViT-H: drop path 0.3)",
            differs=_MAE_FT_DIFFERS,
            reproduces="MAE README / FINETUNE.md: ViT-L/16 fine-tuned on ImageNet-1k 85.9 top-1 (reproduced "
            "85.87 +- 0.07); CAN paper ViT-L 86.1",
        ),
        FinetuneProtocol(
            name="min-mmcr-finetune",
            config=FinetuneConfig(
                epochs=50,
                batch_size=512,
                lr=1e-2,
                scale_lr="none",
                optimizer="adam",
                weight_decay=1e-6,
                layer_decay=1.0,
                warmup_epochs=5,
                min_lr=0.0,
                drop_path=0.0,
                pool=None,
                head_init_std=None,
                label_smoothing=0.0,
                mixup=0.0,
                cutmix=0.0,
                augment="ssl",
                val_fraction=0.1,
            ),
            source="MIN-MMCR finetune.py --finetune-type backbone+linear (spec-mmcr-mec 5.2; README 'Finetuning'): "
            "ResNet-18 + Linear(512, 10) trained end to end with the probe's optimiser: Adam lr 1e-2, wd "
            "1e-6, 50 epochs, warm-up 0.1 x 50 = 5 epochs then cosine, batch 512 (evaluate.py CLI; the "
            "README says 1024), one view of the SSL augmentation (pretrain with "
            "recipes/min-mmcr-cifar10.yaml), plain CE, 16-mixed",
            differs="no weight decay on biases / BatchNorm; per-step warm-up with a non-zero first lr (the seed's "
            "LambdaLR gives lr 0 for all of epoch 0); selection on held-out train (the seed kept the "
            "checkpoint with the best CIFAR-10 test top-1); fp32 unless --amp",
            reproduces="no fine-tune number in the repository (the README's table row labelled 'Finetune (Our)', "
            "89.19 / 99.61, is the linear probe: --finetune-type linear)",
        ),
    )
}


def finetune_protocol_names() -> tuple[str, ...]:
    """The fine-tune preset names, in definition order."""
    return tuple(FINETUNE_PROTOCOLS)


def get_finetune_protocol(name: str) -> FinetuneProtocol:
    """The fine-tune preset ``name``; an unknown name is a ``ValueError`` listing the valid ones."""
    if name not in FINETUNE_PROTOCOLS:
        raise ValueError(f"unknown fine-tune protocol {name!r}; valid: {', '.join(FINETUNE_PROTOCOLS)}")
    return FINETUNE_PROTOCOLS[name]


def resolve_finetune(name: str, **overrides: Any) -> FinetuneProtocol:
    """Fine-tune preset ``name`` with the :class:`~selfsup.eval.finetune.FinetuneConfig` fields in ``overrides``
    replacing the preset's (``None`` values meaning "the preset's")."""
    protocol = get_finetune_protocol(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(protocol, config=dataclasses.replace(protocol.config, **given)) if given else protocol
