"""``selfsup demo``: MMCR on the CIFAR-10 sample shipped in the package (4,000 train / 1,000 test
images, no download), then kNN and linear-probe accuracy next to the same evaluation of the
randomly initialised network. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader

from selfsup.data.build import build_eval_dataset, num_classes
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import ProbeConfig, linear_probe_cached
from selfsup.methods import MMCR

DEMO_BACKBONE = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 32}}
# 5 epochs at cpu-small's Adam lr 1e-2 give about the lift 10 epochs at 2e-3 gave (kNN +14.7 vs +16.0, linear +19.8
# vs +19.7 on the sample's test split) in 2 min 34 s instead of 4 min 32 s on 2 CPU cores (docs/benchmarks.md).
DEMO_EPOCHS = 5
DEMO_LR = 1e-2


def demo_configs(out_dir: str, epochs: int, progress_bar: Union[bool, str] = "auto"):
    data = DataConfig(
        dataset="demo", batch_size=64, views=4, augment="cifar10", view_mode="batched", in_memory=True, num_workers=0
    )
    optim = OptimConfig(
        name="adam", lr=DEMO_LR, weight_decay=1e-6, exclude_1d=False, schedule="cosine", warmup_epochs=0.5
    )
    trainer = TrainerConfig(
        out_dir=out_dir,
        max_epochs=epochs,
        channels_last=True,
        logger="csv",
        precision="auto",
        progress_bar=progress_bar,
        log_every_n_steps=10,
        save_every_n_epochs=epochs,
    )
    monitor = MonitorConfig(every_n_epochs=0)
    return data, optim, trainer, monitor


def evaluate(backbone: torch.nn.Module, data: DataConfig, probe_epochs: int = 30) -> dict[str, float]:
    """kNN (k=200, T=0.5) and a cached-feature linear probe on the demo train/test splits."""
    bank = build_eval_dataset(data, "train")
    test = build_eval_dataset(data, "test")
    c = num_classes(bank)
    bank_f, bank_y = extract_features(backbone, DataLoader(bank, batch_size=500))
    test_f, test_y = extract_features(backbone, DataLoader(test, batch_size=500))
    knn = knn_accuracy(bank_f, bank_y, test_f, test_y, num_classes=c, k=200, temperature=0.5)
    probe = linear_probe_cached(
        bank_f,
        bank_y,
        test_f,
        test_y,
        c,
        ProbeConfig(epochs=probe_epochs, lrs=(0.1, 1.0), weight_decays=(0.0,), batch_size=256),
    )
    return {
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "linear_top1": probe.test_top1,
        "linear_top5": probe.test_top5,
    }


def demo(
    out_dir: Optional[str] = None, epochs: int = DEMO_EPOCHS, progress_bar: Union[bool, str] = "auto", seed: int = 0
) -> dict:
    from selfsup.engine.pretrain import pretrain

    torch.manual_seed(seed)
    out_dir = out_dir or str(Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    data, optim, trainer, monitor = demo_configs(out_dir, epochs, progress_bar)
    method = MMCR(backbone=DEMO_BACKBONE, projector=[512, 128])
    print(
        f"selfsup demo: MMCR, {DEMO_BACKBONE['name']} (width {DEMO_BACKBONE['kwargs']['width']}, CIFAR stem), "
        f"{data.views} views x {data.batch_size} images, {epochs} epochs on the shipped CIFAR-10 sample; run dir {out_dir}"
    )
    t0 = time.time()
    before = evaluate(method.backbone, data)
    result = pretrain(method, data, optim, trainer, monitor)
    after = evaluate(method.backbone, data)
    minutes = (time.time() - t0) / 60
    rows = [
        ("kNN top-1", "knn_top1"),
        ("kNN top-5", "knn_top5"),
        ("linear top-1", "linear_top1"),
        ("linear top-5", "linear_top5"),
    ]
    print("\n                 random init   MMCR")
    for label, key in rows:
        print(f"  {label:<14} {before[key]:10.2f}%  {after[key]:6.2f}%")
    print(f"\n({minutes:.1f} min; test split of the sample: 1,000 images. Checkpoint: {result['last_checkpoint']})")
    return {"random_init": before, "pretrained": after, "run_dir": out_dir, "minutes": minutes}
