"""Bench (issue: IMLE-SSL): IMLE against its MAE arm on CIFAR-10 at the same CPU budget, and code-search throughput.

Two parts, one script run:

1. **Throughput** (``--throughput``; alone with ``--throughput-only``): codes scored per second by the IMLE search
   (``IMLE.score_codes``: the blocks before the wrapped block run once per example, the rest once per code)
   against a plain MAE forward that scores the same number of (image, mask) rows with the same model and
   precision (rows/s), median over ``--reps``, same process.
2. **Quality** (default): pretrains ``imle-cpu-small`` and ``imle-cpu-small-mae-arm`` one after the other (both
   seeded alike: the same initial ViT; the MAE arm runs as many epochs as fit in the IMLE run's training time, timed
   on a 4-epoch probe of the arm in the same process, so both get the same CPU budget whatever the machine's load)
   and scores each backbone, and the untrained one, on
   * held-out reconstruction loss: ``--recon-images`` CIFAR-10 test images, one seeded random mask each (the same
     masks for every model), averaged over ``--recon-codes`` random codes for IMLE (the expectation under the prior)
     and with codes ignored for the MAE arm and the untrained baseline;
   * 10-way 5-shot few-shot accuracy (support: train split, queries: test split, 15 queries per class,
     nearest prototype, cosine, ``--episodes`` seeded episodes, the same episodes for every model) with its 95% CI.

    python bench/bench_imle.py --runs-dir /work/bench_runs/issue8            # both parts
    python bench/bench_imle.py --throughput-only --device cuda                # part 1 on a GPU
    python bench/bench_imle.py --mae-arm-epochs 40                            # the MAE arm at IMLE's step count
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def throughput(device: str, reps: int, examples: int, codes: int) -> dict:
    """Codes scored per second by the search vs rows per second of a plain MAE forward (same rows, same model)."""
    from selfsup.cli import _pretrain_parser

    cfg = _pretrain_parser().parse_args(["--config", str(ROOT / "recipes/imle-cpu-small.yaml")])
    method = _pretrain_parser().instantiate(cfg).method.to(device).eval()
    dev = torch.device(device)
    x = torch.randn(examples, 3, 32, 32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    masking = method.draw_masking(examples, gen)
    z = method.latent.sample_codes(examples * codes, gen)
    rows = torch.arange(examples, device=dev).repeat_interleave(codes)
    xr, mr = x[rows], masking.rows(rows)

    def search():
        with method._autocast(dev):
            method.score_codes(x, masking, z)

    def plain():
        with method._autocast(dev):
            method.forward_loss(xr, mr, reduction="none")

    out = {}
    with torch.no_grad():
        for fn in (search, plain):  # warm-up
            fn()
        times = {"search": [], "plain": []}
        for _ in range(reps):
            for name, fn in (("search", search), ("plain", plain)):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    n = examples * codes
    for name in times:
        out[f"{name}_rows_per_s"] = n / statistics.median(times[name])
    out["ratio"] = out["search_rows_per_s"] / out["plain_rows_per_s"]
    out.update(
        {
            "device": device,
            "examples": examples,
            "codes_per_example": codes,
            "threads": torch.get_num_threads(),
            "precision": method.search_precision,
            "inject": method.latent.indices,
            "depth": len(method.backbone.blocks),
        }
    )
    return out


def evaluate(method, data, recon_images: int, recon_codes: int, episodes: int, seed: int = 0) -> dict:
    """Held-out reconstruction loss (codes averaged; ``recon_codes=0``: ignored) and 10-way 5-shot accuracy."""
    from torch.utils.data import DataLoader

    from selfsup.data.build import build_eval_dataset
    from selfsup.eval.fewshot import FewShotConfig, few_shot_eval

    test = build_eval_dataset(data, "test")
    held = build_eval_dataset(data, "test", limit=recon_images)
    x = torch.cat([b for b, *_ in DataLoader(held, batch_size=500)])
    method.eval()
    with torch.no_grad():
        loss = method.heldout_loss(x, torch.Generator().manual_seed(seed), recon_codes, chunk=64).mean().item()
    support = build_eval_dataset(data, "train")
    fs = few_shot_eval(
        method.backbone,
        support,
        test,
        FewShotConfig(n_way=10, n_shot=5, n_query=15, episodes=episodes, seed=seed),
        batch_size=500,
    )
    return {
        "recon_loss": loss,
        "recon_codes": recon_codes,
        "fewshot_acc": fs.accuracy,
        "fewshot_ci95": fs.ci95,
        "episodes": fs.episodes,
    }


class TrainTimer(L.Callback):
    """Wall time between the start and the end of training (the data decoding before it is not counted)."""

    seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def quality(args) -> dict:
    """IMLE for its recipe's epochs; then the MAE arm for as many epochs as fit in the same training time (timed
    on a 4-epoch probe run of the arm, in this process, on this machine's current load)."""
    from bench_cpu_small import instantiate_recipe, state_digest

    from selfsup.data.build import build_train_views
    from selfsup.data.rounds import steps_per_epoch
    from selfsup.engine.pretrain import pretrain

    res, digest0, train_ds = {}, None, None
    runs = [("imle", "imle-cpu-small.yaml", []), ("mae-arm", "imle-cpu-small-mae-arm.yaml", None)]
    if args.mae_arm_epochs:  # the MAE arm alone, for a given number of epochs (e.g. the IMLE run's: equal steps)
        e = args.mae_arm_epochs
        runs = [
            (
                "mae-arm",
                "imle-cpu-small-mae-arm.yaml",
                ["--trainer.max_epochs", str(e), "--optim.warmup_epochs", str(max(1, e // 10))],
            )
        ]
    budget = None
    for name, recipe, extra in runs:
        path = str(ROOT / "recipes" / recipe)
        if extra is None:  # the MAE arm: as many epochs as the IMLE run's training time allows
            probe, _pcfg = instantiate_recipe(
                path,
                args.zip,
                ["--trainer.max_epochs", "4", "--monitor.recon_every_n_epochs", "0", "--trainer.logger", "none"],
                None,
            )
            timer = TrainTimer()
            pretrain(
                probe.method,
                probe.data,
                probe.optim,
                probe.trainer,
                probe.monitor,
                extra_callbacks=[timer],
                train_dataset=train_ds,
            )
            epochs = max(1, round(budget / (timer.seconds / 4)))
            print(
                f"mae-arm: {timer.seconds / 4:.1f} s per epoch -> {epochs} epochs in the IMLE run's "
                f"{budget / 60:.1f} min",
                flush=True,
            )
            extra = ["--trainer.max_epochs", str(epochs), "--optim.warmup_epochs", str(max(1, epochs // 10))]
        init, cfg = instantiate_recipe(path, args.zip, ["--monitor.recon_every_n_epochs", "0", *extra], args.runs_dir)
        if train_ds is None:
            train_ds, _ = build_train_views(init.data, seed=cfg.trainer.seed)  # decoded once for every run
        digest = state_digest(init.method.backbone)
        if digest0 is None:
            digest0 = digest
            t0 = time.time()
            res["untrained"] = evaluate(init.method, init.data, args.recon_images, 0, args.episodes)
            print(f"untrained: {json.dumps(res['untrained'])} ({time.time() - t0:.0f} s)", flush=True)
        timer = TrainTimer()
        pretrain(
            init.method,
            init.data,
            init.optim,
            init.trainer,
            init.monitor,
            extra_callbacks=[timer],
            train_dataset=train_ds,
        )
        budget = budget or timer.seconds
        codes = 0 if init.method.latent is None else args.recon_codes
        ev = evaluate(init.method, init.data, args.recon_images, codes, args.episodes)
        res[name] = {
            **ev,
            "train_minutes": round(timer.seconds / 60, 2),
            "epochs": cfg.trainer.max_epochs,
            "steps": cfg.trainer.max_epochs * steps_per_epoch(init.method.plan, cfg.data.batch_size),
            "run_dir": cfg.trainer.out_dir,
            "same_init": abs(digest - digest0) < 1e-6 * max(1.0, abs(digest0)),
        }
        print(f"{name}: {json.dumps(res[name])}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="throughput part only")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--examples", type=int, default=64, help="throughput: examples per scoring pass (code_batch)")
    ap.add_argument("--codes", type=int, default=16, help="throughput: codes per example in one pass (sp)")
    ap.add_argument("--recon-images", type=int, default=2000)
    ap.add_argument("--recon-codes", type=int, default=16)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument(
        "--mae-arm-epochs",
        type=int,
        default=None,
        help="run only the MAE arm, for this many epochs (40 = the IMLE recipe's: equal steps)",
    )
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"throughput": throughput(args.device, args.reps, args.examples, args.codes)}
    t = out["throughput"]
    print(
        f"code search: {t['search_rows_per_s']:.0f} codes/s vs plain MAE forward {t['plain_rows_per_s']:.0f} rows/s "
        f"= {t['ratio']:.2f}x ({args.device}, {t['threads']} threads, {t['precision']})",
        flush=True,
    )
    if not args.throughput_only:
        out["quality"] = q = quality(args)
        print("\nCIFAR-10, cpu-small ViT (width 192, depth 6, patch 4), same initial weights, 2 CPU threads:")
        print(f"  {'model':<10} {'epochs':>6} {'steps':>6} {'minutes':>8} {'held-out loss':>14} {'10-way 5-shot':>16}")
        for name in [n for n in ("untrained", "mae-arm", "imle") if n in q]:
            r = q[name]
            print(
                f"  {name:<10} {r.get('epochs', 0):>6} {r.get('steps', 0):>6} {r.get('train_minutes', 0):>8.1f} "
                f"{r['recon_loss']:>14.4f} {r['fewshot_acc']:>9.2f} ± {r['fewshot_ci95']:.2f}"
            )
    print(json.dumps(out, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
