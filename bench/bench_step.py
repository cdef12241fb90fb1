"""Bench (a): throughput of selfsup's full pretraining step (Lightning module, batched on-device views,
MMCR loss, Adam, per-step scheduler, logging) against a bare PyTorch loop doing the same view generation,
forward, backward and optimiser step, in the same process.

With ``--compile [MODE]`` each round also times the same selfsup step with ``trainer.compile`` (the method's
backbone and projector compiled in place by ``torch.compile``, mode ``default`` unless given) and prints compiled /
eager steps per second; the ``--warmup`` steps, where the compilation happens, are left out of every timing, and the
first step's wall time (compilation included) is printed apart. Eager and compiled alternate which runs first.

    python bench/bench_step.py [--steps 30] [--backbone resnet10] [--width 32] [--batch 64] [--views 4] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch

from selfsup.data.batched import BatchedViews
from selfsup.data.datasets import TensorImageDataset
from selfsup.data.transforms import as_pipelines, get_preset
from selfsup.engine.compile import COMPILE_MODES
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.pretrain import pretrain
from selfsup.methods import MMCR
from selfsup.methods.base import Batch


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup`` (excludes setup, first-step allocation or compilation, teardown), and
    the first step's own (``first``: what compilation costs)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0
        self.first_start, self.first = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_start is None:
            self.first_start = time.perf_counter()
        if trainer.global_step == self.warmup and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None:
            self.first = time.perf_counter() - self.first_start
        if self.t0 is not None:
            self.n += 1
            self.t1 = time.perf_counter()


def bare_loop(method, images, bv, steps, warmup, batch, channels_last) -> float:
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator()
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        x = images[step * batch % len(images) :][:batch]
        gen.manual_seed(step)
        views = bv(x, generator=gen)
        if channels_last:
            b, v = views.shape[:2]
            views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, v))
        batch_in = Batch(
            views=views,
            labels=torch.zeros(batch, dtype=torch.long),
            indices=torch.arange(batch),
            step=step,
            max_steps=steps,
            epoch=0,
            generator=gen,
        )
        loss = method.training_loss(batch_in)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (steps - warmup) / (time.perf_counter() - t0)


def selfsup_loop(method, images, labels, steps, warmup, args, compile_mode=None) -> tuple[float, float]:
    """``(steps/s after the warm-up, first step's seconds)`` of selfsup's pretraining step."""
    ds = TensorImageDataset(images, labels)
    data = DataConfig(
        dataset="tensor", batch_size=args.batch, views=args.views, view_mode="batched", in_memory=True, num_workers=0
    )
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = TrainerConfig(
            out_dir=out,
            max_epochs=1,
            max_steps=steps,
            logger="csv",
            progress_bar=False,
            channels_last=args.channels_last,
            log_every_n_steps=10,
            compile=compile_mode or False,
        )
        pretrain(
            method,
            data,
            OptimConfig(name="adam", lr=1e-3, exclude_1d=False),
            trainer,
            MonitorConfig(every_n_epochs=0),
            extra_callbacks=[timer],
            train_dataset=ds,
        )
    return timer.n / (timer.t1 - timer.t0), timer.first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backbone", default="resnet10")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--channels_last", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="also time the step with trainer.compile in this mode (bare --compile: default) against eager",
    )
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): the warm-up steps are not timed")
    torch.set_num_threads(2)
    n = args.batch * args.steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.long)
    bv = BatchedViews(as_pipelines(get_preset("cifar10")), args.views)
    backbone = {"name": args.backbone, "kwargs": {"cifar_stem": True, "width": args.width}}
    ratios, compiled_ratios = [], []
    views_per_step = args.batch * args.views

    def ours(compile_mode=None) -> tuple[float, float]:
        torch.manual_seed(0)
        return selfsup_loop(MMCR(backbone=backbone), images, labels, args.steps, args.warmup, args, compile_mode)

    for r in range(args.rounds):
        torch.manual_seed(0)
        m = MMCR(backbone=backbone)
        if args.channels_last:
            m = m.to(memory_format=torch.channels_last)
        bare = bare_loop(m, images, bv, args.steps, args.warmup, args.batch, args.channels_last)
        if args.compile and r % 2:  # alternate which of eager and compiled runs first
            compiled, first_compiled = ours(args.compile)
            eager, first_eager = ours()
        else:
            eager, first_eager = ours()
            if args.compile:
                compiled, first_compiled = ours(args.compile)
        ratios.append(eager / bare)
        line = (
            f"round {r}: bare PyTorch {bare:.3f} steps/s ({bare * views_per_step:.0f} views/s), "
            f"selfsup {eager:.3f} steps/s ({eager * views_per_step:.0f} views/s), ratio {eager / bare:.3f}"
        )
        if args.compile:
            compiled_ratios.append(compiled / eager)
            line += (
                f"; compiled ({args.compile}) {compiled:.3f} steps/s ({compiled * views_per_step:.0f} views/s), "
                f"compiled / eager {compiled / eager:.3f}; first step {first_compiled:.1f} s compiled (round 0: "
                f"the compilation; later rounds reuse its graphs) vs {first_eager:.2f} s eager"
            )
        print(line, flush=True)
    print(f"selfsup / bare PyTorch step throughput: {sum(ratios) / len(ratios):.3f} (mean of {len(ratios)} rounds)")
    if args.compile:
        print(
            f"selfsup compiled ({args.compile}) / eager step throughput: "
            f"{sum(compiled_ratios) / len(compiled_ratios):.3f} (mean of {len(compiled_ratios)} rounds)"
        )


if __name__ == "__main__":
    main()
