"""Tests for selfsup.data.datasets on real CIFAR-10 JPEGs (the full archive where present, else the shipped sample)."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from selfsup.data import (
    CorruptImageError,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    demo_dataset_path,
    load_uint8,
)

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _extract_small(cifar_zip: Path, classes=("bird", "cat", "dog"), per_class: int = 5) -> dict[str, bytes]:
    """``{"<class>/<file>": jpeg bytes}`` for a few real test images."""
    out: dict[str, bytes] = {}
    with zipfile.ZipFile(cifar_zip) as zf:
        names = sorted(zf.namelist())
        for c in classes:
            members = [n for n in names if n.startswith(f"cifar10/test/{c}/") and n.endswith(".jpg")][:per_class]
            for k, name in enumerate(members):
                out[f"{c}/{k:04d}.jpg"] = zf.read(name)
    return out


def _pixels(ds) -> list[np.ndarray]:
    return [np.asarray(ds.load(i)) for i in range(len(ds))]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("split,n", [("train", 50_000), ("test", 10_000)])
def test_shared_zip_is_cifar10(full_cifar_zip, split, n):
    ds = build_dataset("cifar10", full_cifar_zip, split)
    assert isinstance(ds, ImageFolderDataset)
    assert len(ds) == n and len(ds.targets) == n
    assert ds.classes == CIFAR_CLASSES
    assert ds.split_dir == split
    assert Counter(ds.targets) == {i: n // 10 for i in range(10)}
    img, label = ds[n - 1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 9


def test_cifar_class_count_checked(cifar_zip):
    with pytest.raises(ValueError, match="100 classes"):
        build_dataset("cifar100", cifar_zip, "train")


# ------------------------------------------------------------------------------ dir / zip / tar


@pytest.fixture()
def small_folders(cifar_zip, tmp_path):
    """The same 3 x 5 images as a directory, a zip (with a top folder) and a tar (without)."""
    files = _extract_small(cifar_zip)
    d = tmp_path / "folder"
    for key, data in files.items():
        p = d / "test" / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    z = tmp_path / "small.zip"
    with zipfile.ZipFile(z, "w") as zf:  # deflated: exercises the decompressing path
        for key, data in sorted(files.items(), reverse=True):
            zf.writestr(f"top/test/{key}", data, compress_type=zipfile.ZIP_DEFLATED)
    t = tmp_path / "small.tar"
    with tarfile.open(t, "w") as tf:
        tf.add(d / "test", arcname="test")
    return d, z, t


def test_dir_zip_tar_identical(small_folders):
    d, z, t = small_folders
    sets = [ImageFolderDataset(p, "test") for p in (d, z, t)]
    assert [s.kind for s in sets] == ["dir", "zip", "tar"]
    ref = sets[0]
    assert ref.classes == ["bird", "cat", "dog"]
    assert ref.targets == [0] * 5 + [1] * 5 + [2] * 5
    ref_px = _pixels(ref)
    for ds in sets[1:]:
        assert ds.classes == ref.classes and ds.class_to_idx == ref.class_to_idx
        assert ds.samples == ref.samples and ds.targets == ref.targets
        for a, b in zip(ref_px, _pixels(ds)):
            np.testing.assert_array_equal(a, b)
    assert sets[1].split_path == "top/test"
    assert sets[2].split_path == "test"


def test_val_resolves_to_test(small_folders):
    for p in small_folders:
        ds = ImageFolderDataset(p, "val")
        assert ds.split_dir == "test" and len(ds) == 15


def test_pickle_drops_handles(small_folders):
    _, z, _ = small_folders
    ds = ImageFolderDataset(z, "test")
    ds.load(0)
    assert ds._fh is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fh is None
    np.testing.assert_array_equal(np.asarray(clone.load(3)), np.asarray(ds.load(3)))
    ds.close()
    assert ds._fh is None
    np.testing.assert_array_equal(np.asarray(clone.load(3)), np.asarray(ds.load(3)))


class _WithPid(torch.utils.data.Dataset):
    """Returns pixels plus the pid that read them and the pid the dataset's handle belongs to."""

    def __init__(self, ds: ImageFolderDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return img, label, os.getpid(), self.ds._fh_pid


def test_dataloader_workers_open_own_handles(cifar_zip):
    ds = build_dataset("cifar10", cifar_zip, "test", transform=_to_tensor)
    sub = list(range(0, len(ds), len(ds) // 20))
    ref = torch.stack([ds[i][0] for i in sub])  # opens the main process handle first
    main_pid = os.getpid()
    assert ds._fh_pid == main_pid
    loader = DataLoader(Subset(_WithPid(ds), sub), batch_size=5, num_workers=2)
    imgs, labels, pids, handle_pids = (torch.cat(x) for x in zip(*list(loader)))
    torch.testing.assert_close(imgs, ref, rtol=0, atol=0)
    assert labels.tolist() == [ds.targets[i] for i in sub]
    assert main_pid not in pids.tolist() and len(set(pids.tolist())) == 2
    assert handle_pids.tolist() == pids.tolist()  # each worker reads through its own handle
    assert ds._fh_pid == main_pid


# ------------------------------------------------------------------------------ corrupt members


def test_corrupt_member(cifar_zip, tmp_path):
    files = _extract_small(cifar_zip, classes=("cat", "dog"), per_class=3)
    files["dog/broken.jpg"] = b"this is not a jpeg" * 10
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for key, data in files.items():
            zf.writestr(f"data/train/{key}", data)
    ds = ImageFolderDataset(z, "train")
    assert len(ds) == 7 and ds.skipped == []
    bad = [k for k, _ in ds.samples].index("dog/broken.jpg")
    with pytest.raises(CorruptImageError, match="data/train/dog/broken.jpg") as exc:
        ds[bad]
    assert isinstance(exc.value, RuntimeError) and str(z) in str(exc.value)

    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        ok = ImageFolderDataset(z, "train", skip_corrupt=True)
    assert ok.skipped == ["data/train/dog/broken.jpg"]
    assert len(ok) == 6 and ok.targets == [0, 0, 0, 1, 1, 1]
    for i in range(len(ok)):
        ok[i]


# ------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        build_dataset("folder", missing)


def test_missing_split(small_folders):
    _, z, _ = small_folders
    with pytest.raises(FileNotFoundError) as exc:
        ImageFolderDataset(z, "train")
    msg = str(exc.value)
    assert "'train'" in msg and str(z) in msg and "top/test" in msg


def test_unknown_name():
    with pytest.raises(ValueError) as exc:
        build_dataset("mnist", "/tmp")
    msg = str(exc.value)
    assert "mnist" in msg and all(n in msg for n in ("cifar10", "cifar100", "stl10", "imagenet100", "folder"))


def test_imagenet100_needs_class_list(small_folders):
    d, _, _ = small_folders
    with pytest.raises(ValueError, match="class_list"):
        build_dataset("imagenet100", d, "test")
    with pytest.raises(ValueError, match="root"):
        build_dataset("folder")


def test_class_list(small_folders, tmp_path):
    d, z, t = small_folders
    lst = tmp_path / "classes.txt"
    lst.write_text("# two of the three\ndog\n\ncat  # inline comment\n")
    for p in (d, z, t):
        ds = build_dataset("imagenet100", p, "val", class_list=lst)
        assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
        assert ds.targets == [0] * 5 + [1] * 5
        assert all(k.startswith(("cat/", "dog/")) for k, _ in ds.samples)
        assert build_dataset("folder", p, "test", class_list=["dog"]).targets == [0] * 5
    with pytest.raises(ValueError) as exc:
        ImageFolderDataset(z, "test", class_list=["cat", "zebra", "unicorn"])
    msg = str(exc.value)
    assert "absent" in msg and "['zebra', 'unicorn']" in msg and str(z) in msg


def test_torchvision_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        build_dataset("cifar10", root=tmp_path, download=False)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "download" in msg


# ------------------------------------------------------------------------------ in-memory path


def test_load_uint8_matches_pil(cifar_zip):
    ds = build_dataset("cifar10", cifar_zip, "test")
    b = ds.targets.index(1)
    idx = list(range(b - 5, b + 25))  # crosses the airplane / automobile boundary
    images, labels = load_uint8(Subset(ds, idx))
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [ds.targets[i] for i in idx]
    with zipfile.ZipFile(cifar_zip) as zf:
        for j, i in enumerate(idx):
            with zf.open("cifar10/test/" + ds.samples[i][0]) as f:
                ref = np.asarray(Image.open(f).convert("RGB"))
            np.testing.assert_array_equal(images[j].permute(1, 2, 0).numpy(), ref)

    small, _ = load_uint8(Subset(ds, idx[:4]), size=16)
    assert small.shape == (4, 3, 16, 16)
    ref16 = np.asarray(ds.load(idx[0]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(small[0].permute(1, 2, 0).numpy(), ref16)

    tds = TensorImageDataset(images, labels, ds.classes)
    x, y = tds[3]
    assert torch.equal(x, images[3]) and int(y) == labels[3] and tds.targets == labels.tolist()
    assert len(tds) == 30 and tds.classes == CIFAR_CLASSES


def test_load_uint8_workers_and_size_mismatch(small_folders, tmp_path):
    d, z, _ = small_folders
    ds = ImageFolderDataset(z, "test")
    a, la = load_uint8(ds)
    b, lb = load_uint8(ds, num_workers=2)
    assert torch.equal(a, b) and torch.equal(la, lb)

    Image.new("RGB", (20, 24), (1, 2, 3)).save(d / "test" / "dog" / "odd.png")
    mixed = ImageFolderDataset(d, "test")
    with pytest.raises(ValueError, match="dog/odd.png"):
        load_uint8(mixed)
    resized, _ = load_uint8(mixed, size=32)
    assert resized.shape == (16, 3, 32, 32)


# ------------------------------------------------------------------------------ demo asset


def test_demo_asset():
    path = demo_dataset_path()
    assert path.is_file() and path.stat().st_size < 8 * 2**20
    for split, n in (("train", 4000), ("test", 1000)):
        ds = build_dataset("cifar10", path, split)
        assert len(ds) == n and ds.classes == CIFAR_CLASSES
        assert Counter(ds.targets) == {i: n // 10 for i in range(10)}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert all(i.filename.startswith(("cifar10/train/", "cifar10/test/")) for i in infos)


def test_keyed_dataset_seeds_only_what_draws_randomness(monkeypatch):
    """In-memory uint8 images (batched view mode) are read without forking and seeding torch's RNG, through
    ``Subset`` s, and give the same items as the seeded read; a transformed dataset is still keyed on
    ``(seed, epoch, index)``."""
    from selfsup.data.build import MapDataset
    from selfsup.data.keyed import KeyedDataset, draws_randomness
    from selfsup.data.memory import TensorImageDataset

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mem = TensorImageDataset(images, [0, 1, 2, 0, 1, 2])
    noisy = MapDataset(mem, lambda x: x.float() + torch.rand(()))  # draws from torch's global RNG
    assert not draws_randomness(mem) and not draws_randomness(Subset(Subset(mem, [1, 2, 3]), [0, 2]))
    assert draws_randomness(noisy) and draws_randomness(Subset(noisy, [0]))

    seeded = KeyedDataset(mem, seed=3)
    seeded.keyed = True  # the seeded read, for comparison
    expected = [seeded[(1, i)] for i in range(6)]
    calls = []
    real_fork = torch.random.fork_rng
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: calls.append(1) or real_fork(*a, **k))
    fast = KeyedDataset(Subset(mem, list(range(6))), seed=3)
    got = [fast[(1, i)] for i in range(6)]
    assert calls == [] and all(torch.equal(g[0], e[0]) and g[1] == e[1] and g[2] == e[2] for g, e in zip(got, expected))

    keyed = KeyedDataset(noisy, seed=3)
    a, b, c = keyed[(1, 2)][0], keyed[(1, 2)][0], keyed[(2, 2)][0]
    assert len(calls) == 3 and torch.equal(a, b) and not torch.equal(a, c)  # same key, same draw; other epoch, other
