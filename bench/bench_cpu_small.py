"""Bench (b): the cpu-small recipe's CIFAR-10 kNN top-1 after ~10 minutes of pretraining on 2 CPU cores,
next to the same kNN on the randomly initialised network (full 50,000-image bank, full 10,000-image test set,
k=200, T=0.5, backbone features).

    python bench/bench_cpu_small.py [--zip ../shared/datasets/cifar10-jpeg.zip] [extra pretrain overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]


def knn_full(backbone, data) -> dict:
    from selfsup.data.build import build_eval_dataset
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy

    bank = build_eval_dataset(data, "train")
    test = build_eval_dataset(data, "test")
    bf, by = extract_features(backbone, DataLoader(bank, batch_size=1000))
    tf, ty = extract_features(backbone, DataLoader(test, batch_size=1000))
    return {"n_bank": len(by), "n_test": len(ty), **knn_accuracy(bf, by, tf, ty, num_classes=10, k=200, temperature=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes/cpu-small.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    from selfsup.cli import _pretrain_parser
    from selfsup.engine.pretrain import pretrain

    out = tempfile.mkdtemp(prefix="cpu-small-")
    argv = ["--config", args.recipe, "--data.root", args.zip, "--trainer.out_dir", out,
            "--monitor.every_n_epochs", "0", *overrides]
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)
    import lightning as L

    L.seed_everything(cfg.trainer.seed, verbose=False)
    init = parser.instantiate(cfg)
    random_knn = knn_full(init.method.backbone, init.data)
    t0 = time.time()
    pretrain(init.method, init.data, init.optim, init.trainer, init.monitor)
    minutes = (time.time() - t0) / 60
    trained_knn = knn_full(init.method.backbone, init.data)
    res = {"pretrain_minutes": round(minutes, 2), "random_init": random_knn, "pretrained": trained_knn,
           "overrides": overrides}
    print(json.dumps(res, indent=2))
    print(f"kNN top-1 on the full CIFAR-10 test set: random init {random_knn['top1']:.2f}% -> "
          f"MMCR cpu-small {trained_knn['top1']:.2f}% after {minutes:.1f} min of pretraining")


if __name__ == "__main__":
    sys.exit(main())
