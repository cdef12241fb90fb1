"""Side by side with lightly: each method both libraries ship, trained by each library from the same random backbone
on the same images for the same steps, then scored by the same kNN, in one script run.

    python bench/bench_peers.py --output bench_peers.json                       # every method, 400 steps each
    python bench/bench_peers.py --methods simclr byol --steps 100 --output r.json
    python bench/bench_peers.py --methods simclr --steps 3 --knn-subset 500     # a quick check of both sides
    python bench/bench_peers.py --methods mae -- --optim.lr 1e-3                # overrides of the recipe (both sides)

Per method (``--methods``; the short names of ``bench_cpu_small.py``: the shipped ``<m>-cpu-small`` recipe):

* **selfsup**: the recipe as shipped (its method, data and optimiser settings), trained by selfsup's engine
  (``selfsup.engine.pretrain.pretrain``) for ``--steps`` optimiser steps, its monitors off (lightly's loop has none);
* **lightly**: the same method written the way lightly's documentation examples write it (``examples/pytorch/*.py``:
  a plain PyTorch loop over a ``torch.utils.data.DataLoader`` with worker processes, lightly's transforms, heads,
  losses, ``update_momentum`` / ``cosine_schedule``), configured with the recipe's values: the same backbone module
  (a deep copy of the recipe's instantiated backbone, so both start from the same random weights), the same images
  (the recipe's training split, decoded once and served as PIL images, as ``torchvision.datasets.CIFAR10`` serves
  them to lightly's examples), batch size, optimiser, learning-rate schedule (lightly's ``cosine_warmup_schedule``
  gives the engine's warm-up + cosine exactly), weight-decay schedule, gradient clipping, EMA rates and number of
  steps. Where lightly's components cannot express a recipe value, the difference is listed per method (printed
  and in the JSON under ``differences``).
  lightly's side lives in ``bench/peerbench/`` (a builder per method under ``@register``, one file per family, and
  the plain loop).

Both backbones are then scored by selfsup's kNN as ``bench_cpu_small.py`` scores them (k=200, T=0.5, backbone
features in eval mode; by default the whole bank split, 50,000 images, and test split, 10,000; ``--knn-subset N``
keeps a seeded random N of each). Seconds per step are wall time per optimiser step after ``--warmup-steps`` steps,
data loading included as each library's user runs it (selfsup: views made in the training step from images in
memory; lightly: per-image transforms in ``--peer-workers`` DataLoader workers). The table gives the speed ratio
(lightly s/step / selfsup s/step: above 1 means selfsup is faster) and the kNN difference (selfsup - lightly). The
JSON (``--output``) is written after every method, so a run that is stopped keeps what it measured.

Precision: selfsup runs the recipe's ``trainer.precision`` (``auto``: bf16 autocast where the CPU has native bf16);
lightly's examples train in fp32, which is the default here (``--peer-precision bf16`` runs lightly's loop under the
same bf16 autocast). Each side's precision is in the table and the JSON.

lightly is a bench-only dependency (``pip install -e ".[bench]"``); without it ``--sides selfsup`` still runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_small import instantiate_recipe, recipe_path  # noqa: E402
from peerbench import BUILDERS, StepClock, Unsupported, check_peer, train_peer  # noqa: E402

#: The methods both libraries ship, in the order they run (short names of the shipped ``<m>-cpu-small`` recipes):
#: every builder registered in ``peerbench`` (``@register``).
METHODS: tuple[str, ...] = tuple(BUILDERS)
#: Methods that cannot be trained properly with lightly's components, with the reason (none at present; a builder
#: that meets a recipe value lightly cannot express raises :class:`Unsupported`, which skips that method the same way).
SKIPPED: dict[str, str] = {}

LIGHTLY_MISSING = 'lightly is not installed: pip install -e ".[bench]" (a bench-only extra), or run --sides selfsup'


# ====================================================================================================================
# selfsup's side, the kNN both sides get, the table and the JSON (lightly's side: peerbench/)
# ====================================================================================================================


def _step_callback(clock: StepClock):
    import lightning as L

    class StepTimes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # one per step
            clock.tick()

    return StepTimes()


def knn_sets(data_cfg, subset: Optional[int]) -> tuple[Dataset, Dataset]:
    """The bank and test splits under the recipe's eval transform (``subset``: a seeded random ``subset`` of each)."""
    from selfsup.data.build import build_eval_dataset

    return build_eval_dataset(data_cfg, data_cfg.bank_split, limit=subset), build_eval_dataset(
        data_cfg, data_cfg.test_split, limit=subset
    )


