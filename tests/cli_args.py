"""Command-line pieces the CLI tests share (one home for what every pretrain test passes)."""

from __future__ import annotations

import shlex
from pathlib import Path

from selfsup.cli import main

#: A tiny MMCR: ResNet-10 of width 8 with the CIFAR stem, projector 16-8.
TINY_MMCR = shlex.split(
    "--method MMCR --method.init_args.backbone '{name: resnet10, kwargs: {cifar_stem: true, width: 8}}' "
    "--method.init_args.projector '[16, 8]'"
)
#: Two views per image made as one batched op from images decoded once into memory, no loader workers.
BATCHED_IN_MEMORY = shlex.split("--data.views 2 --data.view_mode batched --data.in_memory true --data.num_workers 0")
#: No logger, no progress output, no kNN or spectrum monitor: a run that only trains and checkpoints.
QUIET = shlex.split(
    "--trainer.logger none --trainer.progress_bar false --monitor.every_n_epochs 0 --monitor.spectrum_every_n_steps 0"
)

#: A tiny MMCR run on a real-image cifar10 zip (give it --data.root): batch 20, batched views, no logger, no monitor.
TINY_RUN = [
    *TINY_MMCR,
    "--data.dataset",
    "cifar10",
    "--data.batch_size",
    "20",
    *BATCHED_IN_MEMORY,
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
    "--monitor.every_n_epochs",
    "0",
]
#: A 2-block ViT-Tiny (32 px, patch 8) backbone, for tiny ViT runs.
TINY_VIT = "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, depth: 2}}"


class StopCommand(Exception):
    """Raised by a fake to end a command once it has shown what it needed to."""


def tiny_pretrain(run: Path, root: Path, *extra: str) -> Path:
    """``last.ckpt`` of a 1-epoch run of a width-8 ResNet-10 on 40 images of ``root``."""
    assert (
        main(
            [
                "pretrain",
                *TINY_RUN,
                "--data.root",
                str(root),
                "--data.subset",
                "40",
                "--trainer.max_epochs",
                "1",
                "--trainer.out_dir",
                str(run),
                *extra,
            ]
        )
        == 0
    )
    return run / "checkpoints" / "last.ckpt"


def tiny_vit_pretrain(run: Path, root: Path) -> Path:
    """``last.ckpt`` of a 1-epoch MMCR run of a 2-block ViT-Tiny (32 px, patch 8) on 40 images of ``root``."""
    return tiny_pretrain(run, root, "--method.init_args.backbone", TINY_VIT)
