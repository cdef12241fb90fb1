"""Bench (b): CIFAR-10 kNN top-1 of the ``cpu-small`` recipes after ~10 minutes of pretraining each on 2 CPU
cores, side by side with the randomly initialised network, in one script run (full 50,000-image bank, full
10,000-image test set, k=200, T=0.5, backbone features).

    python bench/bench_cpu_small.py                                  # MMCR cpu-small only
    python bench/bench_cpu_small.py --recipes mmcr mec simclr byol   # the four methods, one after the other
    python bench/bench_cpu_small.py --recipes mec -- --method.init_args.eps_sq 128   # overrides for every run

Each run uses the recipe as shipped (its own ``trainer.max_steps``, chosen to take ~10 minutes on an unloaded
2-core machine); the script reports the wall time it actually took, so a loaded machine shows up as longer
runs, not as lower accuracy. Every recipe is seeded identically, so the backbones start from the same random
weights: the random-init row is measured once and checked to be the same network for every recipe.
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
RECIPES = {
    "mmcr": "cpu-small.yaml",
    "mec": "mec-cpu-small.yaml",
    "simclr": "simclr-cpu-small.yaml",
    "byol": "byol-cpu-small.yaml",
}


def knn_full(backbone, data) -> dict:
    from selfsup.data.build import build_eval_dataset
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy

    bank = build_eval_dataset(data, "train")
    test = build_eval_dataset(data, "test")
    bf, by = extract_features(backbone, DataLoader(bank, batch_size=1000))
    tf, ty = extract_features(backbone, DataLoader(test, batch_size=1000))
    return {"n_bank": len(by), "n_test": len(ty), **knn_accuracy(bf, by, tf, ty, num_classes=10, k=200, temperature=0.5)}


def _instantiate(recipe: str, zip_path: str, overrides: list[str]):
    import lightning as L

    from selfsup.cli import _pretrain_parser

    out = tempfile.mkdtemp(prefix=f"{Path(recipe).stem}-")
    argv = ["--config", recipe, "--data.root", zip_path, "--trainer.out_dir", out,
            "--monitor.every_n_epochs", "0", *overrides]
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)
    L.seed_everything(cfg.trainer.seed, verbose=False)
    return parser.instantiate(cfg), cfg


def _state_digest(module: torch.nn.Module) -> float:
    return float(sum(p.double().sum() for p in module.state_dict().values() if p.is_floating_point()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"))
    ap.add_argument("--recipes", nargs="+", default=["mmcr"], help=f"names ({', '.join(RECIPES)}) or YAML paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="also write the JSON here")
    args, overrides = ap.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    torch.set_num_threads(args.threads)
    from selfsup.engine.pretrain import pretrain

    rows, random_knn, random_digest, results = [], None, None, {}
    for name in args.recipes:
        recipe = str(ROOT / "recipes" / RECIPES[name]) if name in RECIPES else name
        init, cfg = _instantiate(recipe, args.zip, overrides)
        digest = _state_digest(init.method.backbone)
        if random_knn is None:
            t0 = time.time()
            random_knn = knn_full(init.method.backbone, init.data)
            random_digest = digest
            print(f"random init: kNN top-1 {random_knn['top1']:.2f}% ({time.time() - t0:.0f} s to evaluate)", flush=True)
        same_init = abs(digest - random_digest) < 1e-6 * max(1.0, abs(random_digest))
        t0 = time.time()
        pretrain(init.method, init.data, init.optim, init.trainer, init.monitor)
        minutes = (time.time() - t0) / 60
        knn = knn_full(init.method.backbone, init.data)
        results[name] = {"recipe": recipe, "method": type(init.method).__name__, "steps": cfg.trainer.max_steps,
                         "pretrain_minutes": round(minutes, 2), "same_random_init": same_init, "knn": knn}
        rows.append((name, type(init.method).__name__, cfg.trainer.max_steps, minutes, knn["top1"]))
        print(f"{name}: kNN top-1 {knn['top1']:.2f}% after {minutes:.1f} min ({cfg.trainer.max_steps} steps)",
              flush=True)
    res = {"random_init": random_knn, "runs": results, "overrides": overrides, "threads": args.threads}
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2))
    print("\nCIFAR-10 kNN top-1 (k=200, T=0.5), full 50k bank / 10k test, backbone features:")
    print(f"  {'recipe':<10} {'method':<8} {'steps':>6} {'minutes':>8} {'top-1':>7} {'vs random':>10}")
    print(f"  {'random':<10} {'-':<8} {0:>6} {0:>8.1f} {random_knn['top1']:>7.2f} {0:>+10.2f}")
    for name, method, steps, minutes, top1 in rows:
        print(f"  {name:<10} {method:<8} {steps:>6} {minutes:>8.1f} {top1:>7.2f} {top1 - random_knn['top1']:>+10.2f}")


if __name__ == "__main__":
    sys.exit(main())
