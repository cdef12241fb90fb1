"""Datasets: ImageFolders over a directory / ``.zip`` / ``.tar``, torchvision names, in-memory uint8 cache.

Every dataset here follows the ``dataset -> loader`` seam of ``docs/architecture.md``:
``dataset[i] -> (image, label)`` where ``image`` is a PIL image (or ``transform(image)``) on the
per-image path, or a ``uint8 [3, H, W]`` tensor on the in-memory path, and every dataset exposes
``.classes`` and ``.targets``.

:class:`ImageFolderDataset` reads the same ``<split>/<class>/<file>`` layout from three containers:

* a **directory** (files are opened per sample),
* a **zip** archive (stored or deflated members are read straight from their offsets, recorded once
  from the central directory; other compression methods fall back to :mod:`zipfile`),
* a **tar** archive (one header scan records ``(offset_data, size)`` per member; a plain tar is then
  read with positioned reads, no re-scan; ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar.xz`` work
  too, but random access into a compressed stream is slow, so extract or repack them for training).

The member index is built once at construction. File handles are opened lazily, per process:
each DataLoader worker notices the pid change and opens its own handle; handles are never pickled.

:func:`build_dataset` maps a dataset name (``cifar10``, ``cifar100``, ``stl10``, ``imagenet``,
``imagenet100``, ``folder``) plus a ``root`` to one of these, or to a wrapped torchvision dataset.
:func:`load_uint8` decodes a whole (small) dataset once into a ``uint8`` tensor for
:class:`TensorImageDataset`. :func:`demo_dataset_path` returns the small CIFAR-10 sample shipped
with the package.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DATASET_NAMES",
    "CorruptImageError",
    "ImageFolderDataset",
    "TorchvisionDataset",
    "TensorImageDataset",
    "build_dataset",
    "load_uint8",
    "demo_dataset_path",
    "read_class_list",
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: File extensions (lower case, no dot) that count as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "bmp", "webp", "ppm", "pgm", "tif", "tiff"}
)

#: Names accepted by :func:`build_dataset`.
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "folder")

# When the requested split folder is absent, these are tried in order.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "val": ("val", "test", "validation"),
    "test": ("test", "val", "validation"),
    "validation": ("validation", "val", "test"),
}

_ZIP_SUFFIXES = (".zip",)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

# Zip compression methods read directly from member offsets; others go through zipfile.
_ZIP_STORED = zipfile.ZIP_STORED
_ZIP_DEFLATED = zipfile.ZIP_DEFLATED
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # 30 bytes
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


class CorruptImageError(RuntimeError):
    """A member of an image dataset cannot be read or decoded as an image.

    The message names the member and the archive / folder it lives in.
    """


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot + 1 :].lower() in IMAGE_EXTENSIONS


def _is_hidden(parts: Sequence[str]) -> bool:
    """Hidden components (``.DS_Store``, ``._x.jpg``) and macOS ``__MACOSX`` folders are ignored."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _normalize_member(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _archive_kind(path: Path) -> str:
    """``"dir"``, ``"zip"`` or ``"tar"`` for an existing path (extension first, then sniffing)."""
    if path.is_dir():
        return "dir"
    lower = path.name.lower()
    if lower.endswith(_ZIP_SUFFIXES):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ValueError(
        f"{path} is neither a directory, a .zip nor a .tar archive; "
        f"ImageFolderDataset reads <split>/<class>/<image> from one of those"
    )


