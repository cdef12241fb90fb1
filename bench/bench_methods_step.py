"""Views/s of every registered method's training step through selfsup's engine against a bare PyTorch loop doing the
same math on the same device, in the same process.

    python bench/bench_methods_step.py --device cuda [--methods SimCLR DINO] [--steps 20] [--warmup 5]
        [--batch 256] [--precision bf16] [--json steps.json]
    python bench/bench_methods_step.py --device cpu --steps 2 --warmup 1      # tiny shapes, seconds per method

Engine: ``selfsup.engine.pretrain.pretrain`` (Lightning Trainer + ``SelfSupModule``): batched on-device views,
the method's ``training_loss``, the finite-loss check, logging (CSV logger), backward, clipping / frozen parameters /
weight-decay schedule, the optimiser step, the teachers' EMA step, the per-step lr scheduler.

Bare loop: the same method class built from the same seed (identical weights), the same optimiser groups, schedule and
views (generators keyed exactly as the engine keys them, the same images in the same order, held on the device), then
``training_loss`` -> backward -> optimiser step -> ``method.on_train_step_end`` (EMA) -> scheduler step; no Lightning,
no logging, no per-step host sync. Both runs then hold the same parameters: their largest difference is reported
(``max_param_diff``: 0 on the CPU in fp32 when the two loops do exactly the same math).

Shapes: each method from its shipped ``*-cpu-small.yaml`` recipe (heads, views, augmentation, optimiser). On CUDA the
ResNet recipes get a ResNet-18 with the CIFAR stem and every method 256 images per step (``--batch``), bf16; the ViT
recipes (MAE, CAN, IMLE, I-JEPA, iBOT) keep their ViT (width 192, depth 6, patch 4). On the CPU every method takes
its class's ``tiny`` configuration (tiny backbone and heads) and 8 images per step, fp32.
Only the steps after ``--warmup`` are timed (device synchronised at both ends); a method that trains in planned epochs
(IMLE) prepares its epochs (the code search) inside the timed window in both loops, at the same steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import yaml

from selfsup.data.build import view_makers
from selfsup.data.keyed import key_seed
from selfsup.data.memory import TensorImageDataset
from selfsup.data.multicrop import split_views
from selfsup.data.rounds import RoundSampler, rank_examples, steps_per_epoch
from selfsup.data.sampler import ShardedEpochSampler
from selfsup.engine.config import MonitorConfig, TrainerConfig
from selfsup.engine.module import EPOCH_MICRO, STREAM_METHOD, STREAM_VIEWS, clip_gradients
from selfsup.engine.optim import build_scheduler, optimizer_from_config
from selfsup.engine.pretrain import pretrain
from selfsup.methods import Batch, available_methods, get_method
from selfsup.methods.base import EpochExamples
from selfsup.recipes import RECIPES_DIR
from selfsup.schedules import cosine

RESNET18 = {"name": "resnet18", "kwargs": {"cifar_stem": True}}
PRECISIONS = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
SEED = 0


# ------------------------------------------------------------------------------------------------ building
def recipe_of(method: str) -> Optional[Path]:
    """The shipped ``*-cpu-small.yaml`` recipe of a registered method (the shortest name when several: ``ibot`` over
    ``dinov2``, ``imle`` over ``imle-...-mae-arm``), else ``None``."""
    found = []
    for path in sorted(RECIPES_DIR.glob("*cpu-small*.yaml")):
        class_path = ((yaml.safe_load(path.read_text()) or {}).get("method") or {}).get("class_path")
        try:
            if class_path and get_method(class_path).__name__ == method:
                found.append(path)
        except ValueError:
            continue
    return min(found, key=lambda p: (len(p.stem), p.stem)) if found else None


def views_per_image(cls: type) -> int:
    return cls.num_views if cls.num_views is not None else max(cls.min_views, 2)


def build(name: str, device: str, batch: Optional[int], precision: str) -> dict[str, Any]:
    """``{"make": () -> method (seeded: identical weights each call), "data", "optim", "channels_last",
    "log_every", "recipe", "backbone"}`` for one registered method at the bench shape of ``device``."""
    from selfsup.cli import _pretrain_parser

    cls = get_method(name)
    recipe = recipe_of(name)
    argv: list[str] = []
    if recipe is not None:
        argv += ["--config", str(recipe)]
        init = yaml.safe_load(recipe.read_text())["method"].get("init_args") or {}
    else:  # a registered method without a cpu-small recipe: its tiny configuration, generic batched CIFAR data
        argv += ["--method", name, "--data.views", str(views_per_image(cls)), "--data.augment", "cifar10"]
        argv += ["--data.view_mode", "batched", "--data.in_memory", "true", "--data.num_workers", "0"]
        init = dict(cls.tiny)
    if device == "cpu":
        overrides = dict(cls.tiny)
        batch = batch or 8
    else:
        overrides = {}
        backbone = init.get("backbone") or {}
        if str(backbone.get("name", "")).startswith("resnet"):
            overrides["backbone"] = RESNET18
        batch = batch or 256
    if recipe is None:
        overrides = {**init, **overrides}
    for key, value in overrides.items():
        argv += [f"--method.init_args.{key}", json.dumps(value)]
    argv += ["--data.batch_size", str(batch), "--trainer.precision", PRECISIONS[precision]]
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)

    def make():
        torch.manual_seed(SEED)
        return parser.instantiate(cfg).method

    first = parser.instantiate(cfg)
    spec = first.method.backbone_spec
    return {
        "make": make,
        "data": first.data,
        "optim": first.optim,
        "channels_last": bool(first.trainer.channels_last),
        "log_every": int(first.trainer.log_every_n_steps),
        "recipe": recipe.stem if recipe is not None else f"{name}.tiny",
        "backbone": f"{spec['name']} {json.dumps(spec.get('kwargs', {}), sort_keys=True)}",
    }


def images_for(data, method, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 CIFAR-size images: one epoch of ``steps`` batches (a planned method: at least its examples)."""
    plan = method.epoch_plan()
    n = data.batch_size * steps
    if plan is not None:
        n = max(n, plan.examples)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long)


