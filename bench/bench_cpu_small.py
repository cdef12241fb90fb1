"""Bench (b): CIFAR-10 kNN top-1 of the ``cpu-small`` recipes after ~10 minutes of pretraining each on 2 CPU
cores, side by side with the randomly initialised network, in one script run (full 50,000-image bank, full
10,000-image test set, k=200, T=0.5, backbone features).

    python bench/bench_cpu_small.py                                  # MMCR cpu-small only
    python bench/bench_cpu_small.py --recipes mmcr mec simclr byol   # the four methods, one after the other
    python bench/bench_cpu_small.py --recipes mae can --linear       # + the `fast` linear probe (issue: ViTs)
    python bench/bench_cpu_small.py --recipes mec -- --method.init_args.eps_sq 128   # overrides for every run

Each run uses the recipe as shipped (its own ``trainer.max_steps``, chosen to take ~10 minutes on an unloaded
2-core machine); the script reports the wall time it actually took, so a loaded machine shows up as longer
runs, not as lower accuracy. Every recipe is seeded identically, so the backbones start from the same random
weights: the random-init row is measured once per distinct starting network (compared by a digest of the weights),
and each recipe is reported against the random init of its own backbone.
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


def recipe_path(name: str) -> str:
    """``mmcr`` is ``cpu-small.yaml``; any other short name ``X`` is the shipped ``X-cpu-small.yaml``; else a path."""
    from selfsup.recipes import RECIPES_DIR

    file = RECIPES_DIR / ("cpu-small.yaml" if name == "mmcr" else f"{name}-cpu-small.yaml")
    return str(file) if file.exists() else name


def evaluate(backbone, data, linear: bool) -> dict:
    """kNN (k=200, T=0.5) and, with ``linear``, the ``fast`` linear probe (cached features, lr x wd grid selected
    on a held-out 10% of train, never on test) on the full train / test splits."""
    from selfsup.data.build import build_eval_dataset
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy
    from selfsup.eval.linear import linear_probe_cached
    from selfsup.eval.protocols import get_protocol

    bank = build_eval_dataset(data, "train")
    test = build_eval_dataset(data, "test")
    bf, by = extract_features(backbone, DataLoader(bank, batch_size=1000))
    tf, ty = extract_features(backbone, DataLoader(test, batch_size=1000))
    out = {"n_bank": len(by), "n_test": len(ty), **knn_accuracy(bf, by, tf, ty, num_classes=10, k=200, temperature=0.5)}
    if linear:
        probe = linear_probe_cached(bf, by, tf, ty, 10, get_protocol("fast").probe)
        out["linear"] = {
            "test_top1": probe.test_top1,
            "test_top1_last": probe.test_top1_last,
            "val_top1": probe.val_top1,
            "lr": probe.lr,
            "weight_decay": probe.weight_decay,
        }
    return out


def instantiate_recipe(recipe: str, zip_path: str, overrides: list[str], runs_dir: str | None):
    """``(instantiated, config)`` of ``recipe`` on ``zip_path`` with ``overrides`` (kNN monitor off; the run directory
    a fresh one under ``runs_dir``), seeded with the recipe's seed: what every bench here trains from."""
    import lightning as L

    from selfsup.cli import _pretrain_parser

    if runs_dir:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix=f"{Path(recipe).stem}-", dir=runs_dir)
    argv = [
        "--config",
        recipe,
        "--data.root",
        zip_path,
        "--trainer.out_dir",
        out,
        "--monitor.every_n_epochs",
        "0",
        *overrides,
    ]
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)
    L.seed_everything(cfg.trainer.seed, verbose=False)
    return parser.instantiate(cfg), cfg


