"""Linear-probe wall time: cached features vs a backbone forward at every epoch.

Both protocols train the same head (parameter-free BN + Linear, SGD, per-step cosine) with the
same seed, epochs and lr on the same real CIFAR-10 slice read from the shared zip. The
per-epoch protocol (``linear_probe_augmented``) is run **without augmentation** here, so both see
identical inputs and identical mini-batches and must reach the same accuracy; the only
difference is that it forwards the frozen backbone over the training images at every epoch,
whereas the cached protocol forwards every image once.

The backbone is a randomly initialised ResNet-18 layout (BasicBlock [2, 2, 2, 2]) with a CIFAR
stem (3x3 conv, stride 1, no max-pool). ``--width 64`` is torchvision's resnet18 exactly;
the default width 16 quarters the FLOPs of width 32 so that the bench stays well under three
minutes on 2 CPU threads even on a busy shared machine (wall times there vary several-fold with
other load; the process CPU time is printed too and is the steadier number).

    python bench/bench_linear.py [--n-train 5000 --n-test 1000 --epochs 10 --width 16]
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.resnet import BasicBlock, conv1x1

from selfsup.eval import ProbeConfig, extract_features, linear_probe_augmented, linear_probe_cached

CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.zip"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar_slice(zip_path: Path, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``per_class`` images per class of ``split``: ``uint8 [N, 3, 32, 32]`` and int64 labels."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"cifar10/{split}/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[2] for n in names})
        images, labels = [], []
        for ci, cls in enumerate(classes):
            for m in [n for n in names if n.split("/")[2] == cls][:per_class]:
                images.append(np.asarray(Image.open(io.BytesIO(zf.read(m))).convert("RGB")))
                labels.append(ci)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class NormalisedImages(Dataset):
    """In-memory uint8 images -> normalised float tensors (the eval transform); has ``.targets``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.targets = labels.tolist()
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.images[i].float().div(255) - self.mean) / self.std, self.targets[i]


def cifar_resnet18(width: int = 64) -> nn.Module:
    """ResNet-18 layout with a CIFAR stem and no classifier; ``width`` = channels of layer1."""
    if width == 64:
        net = torchvision.models.resnet18()
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return net

    def layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

    w = width
    net = nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        layer(w, w, 1),
        layer(w, 2 * w, 2),
        layer(2 * w, 4 * w, 2),
        layer(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zip", type=Path, default=CIFAR_ZIP)
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    x_tr, y_tr = load_cifar_slice(args.zip, "train", args.n_train // 10)
    x_te, y_te = load_cifar_slice(args.zip, "test", args.n_test // 10)
    train_ds, test_ds = NormalisedImages(x_tr, y_tr), NormalisedImages(x_te, y_te)
    print(
        f"data: {len(train_ds)} train / {len(test_ds)} test real CIFAR-10 images, decoded in {time.perf_counter() - t:.1f}s"
    )

    backbone = cifar_resnet18(args.width).eval()
    n_params = sum(p.numel() for p in backbone.parameters())
    print(
        f"backbone: random-init ResNet-18 layout, width {args.width}, {n_params / 1e6:.2f}M params; "
        f"{args.threads} threads, {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}"
    )
    # Warm-up (one-off kernel selection / allocator growth) so neither protocol pays it.
    with torch.no_grad():
        for _ in range(2):
            backbone(torch.stack([train_ds[i][0] for i in range(args.batch_size)]))
    probe = ProbeConfig(lrs=args.lr, weight_decays=0.0, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)

    # Cached: one forward over train + test, then the head trains on the stored features.
    t, c = time.perf_counter(), time.process_time()
    tr_f, tr_y = extract_features(backbone, DataLoader(train_ds, batch_size=args.batch_size))
    te_f, te_y = extract_features(backbone, DataLoader(test_ds, batch_size=args.batch_size))
    t_extract = time.perf_counter() - t
    cached = linear_probe_cached(tr_f, tr_y, te_f, te_y, 10, probe)
    t_cached, c_cached = time.perf_counter() - t, time.process_time() - c

    # Per-epoch forward: the backbone runs over the training images at every epoch.
    t, c = time.perf_counter(), time.process_time()
    per_epoch = linear_probe_augmented(backbone, train_ds, test_ds, 10, probe, val_dataset=train_ds)
    t_per_epoch, c_per_epoch = time.perf_counter() - t, time.process_time() - c

    print(
        f"cached     : {t_cached:7.1f}s (extraction {t_extract:.1f}s + head {cached.seconds:.1f}s)  "
        f"test top-1 {cached.test_top1:.2f} (epoch {cached.epoch}), last {cached.test_top1_last:.2f}, val {cached.val_top1:.2f}"
    )
    print(
        f"per-epoch  : {t_per_epoch:7.1f}s  "
        f"test top-1 {per_epoch.test_top1:.2f} (epoch {per_epoch.epoch}), last {per_epoch.test_top1_last:.2f}, val {per_epoch.val_top1:.2f}"
    )
    print(
        f"speed-up of cached features: {t_per_epoch / t_cached:.1f}x wall, "
        f"{c_per_epoch / c_cached:.1f}x CPU time ({c_cached:.1f}s vs {c_per_epoch:.1f}s; "
        f"CPU time is the steadier number on a shared machine)"
    )
    same = cached.val_curve == per_epoch.val_curve and cached.test_top1 == per_epoch.test_top1
    print(f"identical curves and test accuracy: {same}")
    print(
        json.dumps(
            {
                "cached_s": round(t_cached, 2),
                "per_epoch_s": round(t_per_epoch, 2),
                "ratio": round(t_per_epoch / t_cached, 2),
                "cached_cpu_s": round(c_cached, 2),
                "per_epoch_cpu_s": round(c_per_epoch, 2),
                "cached": cached.to_dict(),
                "per_epoch": per_epoch.to_dict(),
            }
        )
    )


if __name__ == "__main__":
    main()
