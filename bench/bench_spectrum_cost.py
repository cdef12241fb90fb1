"""Bench: cost of the embedding-spectrum monitor (selfsup.engine.spectrum) on the pretraining step, same process.

Runs the same short MMCR pretraining (cpu-small model and batch by default: ResNet-10 width 32, CIFAR stem,
64 images x 8 views, batched views from the shipped CIFAR-10 sample decoded in memory, CSV logger) with
``monitor.spectrum_every_n_steps`` 0 (off) and N (on, default 50), alternating off/on/on/off/... over ``--rounds``
pairs so that a drifting machine load hits both arms alike, and prints

* the mean wall time per step of each arm (consecutive ``on_train_batch_start`` times, so every callback,
  the monitor's included, is inside; the first ``--warmup`` steps are left out) and their ratio on/off;
* the monitor's own time per computation (its ``seconds / calls``) and that time amortised over N steps as a
  fraction of the off step time: the steady-state overhead, free of the machine's noise.

    python bench/bench_spectrum_cost.py [--steps 120] [--every 50] [--rounds 2] [--width 32] [--batch 64] [--views 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.pretrain import pretrain
from selfsup.engine.spectrum import SpectrumMonitor
from selfsup.methods import MMCR


class StepClock(L.Callback):
    """Wall time between consecutive batch starts (the whole step: forward, backward, optimiser, every callback)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.monitor: SpectrumMonitor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        self.monitor = next((c for c in trainer.callbacks if isinstance(c, SpectrumMonitor)), None)

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[warmup:], self.starts[warmup + 1 :])]


def run_arm(args, every: int) -> tuple[list[float], SpectrumMonitor | None]:
    torch.manual_seed(0)
    method = MMCR(
        backbone={"name": "resnet10", "kwargs": {"cifar_stem": True, "width": args.width}}, projector=[512, 128]
    )
    data = DataConfig(
        dataset="demo", batch_size=args.batch, views=args.views, view_mode="batched", in_memory=True, num_workers=0
    )
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = TrainerConfig(
            out_dir=out,
            max_epochs=100,
            max_steps=args.steps,
            logger="csv",
            progress_bar=False,
            channels_last=True,
            log_every_n_steps=20,
        )
        pretrain(
            method,
            data,
            OptimConfig(name="adam", lr=1e-2, exclude_1d=False),
            trainer,
            MonitorConfig(every_n_epochs=0, spectrum_every_n_steps=every),
            extra_callbacks=[clock],
        )
    return clock.step_times(args.warmup), clock.monitor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--every", type=int, default=MonitorConfig.spectrum_every_n_steps)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"off": [], "on": []}
    per_call: list[float] = []
    for r in range(args.rounds):
        for arm in ("off", "on") if r % 2 == 0 else ("on", "off"):
            steps, monitor = run_arm(args, args.every if arm == "on" else 0)
            times[arm] += steps
            if monitor is not None and monitor.calls:
                per_call.append(monitor.seconds / monitor.calls)
            print(
                f"round {r} {arm:>3}: {statistics.mean(steps) * 1e3:8.1f} ms/step over {len(steps)} steps"
                + (
                    f", monitor {monitor.calls} calls, {monitor.seconds / max(1, monitor.calls) * 1e3:.1f} ms/call"
                    if monitor is not None
                    else ""
                ),
                flush=True,
            )
    off, on = statistics.mean(times["off"]), statistics.mean(times["on"])
    call = statistics.mean(per_call) if per_call else float("nan")
    print(
        f"step time: monitor off {off * 1e3:.1f} ms, on (every {args.every} steps) {on * 1e3:.1f} ms, "
        f"ratio on/off {on / off:.4f}"
    )
    print(
        f"monitor: {call * 1e3:.2f} ms per computation; amortised over {args.every} steps = "
        f"{100 * call / args.every / off:.3f}% of the step time (steady-state overhead)"
    )


if __name__ == "__main__":
    main()