def state_digest(module: torch.nn.Module) -> float:
    """The sum of a module's floating-point state: equal digests, the same random init."""
    return float(sum(p.double().sum() for p in module.state_dict().values() if p.is_floating_point()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"))
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=["mmcr"],
        help="short names (mmcr, mec, simclr, byol, mae, can, dino, swav, barlow, vicreg, mocov3, simsiam, ...: the "
        "shipped X-cpu-small.yaml) or YAML paths",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="also write the JSON here")
    ap.add_argument("--linear", action="store_true", help="also run the `fast` linear probe (cached features)")
    ap.add_argument("--runs-dir", default=None, help="keep each run directory under here (default: a temp dir)")
    args, overrides = ap.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    torch.set_num_threads(args.threads)
    from selfsup.engine.pretrain import pretrain

    # One random-init row per distinct starting network (a ViT without a class token, another pooling...): every
    # recipe is compared with the random init of its own backbone, measured once per digest.
    rows, randoms, results = [], [], {}
    for name in args.recipes:
        recipe = recipe_path(name)
        init, cfg = instantiate_recipe(recipe, args.zip, overrides, args.runs_dir)
        digest = state_digest(init.method.backbone)
        ref = next((r for r in randoms if abs(digest - r["digest"]) < 1e-6 * max(1.0, abs(r["digest"]))), None)
        if ref is None:
            t0 = time.time()
            ref = {"name": f"random-{len(randoms)}" if randoms else "random", "first_recipe": name, "digest": digest}
            ref["eval"] = evaluate(init.method.backbone, init.data, args.linear)
            randoms.append(ref)
            print(
                f"{ref['name']} (the random init of {name}'s backbone): kNN top-1 {ref['eval']['top1']:.2f}%"
                f"{_lin(ref['eval'])} ({time.time() - t0:.0f} s to evaluate)",
                flush=True,
            )
        t0 = time.time()
        pretrain(init.method, init.data, init.optim, init.trainer, init.monitor)
        minutes = (time.time() - t0) / 60
        knn = evaluate(init.method.backbone, init.data, args.linear)
        results[name] = {
            "run_dir": str(cfg.trainer.out_dir),
            "recipe": recipe,
            "method": type(init.method).__name__,
            "steps": cfg.trainer.max_steps,
            "pretrain_minutes": round(minutes, 2),
            "random_init": ref["name"],
            "knn": knn,
        }
        rows.append((name, type(init.method).__name__, cfg.trainer.max_steps, minutes, knn, ref))
        print(
            f"{name}: kNN top-1 {knn['top1']:.2f}%{_lin(knn)} after {minutes:.1f} min ({cfg.trainer.max_steps} steps)",
            flush=True,
        )
        if args.output:  # after every run, so a long bench that is stopped keeps what it measured
            Path(args.output).write_text(json.dumps(_result(randoms, results), indent=2))
    res = {**_result(randoms, results), "overrides": overrides, "threads": args.threads}
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2))
    print("\nCIFAR-10 kNN top-1 (k=200, T=0.5), full 50k bank / 10k test, backbone features:")
    head = f"  {'recipe':<10} {'method':<8} {'steps':>6} {'minutes':>8} {'kNN':>7} {'vs random':>10}"
    print(head + (f" {'linear':>7} {'vs random':>10}" if args.linear else "") + "  random init")
    table = [(r["name"], "-", 0, 0.0, r["eval"], r) for r in randoms] + rows
    for name, method, steps, minutes, ev, ref in table:
        base = ref["eval"]
        line = f"  {name:<10} {method:<8} {steps:>6} {minutes:>8.1f} {ev['top1']:>7.2f} {ev['top1'] - base['top1']:>+10.2f}"
        if args.linear:
            lin, lin0 = ev["linear"]["test_top1"], base["linear"]["test_top1"]
            line += f" {lin:>7.2f} {lin - lin0:>+10.2f}"
        print(line + f"  {ref['name']}")


def _result(randoms: list, results: dict) -> dict:
    """The JSON: the first random init as ``random_init`` (one backbone: as before), all of them by name."""
    inits = {r["name"]: {"first_recipe": r["first_recipe"], **r["eval"]} for r in randoms}
    return {"random_init": randoms[0]["eval"] if randoms else None, "random_inits": inits, "runs": results}


def _lin(ev: dict) -> str:
    return f", linear {ev['linear']['test_top1']:.2f}%" if "linear" in ev else ""


if __name__ == "__main__":
    sys.exit(main())