def _tar_compression(path: Path) -> str | None:
    """Compression of a tar file from its magic bytes: ``None`` (plain), ``gz``, ``bz2`` or ``xz``."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


def _open_compressed(path: Path, compression: str) -> Any:
    if compression == "gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == "bz2":
        import bz2

        return bz2.open(path, "rb")
    import lzma

    return lzma.open(path, "rb")


def read_class_list(class_list: PathLike | Sequence[str]) -> list[str]:
    """Read a class list: a text file path (one class per line, ``#`` comments) or a sequence.

    Returns the class names in file order, without duplicates.
    """
    if isinstance(class_list, (str, os.PathLike)):
        p = Path(class_list).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"class_list file {p} does not exist")
        names = []
        for line in p.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    else:
        names = [str(c).strip() for c in class_list]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ValueError(f"class_list {class_list!r} names no classes")
    return names


def _decode(data: bytes, member: str, where: str) -> Image.Image:
    """Decode image bytes to an RGB PIL image, raising :class:`CorruptImageError` on failure."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode != "RGB":
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(
            f"cannot decode image '{member}' in {where}: {type(e).__name__}: {e}"
        ) from e
    return img


# --------------------------------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """An ImageFolder (``<split>/<class>/<image>``) read from a directory, a ``.zip`` or a ``.tar``.

    The split folder is located automatically: the layout may start at ``path`` itself or inside a
    single top folder (e.g. ``cifar10/train/airplane/0000.jpg`` in a zip). If the requested split is
    absent, ``val`` / ``test`` / ``validation`` stand in for one another; :attr:`split_dir` says which
    folder was used. Images may sit in nested folders below their class folder.

    Classes are the sorted class folders holding at least one image; samples are sorted by their
    key ``"<class>/<relative path>"``. The three containers therefore give identical
    :attr:`samples` for identical content.

    Args:
        path: directory, ``.zip`` or ``.tar`` (``.tar.gz`` etc. accepted, slow random access).
        split: split folder name (``train``, ``val``, ``test``, ...); ``None`` means ``path`` itself
            holds the class folders (no top-folder detection).
        transform: applied to the PIL image in :meth:`__getitem__`.
        skip_corrupt: decode every image once now, drop those that fail and list them in
            :attr:`skipped` (with a warning). Otherwise a bad image raises
            :class:`CorruptImageError` when it is loaded.
        class_list: restrict to these classes (a text file, one per line, or a sequence); labels are
            remapped to ``0..K-1`` in sorted class order.

    Attributes:
        classes: sorted class names. class_to_idx: name -> label.
        samples: ``[(key, label)]`` with ``key = "<class>/<file>"`` relative to the split folder.
        targets: labels, in sample order.
        split_dir: the split folder actually used (``"test"`` when ``val`` was asked and absent).
        split_path: where that folder is inside ``path`` (e.g. ``"cifar10/test"``).
        skipped: full member names dropped by ``skip_corrupt``.
    """

    def __init__(
        self,
        path: PathLike,
        split: str | None = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        class_list: PathLike | Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"dataset path {self.path} does not exist")
        self.transform = transform
        self.split = split
        self.kind = _archive_kind(self.path)
        self._compression: str | None = None
        self._fh: Any = None
        self._fh_pid: int | None = None
        self._zf: zipfile.ZipFile | None = None
        self._zf_pid: int | None = None
        self._lock = threading.Lock()
        # archive spelling of member names whose normalised name differs (zipfile fallback only)
        self._raw_names: dict[str, str] = {}

        # 1. one pass over the container: every file member (normalised name) and how to read it
        if self.kind == "dir":
            self._prefix = self._resolve_dir_split(split)
            files = self._scan_dir_split(self._prefix)
            locators: dict[str, tuple[int, ...]] = {}
        else:
            all_files, locators = self._scan_archive()
            self._prefix = self._resolve_archive_split(split, all_files)
            files = [n[len(self._prefix) :] for n in all_files if n.startswith(self._prefix)]

        self.split_path = self._prefix.rstrip("/")
        self.split_dir = self.split_path.rsplit("/", 1)[-1] if self.split_path else ""

        # 2. group by class folder, keep images only
        by_class: dict[str, list[str]] = {}
        for rel in files:
            parts = rel.split("/")
            if len(parts) < 2 or _is_hidden(parts) or not _is_image_name(parts[-1]):
                continue
            by_class.setdefault(parts[0], []).append(rel)
        found = sorted(by_class)
        if not found:
            raise FileNotFoundError(
                f"no images in class folders under '{self.split_path or '.'}' of {self.path} "
                f"(expected <split>/<class>/<image> with extensions {sorted(IMAGE_EXTENSIONS)})"
            )

        # 3. optional class restriction
        if class_list is not None:
            wanted = read_class_list(class_list)
            missing = [c for c in wanted if c not in by_class]
            if missing:
                raise ValueError(
                    f"class_list names {len(missing)} class(es) absent from '{self.split_path}' of "
                    f"{self.path}: {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                    f"({len(found)} classes present, e.g. {found[:5]})"
                )
            classes = sorted(wanted)
        else:
            classes = found

        self.classes: list[str] = classes
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(classes)}
        keys: list[str] = []
        labels: list[int] = []
        for c in classes:
            members = sorted(by_class[c])
            keys.extend(members)
            labels.extend([self.class_to_idx[c]] * len(members))
        self._set_samples(keys, labels, locators)

        # 4. optional upfront validation
        self.skipped: list[str] = []
        if skip_corrupt:
            self._drop_corrupt()

    # ---------------------------------------------------------------- indexing (construction only)

    def _child_dirs_fs(self, rel: str) -> list[str]:
        d = self.path / rel if rel else self.path
        try:
            return sorted(
                e.name for e in os.scandir(d) if e.is_dir() and not _is_hidden([e.name])
            )
        except OSError:
            return []

    def _find_split(
        self, split: str, child_dirs: Callable[[str], list[str]]
    ) -> str:
        """Return the prefix (``"top/split/"`` or ``"split/"``) of the split folder to use."""
        top = child_dirs("")
        roots = [""]
        if len(top) == 1:
            roots.append(top[0] + "/")
        wanted = _SPLIT_ALIASES.get(split, (split,))
        for name in wanted:
            for root in roots:
                if name in child_dirs(root):
                    if name != split:
                        log.info("split '%s' not found in %s, using '%s'", split, self.path, root + name)
                    return root + name + "/"
        available = list(top)
        if len(top) == 1:
            available += [f"{top[0]}/{c}" for c in child_dirs(top[0] + "/")]
        shown = available[:20] + (["..."] if len(available) > 20 else [])
        alias = f" (or its aliases {list(wanted[1:])})" if len(wanted) > 1 else ""
        raise FileNotFoundError(
            f"split '{split}'{alias} not found in {self.path}; expected <split>/<class>/<image> at the "
            f"top or under one top folder. Folders that exist: {shown or 'none'}"
        )

    def _resolve_dir_split(self, split: str | None) -> str:
        if split is None:
            return ""
        return self._find_split(split, self._child_dirs_fs)

    def _scan_dir_split(self, prefix: str) -> list[str]:
        base = self.path / prefix if prefix else self.path
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _is_hidden([d])]
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            if rel_dir == ".":
                continue  # files directly in the split folder belong to no class
            out.extend(f"{rel_dir}/{f}" for f in filenames)
        return out

    def _resolve_archive_split(self, split: str | None, names: list[str]) -> str:
        if split is None:
            return ""
        # directory tree up to depth 2 (enough for "<top>/<split>/")
        children: dict[str, set[str]] = {"": set()}
        for n in names:
            parts = n.split("/", 3)
            if len(parts) < 2 or _is_hidden(parts[:2]):
                continue
            children[""].add(parts[0])
            if len(parts) >= 3:
                children.setdefault(parts[0] + "/", set()).add(parts[1])
        return self._find_split(split, lambda rel: sorted(children.get(rel, ())))

    def _scan_archive(self) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """One pass over the archive index: file names and per-file read locators."""
        locators: dict[str, tuple[int, ...]] = {}
        if self.kind == "zip":
            try:
                with zipfile.ZipFile(self.path) as zf:
                    for info in zf.infolist():
                        if info.is_dir():
                            continue
                        name = _normalize_member(info.filename)
                        locators[name] = (
                            info.header_offset,
                            info.compress_size,
                            info.file_size,
                            info.compress_type,
                            info.CRC,
                            info.flag_bits,
                        )
                        if name != info.filename:
                            self._raw_names[name] = info.filename
            except zipfile.BadZipFile as e:
                raise ValueError(f"{self.path} is not a readable zip archive: {e}") from e
        else:
            self._compression = _tar_compression(self.path)
            if self._compression is not None:
                warnings.warn(
                    f"{self.path} is a compressed tar ({self._compression}): random access decompresses "
                    f"from the start for every backward seek and is very slow; extract it or repack as "
                    f"a plain .tar",
                    stacklevel=3,
                )
            try:
                with tarfile.open(self.path, "r:*") as tf:
                    ti = tf.next()
                    while ti is not None:
                        if ti.isreg() and not ti.issparse():
                            locators[_normalize_member(ti.name)] = (ti.offset_data, ti.size)
                        tf.members = []  # keep memory flat on huge archives
                        ti = tf.next()
            except tarfile.TarError as e:
                raise ValueError(f"{self.path} is not a readable tar archive: {e}") from e
        return sorted(locators), locators

    def _set_samples(
        self, keys: list[str], labels: list[int], locators: dict[str, tuple[int, ...]]
    ) -> None:
        self.samples: list[tuple[str, int]] = list(zip(keys, labels))
        self.targets: list[int] = list(labels)
        if self.kind == "dir":
            self._loc = None
            return
        rows = [locators[self._prefix + k] for k in keys]
        self._loc = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
        if self.kind == "zip":
            encrypted = self._loc[:, 5] & 0x1
            if encrypted.any():
                bad = keys[int(np.flatnonzero(encrypted)[0])]
                raise ValueError(f"{self.path} has encrypted members (e.g. '{self._prefix + bad}')")

    def _drop_corrupt(self) -> None:
        keep: list[int] = []
        for i in range(len(self.samples)):
            try:
                self.load(i)
            except CorruptImageError:
                self.skipped.append(self.member_name(i))
            else:
                keep.append(i)
        if not self.skipped:
            return
        self.samples = [self.samples[i] for i in keep]
        self.targets = [self.targets[i] for i in keep]
        if self._loc is not None:
            self._loc = self._loc[np.asarray(keep, dtype=np.int64)]
        msg = (
            f"skipped {len(self.skipped)} corrupt image(s) in {self.path}: "
            f"{self.skipped[:5]}{' ...' if len(self.skipped) > 5 else ''}"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)

    # ---------------------------------------------------------------- per-process handles

    def _handle(self) -> Any:
        """The raw file handle of this process (opened lazily; reopened after a fork)."""
        pid = os.getpid()
        if self._fh is None or self._fh_pid != pid:
            old, self._fh = self._fh, None
            if old is not None:
                try:
                    old.close()  # the inherited copy: closing it here does not affect the parent
                except Exception:
                    pass
            if self._compression is not None:
                self._fh = _open_compressed(self.path, self._compression)
            else:
                self._fh = open(self.path, "rb", buffering=0)
            self._fh_pid = pid
        return self._fh

    def _pread(self, size: int, offset: int) -> bytes:
        fh = self._handle()
        if self._compression is None and hasattr(os, "pread"):
            chunks = []
            fd = fh.fileno()
            while size > 0:  # pread may return short reads on some file systems
                b = os.pread(fd, size, offset)
                if not b:
                    break
                chunks.append(b)
                size -= len(b)
                offset += len(b)
            return b"".join(chunks)
        with self._lock:
            fh.seek(offset)
            return fh.read(size)

    def _zipfile(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zf is None or self._zf_pid != pid:
            self._zf = zipfile.ZipFile(self.path)
            self._zf_pid = pid
        return self._zf

    def close(self) -> None:
        """Close the file handles of this process (they reopen on the next access)."""
        for attr in ("_fh", "_zf"):
            h = getattr(self, attr, None)
            if h is not None:
                try:
                    h.close()
                except Exception:
                    pass
            setattr(self, attr, None)
        self._fh_pid = self._zf_pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fh=None, _fh_pid=None, _zf=None, _zf_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- access

    def member_name(self, i: int) -> str:
        """Full name of sample ``i`` inside the archive / folder (e.g. ``cifar10/train/cat/0001.jpg``)."""
        return self._prefix + self.samples[i][0]

    def _where(self) -> str:
        return f"{'folder' if self.kind == 'dir' else self.kind + ' archive'} {self.path}"

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of sample ``i``."""
        key = self.samples[i][0]
        if self.kind == "dir":
            with open(os.path.join(self.path, self._prefix + key), "rb") as f:
                return f.read()
        loc = self._loc[i]
        if self.kind == "tar":
            offset, size = int(loc[0]), int(loc[1])
            data = self._pread(size, offset)
            if len(data) != size:
                raise CorruptImageError(
                    f"member '{self.member_name(i)}' of {self._where()} is truncated "
                    f"({len(data)} of {size} bytes)"
                )
            return data
        header_offset, csize, usize, method, crc = (int(v) for v in loc[:5])
        if method not in (_ZIP_STORED, _ZIP_DEFLATED):
            name = self._raw_names.get(self.member_name(i), self.member_name(i))
            try:
                return self._zipfile().read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise CorruptImageError(
                    f"cannot read member '{self.member_name(i)}' of {self._where()}: {e}"
                ) from e
        header = self._pread(_ZIP_LOCAL_HEADER.size, header_offset)
        if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != _ZIP_LOCAL_MAGIC:
            raise CorruptImageError(
                f"bad local header for member '{self.member_name(i)}' of {self._where()}"
            )
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        data = self._pread(csize, header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
        try:
            if len(data) != csize:
                raise ValueError(f"truncated ({len(data)} of {csize} bytes)")
            if method == _ZIP_DEFLATED:
                data = zlib.decompress(data, -15)
            if len(data) != usize or zlib.crc32(data) != crc:
                raise ValueError("size or CRC mismatch")
        except (ValueError, zlib.error) as e:
            raise CorruptImageError(
                f"cannot read member '{self.member_name(i)}' of {self._where()}: {e}"
            ) from e
        return data

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` decoded as an RGB PIL image (raises :class:`CorruptImageError`)."""
        return _decode(self.read_bytes(i), self.member_name(i), self._where())

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, split={self.split_path!r}, "
            f"kind={self.kind!r}, samples={len(self)}, classes={len(self.classes)})"
        )


# --------------------------------------------------------------------------------------------------
# torchvision wrapper
# --------------------------------------------------------------------------------------------------


class TorchvisionDataset(Dataset):
    """A torchvision CIFAR-10 / CIFAR-100 / STL-10 dataset with the ``.classes`` / ``.targets`` seam.

    ``dataset[i] -> (transform(PIL image), label)``; STL-10's unlabeled images have label ``-1``.
    ``uint8_hwc()`` exposes the decoded array for :func:`load_uint8`.
    """

    def __init__(
        self,
        base: Dataset,
        data: np.ndarray,
        targets: Sequence[int],
        classes: Sequence[str],
        split_dir: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.base = base
        self._data = data  # [N, H, W, 3] uint8 (possibly a strided view)
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.split_dir = split_dir
        self.transform = transform

    def uint8_hwc(self) -> np.ndarray:
        """All images as a ``uint8 [N, H, W, 3]`` array (no copy)."""
        return self._data

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image."""
        return Image.fromarray(np.ascontiguousarray(self._data[i]))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.base).__name__}, split={self.split_dir!r}, samples={len(self)})"


def _torchvision_dataset(
    name: str, root: Path, split: str, transform: Any, download: bool
) -> TorchvisionDataset:
    import torchvision.datasets as tvd

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}[name]
    not_found = (
        f"{name} not found under {root} (looked for {root / folder}) and download=False; set "
        f"`download: true` (download=True) to fetch it there, or pass root= a .zip / .tar / "
        f"ImageFolder directory with <split>/<class>/<image>"
    )
    if name in ("cifar10", "cifar100"):
        aliases = {"train": "train", "test": "test", "val": "test"}
        if split not in aliases:
            raise ValueError(f"{name} splits are 'train' and 'test' ('val' means 'test'); got '{split}'")
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        try:
            base = cls(str(root), train=aliases[split] == "train", download=download)
        except RuntimeError as e:
            if not download:
                raise FileNotFoundError(not_found) from e
            raise
        return TorchvisionDataset(base, base.data, base.targets, base.classes, aliases[split], transform)

    splits = ("train", "test", "unlabeled", "train+unlabeled")
    split = "test" if split == "val" else split
    if split not in splits:
        raise ValueError(f"stl10 splits are {list(splits)} ('val' means 'test'); got '{split}'")
    try:
        base = tvd.STL10(str(root), split=split, download=download)
    except RuntimeError as e:
        if not download:
            raise FileNotFoundError(not_found) from e
        raise
    labels = np.asarray(base.labels if base.labels is not None else [-1] * len(base.data))
    data = np.asarray(base.data).transpose(0, 2, 3, 1)  # stored [N, 3, H, W]
    return TorchvisionDataset(base, data, labels.tolist(), base.classes, split, transform)


# --------------------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------------------


def _is_archive_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(_ZIP_SUFFIXES + _TAR_SUFFIXES)


def _has_image_folder_layout(d: Path) -> bool:
    """``d`` (or its single top folder) holds split folders that hold class folders."""

    def subdirs(p: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(p) if e.is_dir() and not _is_hidden([e.name])]
        except OSError:
            return []

    def splits_with_classes(p: Path) -> bool:
        return any(subdirs(s) for s in subdirs(p))

    if not d.is_dir():
        return False
    if splits_with_classes(d):
        return True
    top = subdirs(d)
    return len(top) == 1 and splits_with_classes(top[0])


def build_dataset(
    name: str,
    root: PathLike | None = None,
    split: str = "train",
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
    skip_corrupt: bool = False,
    class_list: PathLike | Sequence[str] | None = None,
) -> Dataset:
    """Build a dataset by name.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive, ``-``/``_`` ignored).
        root: a ``.zip`` / ``.tar`` or a directory. An archive, or a directory with an ImageFolder
            layout (``[top/]<split>/<class>/<image>``), is read by :class:`ImageFolderDataset` for
            any name. Otherwise ``cifar10`` / ``cifar100`` / ``stl10`` use torchvision's files in
            ``root`` (default ``./data``). ``imagenet``, ``imagenet100`` and ``folder`` need it.
        split: ``train`` / ``test`` / ``val`` (ImageFolder: any folder name; ``val`` and ``test``
            stand in for each other); STL-10 also ``unlabeled`` and ``train+unlabeled``.
        transform: per-image transform applied to the PIL image.
        download: let torchvision download CIFAR / STL-10 into ``root``.
        skip_corrupt: see :class:`ImageFolderDataset`.
        class_list: restrict to these classes (file or sequence); required for ``imagenet100``.

    Returns:
        An :class:`ImageFolderDataset` or a :class:`TorchvisionDataset`; both have ``.classes``
        and ``.targets``.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(DATASET_NAMES)}")
    if key == "imagenet100" and class_list is None:
        raise ValueError(
            "imagenet100 is ImageNet restricted to a fixed list of 100 classes: pass class_list= a text "
            "file with the 100 class folder names (wnids, one per line) and root= the ImageNet "
            "folder / .zip / .tar"
        )
    if root is None:
        if key in ("imagenet", "imagenet100", "folder"):
            raise ValueError(
                f"dataset '{key}' needs root= a directory, .zip or .tar with <split>/<class>/<image>"
            )
        root = "./data"
    root_p = Path(root).expanduser()

    if _is_archive_file(root_p) or _has_image_folder_layout(root_p):
        ds = ImageFolderDataset(root_p, split, transform, skip_corrupt=skip_corrupt, class_list=class_list)
        expected = {"cifar10": 10, "cifar100": 100}.get(key)
        if expected is not None and class_list is None and len(ds.classes) != expected:
            raise ValueError(
                f"{key} expects {expected} classes but '{ds.split_path}' of {root_p} has "
                f"{len(ds.classes)} ({ds.classes[:5]}...); use name='folder' for another dataset"
            )
        return ds

    if key in ("imagenet", "imagenet100", "folder"):
        if not root_p.exists():
            raise FileNotFoundError(f"dataset root {root_p} does not exist")
        raise FileNotFoundError(
            f"{root_p} has no ImageFolder layout: expected a .zip / .tar or a directory with "
            f"[top/]<split>/<class>/<image> (if {root_p} holds the class folders directly, use "
            f"ImageFolderDataset({str(root_p)!r}, split=None))"
        )
    if class_list is not None:
        raise ValueError("class_list is only supported for ImageFolder datasets (folder / .zip / .tar)")
    return _torchvision_dataset(key, root_p, split, transform, download)


# --------------------------------------------------------------------------------------------------
# in-memory path
# --------------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as ``uint8 [N, 3, H, W]``; ``dataset[i] -> (images[i], labels[i])``.

    Args:
        images: ``uint8`` tensor ``[N, 3, H, W]``.
        labels: ``int64`` tensor ``[N]`` (or a sequence of ints).
        classes: class names; default ``["0", "1", ...]`` up to the largest label.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        classes: Sequence[str] | None = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {list(labels.shape)}")
        self.images = images
        self.labels = labels
        self.targets: list[int] = labels.tolist()
        if classes is None:
            n = int(labels.max()) + 1 if len(labels) else 0
            classes = [str(i) for i in range(n)]
        self.classes: list[str] = list(classes)

    @classmethod
    def from_dataset(cls, dataset: Dataset, size: int | None = None, num_workers: int = 0) -> "TensorImageDataset":
        """Decode ``dataset`` with :func:`load_uint8` and keep its ``classes``."""
        images, labels = load_uint8(dataset, size=size, num_workers=num_workers)
        base, _ = _unwrap_subset(dataset)
        return cls(images, labels, getattr(base, "classes", None))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __len__(self) -> int:
        return self.images.shape[0]


def _unwrap_subset(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """Resolve (nested) ``Subset`` s to the base dataset and its indices (``None`` = all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        sub = [int(i) for i in dataset.indices]
        indices = sub if indices is None else [sub[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _image_array(dataset: Dataset, i: int) -> np.ndarray:
    """Image ``i`` of ``dataset`` as ``uint8 [H, W, 3]`` (untransformed where ``load`` exists)."""
    if hasattr(dataset, "load"):
        img = dataset.load(i)
    else:
        img = dataset[i][0]
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise TypeError(f"sample {i}: expected a uint8 [3, H, W] tensor, got {img.dtype} {list(img.shape)}")
        return img.permute(1, 2, 0).numpy()
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"sample {i}: expected a PIL image or uint8 [H, W, 3] array, got {type(img).__name__}")
    return arr


def _sample_name(dataset: Dataset, i: int) -> str:
    if isinstance(dataset, ImageFolderDataset):
        return f"{i} ('{dataset.member_name(i)}')"
    return str(i)


def _decode_into(
    dataset: Dataset, indices: Sequence[int], out: np.ndarray, size: int | None
) -> None:
    """Decode ``dataset[indices[j]]`` into ``out[j]`` (``uint8 [n, 3, H, W]``)."""
    h, w = out.shape[2], out.shape[3]
    fast = isinstance(dataset, ImageFolderDataset)
    for j, i in enumerate(indices):
        if fast:
            img = dataset.load(i)
            if size is not None and img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
            a = np.asarray(img)
        else:
            a = _image_array(dataset, i)
            if size is not None and a.shape[:2] != (h, w):
                a = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))
        if a.shape[:2] != (h, w):
            raise ValueError(
                f"load_uint8: sample {_sample_name(dataset, i)} is {a.shape[1]}x{a.shape[0]} (WxH) but "
                f"the first is {w}x{h}; pass size= to resize all images"
            )
        out[j] = a.transpose(2, 0, 1)


class _ChunkDecoder(Dataset):
    """Worker-side decoding of index chunks for :func:`load_uint8` with ``num_workers > 0``."""

    def __init__(self, dataset: Dataset, chunks: list[list[int]], hw: tuple[int, int], size: int | None):
        self.dataset, self.chunks, self.hw, self.size = dataset, chunks, hw, size

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> torch.Tensor:
        idx = self.chunks[k]
        out = np.empty((len(idx), 3, *self.hw), dtype=np.uint8)
        _decode_into(self.dataset, idx, out, self.size)
        return torch.from_numpy(out)


def load_uint8(
    dataset: Dataset, size: int | None = None, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of ``dataset`` once into memory.

    Works on :class:`ImageFolderDataset`, :class:`TorchvisionDataset` (no decoding needed),
    ``Subset`` s of them, and any dataset whose ``load(i)`` / ``[i][0]`` is a PIL image, a
    ``uint8 [H, W, 3]`` array or a ``uint8 [3, H, W]`` tensor. Transforms are not applied.

    Args:
        dataset: the dataset; labels come from its ``targets``.
        size: resize every image to ``size x size`` (bilinear, antialiased) where it differs.
            Without it all images must share the first one's size.
        num_workers: decode in this many worker processes (chunks of the index range).

    Returns:
        ``(images uint8 [N, 3, H, W], labels int64 [N])``.
    """
    base, indices = _unwrap_subset(dataset)
    idx = list(range(len(base))) if indices is None else indices
    n = len(idx)
    targets = getattr(base, "targets", None)
    if targets is not None:
        labels = torch.as_tensor([int(targets[i]) for i in idx], dtype=torch.int64)
    else:
        labels = torch.as_tensor([int(base[i][1]) for i in idx], dtype=torch.int64)
    if n == 0:
        s = size or 0
        return torch.empty((0, 3, s, s), dtype=torch.uint8), labels

    if isinstance(base, TorchvisionDataset):  # already decoded: one vectorised gather
        arr = base.uint8_hwc()[np.asarray(idx)]
        images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
        if size is not None and images.shape[-2:] != (size, size):
            images = torch.nn.functional.interpolate(
                images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            ).round_().clamp_(0, 255).to(torch.uint8)
        return images, labels

    if size is not None:
        h = w = int(size)
    else:
        first = _image_array(base, idx[0])
        h, w = first.shape[:2]
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    if num_workers <= 0:
        _decode_into(base, idx, out, size)
    else:
        chunk = max(1, min(2048, -(-n // (num_workers * 4))))
        chunks = [idx[k : k + chunk] for k in range(0, n, chunk)]
        loader = DataLoader(
            _ChunkDecoder(base, chunks, (h, w), size),
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
        )
        pos = 0
        for block in loader:
            out[pos : pos + len(block)] = block.numpy()
            pos += len(block)
    return torch.from_numpy(out), labels


# --------------------------------------------------------------------------------------------------
# demo data
# --------------------------------------------------------------------------------------------------


def demo_dataset_path() -> Path:
    """Path of the CIFAR-10 sample shipped with the package (``selfsup/assets/cifar10_demo.zip``).

    It holds 4,000 train / 1,000 test original CIFAR-10 JPEGs (class balanced) in
    ``cifar10/{train,test}/<class>/<file>.jpg``; build it with ``scripts/build_demo_data.py``.
    """
    path = Path(__file__).resolve().parents[1] / "assets" / "cifar10_demo.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo dataset {path} is missing; rebuild it with `python scripts/build_demo_data.py "
            f"--source <cifar10-jpeg.zip> --out {path}`"
        )
    return path
