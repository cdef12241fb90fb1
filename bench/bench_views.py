"""Benchmark view generation on CPU: per-image torchvision pipeline vs. batched on-device views.

Generates V=8 views of B=256 CIFAR-size (32x32) images with the ``cifar10`` preset, two ways, in the
same process with ``torch.set_num_threads(2)``:

(a) ``MultiViewTransform`` called per image in the main process (what one DataLoader worker does);
(b) ``BatchedViews`` on the whole uint8 batch at once.

Images are real CIFAR-10 JPEGs from ``../shared/datasets/cifar10-jpeg.zip`` when present (a few
hundred decoded with PIL), random uint8 otherwise. Prints views/s for each and the ratio.

Usage: ``python bench/bench_views.py [--batch 256] [--views 8] [--preset cifar10] [--seconds 8]``
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.data.batched import BatchedViews
from selfsup.data.transforms import MultiViewTransform, as_pipelines, get_preset

ZIP = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.zip"


def load_images(n: int, size: int = 32) -> tuple[list[Image.Image], str]:
    """``n`` RGB PIL images: real CIFAR-10 train JPEGs if the shared zip exists, else random noise."""
    if ZIP.is_file():
        with zipfile.ZipFile(ZIP) as zf:
            names = [m for m in zf.namelist() if m.startswith("cifar10/train/") and m.endswith(".jpg")]
            step = max(1, len(names) // n)
            imgs = [Image.open(io.BytesIO(zf.read(m))).convert("RGB") for m in names[::step][:n]]
        return imgs, f"real CIFAR-10 JPEGs from {ZIP}"
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return [Image.fromarray(a) for a in arrs], "random uint8 (shared zip not found)"


def timed(fn, min_seconds: float, min_reps: int = 2) -> float:
    """Seconds per call of ``fn`` after one warm-up, repeated for at least ``min_seconds``."""
    fn()
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timing window per method")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    pipes = as_pipelines(get_preset(args.preset))
    imgs, source = load_images(args.batch, pipes[0].crop_size)
    batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in imgs])
    n_views = args.batch * args.views
    print(f"preset={args.preset} B={args.batch} V={args.views} threads={torch.get_num_threads()} images: {source}")

    mvt = MultiViewTransform(pipes, args.views)

    def per_image() -> torch.Tensor:
        return torch.stack([mvt(im) for im in imgs])

    bv = BatchedViews(pipes, args.views)
    gen = torch.Generator().manual_seed(0)

    def batched() -> torch.Tensor:
        return bv(batch, gen)

    assert per_image().shape == batched().shape == (args.batch, args.views, 3, pipes[0].crop_size, pipes[0].crop_size)
    t_pi = timed(per_image, args.seconds)
    t_b = timed(batched, args.seconds)
    vps_pi, vps_b = n_views / t_pi, n_views / t_b
    print(f"(a) per-image MultiViewTransform: {t_pi * 1e3:9.1f} ms/batch  {vps_pi:10.0f} views/s")
    print(f"(b) BatchedViews (CPU)          : {t_b * 1e3:9.1f} ms/batch  {vps_b:10.0f} views/s")
    print(f"ratio batched / per-image       : {vps_b / vps_pi:9.1f}x")


if __name__ == "__main__":
    main()