# -------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of optimiser steps ``warmup .. warmup + steps - 1`` (the device synchronised at both ends)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            _sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is not None and self.t1 is None:
            self.n += 1
            if self.n == self.steps:
                _sync(pl_module.device)
                self.t1 = time.perf_counter()

    @property
    def rate(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the engine ran {self.n} of the {self.steps} timed steps")
        return self.steps / (self.t1 - self.t0)


def engine_rate(method, spec, images, labels, steps: int, warmup: int, device: str, precision: str) -> float:
    """Steps/s of ``pretrain`` (the Lightning path) on ``method``; monitors off, no checkpoint inside the window."""
    timer = StepTimer(warmup, steps)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as out:
        trainer = TrainerConfig(
            out_dir=out,
            max_epochs=10**6,
            max_steps=warmup + steps,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision=PRECISIONS[precision],
            channels_last=spec["channels_last"],
            seed=SEED,
            save_every_n_epochs=10**6,
            logger="csv",
            log_every_n_steps=spec["log_every"],
            progress_bar=False,
        )
        monitor = MonitorConfig(every_n_epochs=0, spectrum_every_n_steps=0)
        pretrain(
            method,
            spec["data"],
            spec["optim"],
            trainer,
            monitor,
            extra_callbacks=[timer],
            train_dataset=TensorImageDataset(images, labels),
        )
    return timer.rate


def _channels_last(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if v is None:
        return None
    b, n = v.shape[:2]
    return v.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, n))