def knn_eval(
    backbone: nn.Module, bank: Dataset, test: Dataset, k: int = 200, temperature: float = 0.5, device: str = "cpu"
) -> dict:
    """selfsup's kNN as ``bench_cpu_small.evaluate``: backbone features in eval mode, cosine top-k weighted vote."""
    from selfsup.data.build import num_classes
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy

    t0 = time.time()
    backbone.to(device)
    bf, by = extract_features(backbone, DataLoader(bank, batch_size=1000), device=device)
    tf, ty = extract_features(backbone, DataLoader(test, batch_size=1000), device=device)
    out = knn_accuracy(bf, by, tf, ty, num_classes=num_classes(bank), k=k, temperature=temperature)
    return {**out, "n_bank": len(by), "n_test": len(ty), "k": min(k, len(by)), "eval_s": round(time.time() - t0, 1)}


def train_selfsup(init, warmup: int) -> dict:
    """The recipe's method trained by selfsup's engine; wall time and seconds per step."""
    from selfsup.engine.pretrain import pretrain, resolve_precision

    clock = StepClock(sync=init.trainer.accelerator in ("gpu", "cuda"))
    t0 = time.perf_counter()
    pretrain(init.method, init.data, init.optim, init.trainer, init.monitor, extra_callbacks=[_step_callback(clock)])
    wall = time.perf_counter() - t0
    sps, timed = clock.seconds_per_step(warmup)
    return {
        "steps": len(clock.ends),
        "seconds_per_step": sps,
        "timed_steps": timed,
        "wall_s": round(wall, 1),
        "precision": resolve_precision(init.trainer.precision, init.trainer.accelerator),
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def result_row(name: str, rec: dict) -> dict:
    """kNN of each side, the difference, s/step of each side and the ratio, from one method's record."""
    ours, peer = rec.get("selfsup") or {}, rec.get("lightly") or {}
    k_ours, k_peer = (ours.get("knn") or {}).get("top1"), (peer.get("knn") or {}).get("top1")
    s_ours, s_peer = ours.get("seconds_per_step"), peer.get("seconds_per_step")
    return {
        "method": name,
        "steps": rec.get("steps"),
        "knn_selfsup": k_ours,
        "knn_lightly": k_peer,
        "knn_diff": None if k_ours is None or k_peer is None else k_ours - k_peer,
        "s_per_step_selfsup": s_ours,
        "s_per_step_lightly": s_peer,
        "speed_ratio": None if not s_ours or s_peer is None else s_peer / s_ours,
        "precision": f"{ours.get('precision', '-')} / {peer.get('precision', '-')}",
    }


def table(results: dict, skipped: dict) -> str:
    """The side-by-side table (one line per method; skipped methods with their reason)."""
    head = (
        f"  {'method':<8} {'steps':>5} {'kNN selfsup':>11} {'kNN lightly':>11} {'diff':>6} "
        f"{'s/step selfsup':>14} {'s/step lightly':>14} {'ratio':>6}  precision (selfsup / lightly)"
    )
    lines = [head]
    for name, rec in results.items():
        r = result_row(name, rec)
        lines.append(
            f"  {name:<8} {_fmt(r['steps'], 'd'):>5} {_fmt(r['knn_selfsup'], '.2f'):>11} "
            f"{_fmt(r['knn_lightly'], '.2f'):>11} {_fmt(r['knn_diff'], '+.2f'):>6} "
            f"{_fmt(r['s_per_step_selfsup'], '.3f'):>14} {_fmt(r['s_per_step_lightly'], '.3f'):>14} "
            f"{_fmt(r['speed_ratio'], '.2f'):>6}  {r['precision']}"
        )
    for name, reason in skipped.items():
        lines.append(f"  {name:<8} skipped: {reason}")
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import lightly

        env["lightly"] = lightly.__version__
    except ImportError:
        env["lightly"] = None
    return env


# ====================================================================================================================
# The run
# ====================================================================================================================


def run_method(name: str, args, overrides: list[str], runs_dir: str) -> dict:
    """Both sides of one method: the recipe instantiated once, the backbone copied before selfsup trains it."""
    recipe = recipe_path(name)
    accelerator = "gpu" if args.device == "cuda" else "cpu"  # both sides on one device (--device)
    # no monitor on selfsup's side (lightly's loop has none): the kNN monitor is off in instantiate_recipe, the spectrum
    # monitor here; a user's override still wins
    ov = ["--trainer.max_steps", str(args.steps), "--trainer.accelerator", accelerator]
    ov += ["--monitor.spectrum_every_n_steps", "0", *overrides]
    init, cfg = instantiate_recipe(recipe, args.zip, ov, runs_dir)
    peer_backbone = copy.deepcopy(init.method.backbone)  # the same random weights for both
    if "lightly" in args.sides:
        check_peer(name, cfg, peer_backbone)  # a method lightly cannot express is skipped before any training
    rec: dict[str, Any] = {
        "recipe": recipe,
        "method": type(init.method).__name__,
        "steps": args.steps,
        "batch_size": int(cfg.data.batch_size),
        "run_dir": str(cfg.trainer.out_dir),
    }
    bank, test = knn_sets(init.data, args.knn_subset)
    if "selfsup" in args.sides:
        print(f"{name}: selfsup {rec['method']} ({Path(recipe).name}), {args.steps} steps", flush=True)
        rec["selfsup"] = train_selfsup(init, args.warmup_steps)
        rec["selfsup"]["knn"] = knn_eval(init.method.backbone, bank, test, args.knn_k, args.knn_t, args.device)
        print(f"{name}: selfsup kNN top-1 {rec['selfsup']['knn']['top1']:.2f}", flush=True)
    if "lightly" in args.sides:
        print(f"{name}: lightly, {args.steps} steps, {args.peer_workers} DataLoader workers", flush=True)
        trained, rec["lightly"] = train_peer(
            name,
            cfg,
            peer_backbone,
            args.steps,
            args.warmup_steps,
            args.peer_workers,
            args.peer_precision == "bf16",
            args.device,
        )
        rec["lightly"]["knn"] = knn_eval(trained, bank, test, args.knn_k, args.knn_t, args.device)
        print(f"{name}: lightly kNN top-1 {rec['lightly']['knn']['top1']:.2f}", flush=True)
        for note in rec["lightly"]["differences"]:
            print(f"  differs: {note}", flush=True)
    rec.update({k: v for k, v in result_row(name, rec).items() if k in ("knn_diff", "speed_ratio")})
    return rec


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"), help="an ImageFolder zip")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps of each side")
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the s/step timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="both sides (selfsup: trainer.accelerator)"
    )
    ap.add_argument("--peer-workers", type=int, default=2, help="lightly's DataLoader num_workers")
    ap.add_argument("--peer-precision", choices=["32", "bf16"], default="32", help="lightly's loop (examples: fp32)")
    ap.add_argument("--knn-subset", type=int, default=None, help="a seeded random N of the bank and of the test split")
    ap.add_argument("--knn-k", type=int, default=200)
    ap.add_argument("--knn-t", type=float, default=0.5)
    ap.add_argument("--sides", nargs="+", choices=["selfsup", "lightly"], default=["selfsup", "lightly"])
    ap.add_argument("--output", default=None, help="write the JSON here (after every method)")
    ap.add_argument("--runs-dir", default=None, help="keep selfsup's run directories here (default: removed)")
    args, overrides = ap.parse_known_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (one warm-up step, one timed)")
    return args, [o for o in overrides if o != "--"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, overrides = parse_args(argv)
    torch.set_num_threads(args.threads)
    if "lightly" in args.sides:
        try:
            import lightly  # noqa: F401
        except ImportError:
            raise SystemExit(LIGHTLY_MISSING) from None
    payload: dict[str, Any] = {
        "config": {**{k: v for k, v in vars(args).items()}, "overrides": overrides},
        "environment": environment(args),
        "results": {},
        "skipped": {},
    }
    results, skipped = payload["results"], payload["skipped"]
    for name in args.methods:
        if name in SKIPPED:
            skipped[name] = SKIPPED[name]
            print(f"{name}: skipped: {SKIPPED[name]}", flush=True)
            continue
        runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="bench_peers-")
        try:
            results[name] = run_method(name, args, overrides, runs_dir)
        except Unsupported as e:
            skipped[name] = f"lightly's components cannot express it: {e}"
            print(f"{name}: skipped: {skipped[name]}", flush=True)
        finally:
            if not args.runs_dir:
                shutil.rmtree(runs_dir, ignore_errors=True)
        write_json(args.output, payload)  # after every method: a stopped run keeps what it measured
    print(
        f"\nkNN top-1 (k={args.knn_k}, T={args.knn_t}) at equal steps; s/step after {args.warmup_steps} warm-up steps;"
    )
    print("ratio = lightly s/step / selfsup s/step (> 1: selfsup faster); diff = selfsup - lightly:")
    print(table(results, skipped))
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
