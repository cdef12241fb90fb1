"""Command-line pieces the CLI tests share (one home for what every pretrain test passes)."""

from __future__ import annotations

import shlex

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
