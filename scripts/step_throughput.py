"""Views per second of one pretraining step of a recipe's shape: batched on-device views, forward, MMCR
loss, backward, Adam step, under the given precision. Default: the MIN-MMCR step (ResNet-18 with CIFAR stem,
projector 512-256-128, 16 views x 64 images, cifar_min augmentations, bf16 autocast).

    python scripts/step_throughput.py --device cuda [--steps 30] [--views 16] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from selfsup.data.batched import BatchedViews
from selfsup.methods import MMCR, Batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    method = (
        MMCR(
            backbone={"name": args.backbone, "kwargs": {"cifar_stem": True, "width": args.width}},
            projector=[256, 128],
            projector_last_bias=True,
        )
        .to(dev)
        .to(memory_format=torch.channels_last)
    )
    opt = torch.optim.Adam(method.parameters(), lr=1e-3, weight_decay=1e-6)
    views = BatchedViews("cifar_min", args.views)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=args.precision == "fp16")
    gen = torch.Generator(device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = None
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            sync()
            t0 = time.perf_counter()
        gen.manual_seed(step)
        v = views(images, generator=gen)
        v = v.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, v.shape[:2])
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = method.training_loss(
                Batch(v, torch.zeros(args.batch), torch.arange(args.batch), step, args.steps, 0, gen)
            )["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"step throughput on {name} ({args.precision}): {args.backbone} width {args.width}, {args.views} views x "
        f"{args.batch} images: {args.steps / dt:.2f} steps/s, {args.steps * args.views * args.batch / dt:.0f} views/s"
    )


if __name__ == "__main__":
    main()
