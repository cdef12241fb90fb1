"""Write the format-1 checkpoints kept in ``tests/fixtures/`` (checkpoints of the first MMCR release).

Format 1 is what commit d4212b6 (before Foundation v2) writes. This script checks that commit out into a
temporary git worktree and runs a tiny MMCR pretraining there (plain and momentum variants), on images it
draws itself (no dataset needed), so the fixtures are always produced by that code, never edited by hand:

    python scripts/make_v1_checkpoint.py            # from the repository root

``tests/test_checkpoint_compat.py`` loads them with today's code (evaluation, export, resume refusal).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

COMMIT = "d4212b6"
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"

RUN = r"""
import sys, torch
from torch.utils.data import TensorDataset
sys.path.insert(0, ".")
from selfsup.methods import MMCR
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.pretrain import pretrain

out, momentum = sys.argv[1], sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
labels = torch.arange(16) % 4
torch.manual_seed(0)
method = MMCR(backbone={"name": "resnet10", "cifar_stem": True, "width": 4}, projector=[16, 8],
              momentum_tau=0.9 if momentum else None)
data = DataConfig(dataset="cifar10", batch_size=8, views=2, augment="cifar10", view_mode="batched", num_workers=0)
pretrain(method, data, OptimConfig(name="adam", lr=1e-3), TrainerConfig(out_dir=out, max_epochs=1, logger="none",
         progress_bar=False, precision="32-true"), MonitorConfig(every_n_epochs=0),
         train_dataset=TensorDataset(images, labels))
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "v1"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), COMMIT], check=True)
        try:
            for name, momentum in (("v1_mmcr.ckpt", "0"), ("v1_mmcr_momentum.ckpt", "1")):
                run = Path(tmp) / name
                subprocess.run([sys.executable, "-c", RUN, str(run), momentum], cwd=tree, check=True)
                shutil.copy(run / "checkpoints" / "last.ckpt", OUT / name)
                print("wrote", OUT / name)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


if __name__ == "__main__":
    main()
