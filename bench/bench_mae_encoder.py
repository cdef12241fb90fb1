"""Bench: MAE encoder throughput on the kept tokens (mask ratio r) against the unmasked encoder, same process.

The kept-token pass (``selfsup.models.masked_vit.forward_kept``) runs the ViT on ``1 + floor(L (1 - r))`` tokens
instead of ``1 + L``: at r = 0.75 and ViT-B/16 at 224 px, 50 tokens instead of 197, so the block cost (linear in
tokens for the MLP and projections, quadratic for attention) drops about 4x; the patch embedding still runs on
every patch. Goal (issue 7): >= 2.5x images/s at r = 0.75.

Timed: forward + backward of the encoder (training), median over ``--reps`` after a warm-up, same weights, same
batch, alternating the two passes. On a CPU the script also reports the process's CPU time per batch (all threads),
whose ratio stays meaningful on a machine shared with other jobs, where wall times are noisy.

    python bench/bench_mae_encoder.py                                   # ViT-B/16, 224 px, batch 8, bf16 where native
    python bench/bench_mae_encoder.py --arch vit_small --batch 16 --reps 5
    python bench/bench_mae_encoder.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_base", help="registry ViT (vit_tiny, vit_small, vit_base, vit_large)")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mask_ratio", type=float, default=0.75)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mode", choices=["train", "forward"], default="train", help="forward+backward, or forward only")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast where the device computes bf16 natively",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from selfsup.engine.pretrain import resolve_precision
    from selfsup.models import build_backbone
    from selfsup.models.masked_vit import forward_kept, random_masking, set_sincos_pos_embed

    device = torch.device(args.device)
    native = resolve_precision("auto", "gpu" if device.type == "cuda" else "cpu") == "bf16-mixed"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native)
    torch.manual_seed(0)
    vit = set_sincos_pos_embed(
        build_backbone({"name": args.arch, "kwargs": {"img_size": args.img, "patch_size": args.patch}})
    ).to(device)
    vit.train()
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    num_patches = vit.patch_embed.num_patches
    masking = random_masking(args.batch, num_patches, args.mask_ratio, torch.Generator(device=device).manual_seed(0))

    def step(keep) -> tuple[float, float]:
        vit.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with (
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            torch.set_grad_enabled(args.mode == "train"),
        ):
            out = forward_kept(vit, x, keep)
            if args.mode == "train":
                out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    step(masking.keep), step(None)  # warm-up
    kept_t, full_t = [], []
    for _ in range(args.reps):
        kept_t.append(step(masking.keep))
        full_t.append(step(None))
    kept, full = (statistics.median(t[0] for t in ts) for ts in (kept_t, full_t))
    kept_cpu, full_cpu = (statistics.median(t[1] for t in ts) for ts in (kept_t, full_t))
    result = {
        "arch": args.arch,
        "img": args.img,
        "patch": args.patch,
        "batch": args.batch,
        "mode": args.mode,
        "device": str(device),
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "mask_ratio": args.mask_ratio,
        "tokens": {"kept": 1 + masking.keep.shape[1], "full": 1 + num_patches},
        "images_per_s": {"kept": round(args.batch / kept, 2), "full": round(args.batch / full, 2)},
        "seconds_per_batch": {"kept": round(kept, 4), "full": round(full, 4)},
        "speedup": round(full / kept, 2),
    }
    if device.type == "cpu":
        result["cpu_seconds_per_batch"] = {"kept": round(kept_cpu, 4), "full": round(full_cpu, 4)}
        result["cpu_time_speedup"] = round(full_cpu / kept_cpu, 2)
    print(json.dumps(result, indent=2))
    cpu = f" ({result['cpu_time_speedup']}x in CPU time)" if device.type == "cpu" else ""
    print(
        f"kept-token encoder {result['speedup']}x the unmasked encoder's images/s{cpu} at mask ratio "
        f"{args.mask_ratio} (goal >= 2.5x)"
    )


if __name__ == "__main__":
    main()