def bare_rate(method, spec, images, labels, steps: int, warmup: int, device: str, precision: str) -> float:
    """Steps/s of a bare PyTorch loop doing the engine's math on ``method`` (see the module docstring)."""
    dev = torch.device(device)
    data, optim = spec["data"], spec["optim"]
    batch, total, n = data.batch_size, warmup + steps, images.shape[0]
    torch.manual_seed(SEED)  # what pretrain's seed_everything does before training
    random.seed(SEED)
    np.random.seed(SEED)
    method = method.to(dev).train()
    if spec["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    maker = view_makers(data, geometry=False)[1].to(dev)
    images_dev, labels_dev = images.to(dev), labels.to(dev)

    def gen(stream: int, step: int, micro: int = 0) -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(key_seed(SEED, step, 0, micro, stream))

    def make_views(x: torch.Tensor, step: int, micro: int = 0):
        with torch.autocast(dev.type, enabled=False):
            return maker(x, gen(STREAM_VIEWS, step, micro))

    plan = method.epoch_plan()
    spe = steps_per_epoch(plan, batch) if plan is not None else n // batch
    opt, _ = optimizer_from_config(method, optim, batch)
    sched = build_scheduler(
        opt, total, min(total, round(optim.warmup_epochs * spe)), optim.final_lr_ratio, optim.schedule
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    epoch_of_order, order, cache = None, None, None
    t0 = None
    for step in range(total):
        if step == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        epoch, k = divmod(step, spe)
        if epoch_of_order != epoch:
            if plan is not None:  # a planned epoch: its examples' views made once, then the method prepares it
                first = epoch * spe
                indices = rank_examples(n, plan, epoch, SEED)
                items = images_dev[torch.tensor(indices, device=dev)]
                views = torch.cat(
                    [
                        make_views(items[c : c + batch], first, EPOCH_MICRO + j)
                        for j, c in enumerate(range(0, len(indices), batch))
                    ]
                )
                if views.dim() == 4:
                    views = views[:, None]
                cache = (views, {i: r for r, i in enumerate(indices)})
                method.prepare_epoch(
                    EpochExamples(
                        views=views,
                        labels=labels[indices],
                        indices=torch.tensor(indices, device=dev),
                        epoch=epoch,
                        step=first,
                        generator=gen(STREAM_METHOD, first, EPOCH_MICRO),
                    )
                )
                order = RoundSampler(n, plan, batch, seed=SEED, epoch=epoch).order(epoch)
            else:
                order = torch.tensor(list(ShardedEpochSampler(n, seed=SEED, epoch=epoch)), device=dev)
            epoch_of_order = epoch
        if plan is not None:
            idx_list = order[k * batch : (k + 1) * batch]
            idx = torch.tensor(idx_list, device=dev)
            views = cache[0][torch.tensor([cache[1][i] for i in idx_list], device=dev)]
            lab = torch.full((batch,), -1, device=dev)
        else:
            idx = order[k * batch : (k + 1) * batch]
            views, lab = make_views(images_dev[idx], step), labels_dev[idx]
        views, local = split_views(views)
        if spec["channels_last"]:
            views, local = _channels_last(views), _channels_last(local)
        inp = Batch(
            views=views,
            labels=lab,
            indices=idx,
            step=step,
            max_steps=total,
            epoch=epoch,
            generator=gen(STREAM_METHOD, step),
            steps_per_epoch=spe,
            local_views=local,
        )
        with torch.autocast(
            dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None, cache_enabled=False
        ):  # as Lightning's mixed precision
            loss = method.training_loss(inp)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if optim.clip_grad is not None:
            clip_gradients(method.parameters(), optim.clip_grad, optim.clip_grad_per_param)
        for p in method.frozen(step, epoch):
            p.grad = None
        if optim.weight_decay_end is not None:
            for group in opt.param_groups:
                base = group.get("base_weight_decay", 0.0)
                if base > 0:
                    end = base * optim.weight_decay_end / optim.weight_decay
                    group["weight_decay"] = cosine(base, end, step, total)
        scaler.step(opt)
        scaler.update()
        method.on_train_step_end(step, total)
        sched.step()
    _sync(dev)
    return steps / (time.perf_counter() - t0)


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference over the floating tensors of two state dicts (parameters, teachers, buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [
        float((sa[k].detach().float().cpu() - sb[k].detach().float().cpu()).abs().max())
        for k in sa
        if sa[k].is_floating_point() and sa[k].numel()
    ]
    return max(diffs, default=0.0)


# ---------------------------------------------------------------------------------------------------- main
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({torch.get_num_threads()} threads)"


def bench_method(name: str, args, dev_name: str) -> dict[str, Any]:
    spec = build(name, args.device, args.batch, args.precision)
    data = spec["data"]
    views_per_step = data.batch_size * (data.views + (data.local_views or 0))
    bare_method = spec["make"]()
    if bare_method.epoch_plan() is not None:
        views_per_step = data.batch_size  # a planned epoch trains on one view per example
    images, labels = images_for(data, bare_method, args.warmup + args.steps)
    bare = bare_rate(bare_method, spec, images, labels, args.steps, args.warmup, args.device, args.precision)
    bare_method = bare_method.cpu()
    engine_method = spec["make"]()
    engine = engine_rate(engine_method, spec, images, labels, args.steps, args.warmup, args.device, args.precision)
    diff = max_param_diff(engine_method, bare_method)
    change = max_param_diff(spec["make"](), bare_method)  # how far training moved the weights: diff's scale
    del engine_method, bare_method
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "method": name,
        "recipe": spec["recipe"],
        "backbone": spec["backbone"],
        "batch": data.batch_size,
        "views_per_step": views_per_step,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": args.precision,
        "device": dev_name,
        "engine_steps_s": engine,
        "bare_steps_s": bare,
        "engine_views_s": engine * views_per_step,
        "bare_views_s": bare * views_per_step,
        "ratio": (engine * views_per_step) / (bare * views_per_step),
        "max_param_diff": diff,
        "max_param_change": change,
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 20 on cuda, 2 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on cuda, 1 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 256 on cuda, 8 on cpu)")
    ap.add_argument("--precision", default=None, choices=sorted(PRECISIONS), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device")
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    known = available_methods()
    by_lower = {m.lower(): m for m in known}
    methods = [by_lower.get(m.lower(), m) for m in (args.methods or known)]
    unknown = [m for m in methods if m not in known]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; registered: {', '.join(known)}")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per method
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # a few-step run
    dev_name = device_name(args.device)
    print(
        f"bench_methods_step on {dev_name}: {args.precision}, {args.warmup} warm-up + {args.steps} timed steps per loop",
        flush=True,
    )
    rows, failed = [], []
    for name in methods:
        t0 = time.time()
        try:
            row = bench_method(name, args, dev_name)
        except Exception as e:  # keep measuring the others; the exit status says something failed
            traceback.print_exc()
            failed.append(name)
            rows.append({"method": name, "device": dev_name, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        print(
            f"{name:<12} engine {row['engine_views_s']:>10.1f} views/s  bare {row['bare_views_s']:>10.1f} views/s  "
            f"ratio {row['ratio']:.3f}  (engine - bare weights {row['max_param_diff']:.1e}, moved "
            f"{row['max_param_change']:.1e}; {time.time() - t0:.1f} s) "
            f"[{dev_name}, {args.precision}]",
            flush=True,
        )
        if args.json:  # after every method: a stopped bench keeps what it measured
            _write(args.json, args, dev_name, rows)
    ok = [r for r in rows if "error" not in r]
    print("\nviews/s of each method's training step, selfsup engine vs bare PyTorch loop (goal: ratio >= 0.9)")
    print(f"device: {dev_name}, precision {args.precision}, {args.warmup} warm-up + {args.steps} timed steps")
    print(
        f"| {'method':<11} | {'backbone':<10} | {'views/step':>10} | {'engine views/s':>14} | {'bare views/s':>12} | ratio |"
    )
    print(f"|{'-' * 13}|{'-' * 12}|{'-' * 12}|{'-' * 16}|{'-' * 14}|-------|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']:<11} | failed: {r['error'][:80]}")
            continue
        print(
            f"| {r['method']:<11} | {r['backbone'].split()[0]:<10} | {r['views_per_step']:>10} | "
            f"{r['engine_views_s']:>14.1f} | {r['bare_views_s']:>12.1f} | {r['ratio']:.3f} |"
        )
    if ok:
        geo = math.exp(sum(math.log(r["ratio"]) for r in ok) / len(ok))
        low = [r["method"] for r in ok if r["ratio"] < 0.9]
        print(f"geometric mean ratio {geo:.3f}; below 0.9: {', '.join(low) or 'none'} [{dev_name}]")
    if args.json:
        _write(args.json, args, dev_name, rows)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write(path: str, args, dev_name: str, rows: list) -> None:
    out = {
        "device": dev_name,
        "torch": torch.__version__,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
