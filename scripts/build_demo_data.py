#!/usr/bin/env python
"""Build the small CIFAR-10 demo archive shipped as ``selfsup/assets/cifar10_demo.zip``.

Copies a random but deterministic, class-balanced sample of the original JPEG bytes (no
re-encoding) from a CIFAR-10 ImageFolder (``.zip`` / ``.tar`` / directory, e.g.
``../shared/datasets/cifar10-jpeg.zip``) into a new uncompressed zip with the layout
``cifar10/{train,test}/<class>/<file>``. The output is byte-for-byte reproducible (sorted
members, fixed timestamps).

Example::

    python scripts/build_demo_data.py --source ../shared/datasets/cifar10-jpeg.zip \\
        --out selfsup/assets/cifar10_demo.zip --train-per-class 400 --test-per-class 100 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import zipfile
from collections import defaultdict
from pathlib import Path

from selfsup.data.datasets import ImageFolderDataset


def sample_split(ds: ImageFolderDataset, per_class: int, rng: random.Random) -> list[int]:
    """Indices of ``per_class`` random samples of every class, in sample order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(ds.samples):
        by_class[label].append(i)
    chosen: list[int] = []
    for label in range(len(ds.classes)):
        pool = by_class[label]
        if len(pool) < per_class:
            raise ValueError(
                f"class '{ds.classes[label]}' of split '{ds.split_path}' has only {len(pool)} images, "
                f"{per_class} requested"
            )
        chosen.extend(rng.sample(pool, per_class))
    return sorted(chosen)


def build(source: Path, out: Path, per_class: dict[str, int], seed: int, top: str = "cifar10") -> dict[str, int]:
    """Write the demo zip; return the number of images per split."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    counts: dict[str, int] = {}
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for split, n in per_class.items():
            ds = ImageFolderDataset(source, split)
            rng = random.Random(f"{seed}-{split}")
            idx = sample_split(ds, n, rng)
            for i in idx:
                info = zipfile.ZipInfo(f"{top}/{split}/{ds.samples[i][0]}", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                zf.writestr(info, ds.read_bytes(i))
            ds.close()
            counts[split] = len(idx)
    os.replace(tmp, out)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="CIFAR-10 ImageFolder (.zip / .tar / directory)")
    p.add_argument("--out", type=Path, default=Path("selfsup/assets/cifar10_demo.zip"))
    p.add_argument("--train-per-class", type=int, default=400)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = build(args.source, args.out, {"train": args.train_per_class, "test": args.test_per_class}, args.seed)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" images, {size:,} bytes ({size / 2**20:.2f} MiB)"
    )


if __name__ == "__main__":
    main()
