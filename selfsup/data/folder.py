"""ImageFolder rules: ``[top/]<split>/<class>/<image>`` read from any :class:`~selfsup.data.archive.Archive`.

:class:`ImageFolderDataset` follows the ``dataset -> loader`` seam of ``docs/architecture.md``:
``dataset[i] -> (image, label)`` with ``image`` an RGB PIL image (or ``transform(image)``), plus
``.classes`` and ``.targets``. The rules, identical for a directory, a zip and a tar:

* the split folder sits at the top of the container or inside a single top folder;
* a missing ``val`` / ``test`` / ``validation`` split is replaced by one of the others;
* classes are the sorted class folders holding at least one image (extensions
  :data:`IMAGE_EXTENSIONS`, case-insensitive), optionally restricted by a class list;
* hidden files and folders (``.x``, ``__MACOSX``) are ignored; images may be nested below their class.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from selfsup.data.archive import Archive, CorruptImageError, PathLike, is_hidden

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "decode_image", "has_image_folder_layout", "read_class_list"]

log = logging.getLogger(__name__)

#: File extensions (lower case, no dot) that count as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "bmp", "webp", "ppm", "pgm", "tif", "tiff"})

# When the requested split folder is absent, these are tried in order.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "val": ("val", "test", "validation"),
    "test": ("test", "val", "validation"),
    "validation": ("validation", "val", "test"),
}


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot + 1 :].lower() in IMAGE_EXTENSIONS


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


def decode_image(data: bytes, member: str, where: str) -> Image.Image:
    """Decode image bytes to an RGB PIL image, raising :class:`CorruptImageError` on failure."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode != "RGB":
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"cannot decode image '{member}' in {where}: {type(e).__name__}: {e}") from e
    return img


def has_image_folder_layout(d: Path) -> bool:
    """``d`` is a directory that (or whose single top folder) holds split folders holding class folders."""

    def subdirs(p: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(p) if e.is_dir() and not is_hidden([e.name])]
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


def _find_split(split: str, subdirs: Callable[[str], list[str]], path: Path) -> str:
    """The prefix (``"top/split/"`` or ``"split/"``) of the split folder to use, aliases included."""
    top = subdirs("")
    roots = [""]
    if len(top) == 1:
        roots.append(top[0] + "/")
    wanted = _SPLIT_ALIASES.get(split, (split,))
    for name in wanted:
        for root in roots:
            if name in subdirs(root):
                if name != split:
                    log.info("split '%s' not found in %s, using '%s'", split, path, root + name)
                return root + name + "/"
    available = list(top)
    if len(top) == 1:
        available += [f"{top[0]}/{c}" for c in subdirs(top[0] + "/")]
    shown = available[:20] + (["..."] if len(available) > 20 else [])
    alias = f" (or its aliases {list(wanted[1:])})" if len(wanted) > 1 else ""
    raise FileNotFoundError(
        f"split '{split}'{alias} not found in {path}; expected <split>/<class>/<image> at the "
        f"top or under one top folder. Folders that exist: {shown or 'none'}"
    )


class ImageFolderDataset(Dataset):
    """An ImageFolder (``<split>/<class>/<image>``) read from a directory, a ``.zip`` or a ``.tar``.

    The split folder is located automatically: the layout may start at ``path`` itself or inside a
    single top folder (e.g. ``cifar10/train/airplane/0000.jpg`` in a zip). If the requested split is
    absent, ``val`` / ``test`` / ``validation`` stand in for one another; :attr:`split_dir` says which
    folder was used. Images may sit in nested folders below their class folder.

    Classes are the sorted class folders holding at least one image; samples are sorted by their
    key ``"<class>/<relative path>"``. The three containers therefore give identical
    :attr:`samples` for identical content. The container index is read once, here; file handles are
    per process (see :class:`~selfsup.data.archive.Archive`).

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
        kind: ``"dir"``, ``"zip"`` or ``"tar"``.
    """

    def __init__(
        self,
        path: PathLike,
        split: str | None = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        class_list: PathLike | Sequence[str] | None = None,
    ) -> None:
        self._archive = Archive(path)
        self.path = self._archive.path
        self.kind = self._archive.kind
        self.transform = transform
        self.split = split

        # 1. one pass over the container; the split folder; every file below it
        listing = self._archive.listing()
        self._prefix = "" if split is None else _find_split(split, listing.subdirs, self.path)
        files = listing.files(self._prefix)
        self.split_path = self._prefix.rstrip("/")
        self.split_dir = self.split_path.rsplit("/", 1)[-1] if self.split_path else ""

        # 2. group by class folder, keep images only
        by_class: dict[str, list[str]] = {}
        for rel in files:
            parts = rel.split("/")
            if len(parts) < 2 or is_hidden(parts) or not _is_image_name(parts[-1]):
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
        self.samples: list[tuple[str, int]] = list(zip(keys, labels))
        self.targets: list[int] = list(labels)
        self._loc = listing.locators([self._prefix + k for k in keys])  # None for a directory
        del listing, files, by_class

        # 4. optional upfront validation
        self.skipped: list[str] = []
        if skip_corrupt:
            self._drop_corrupt()

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

    # ---------------------------------------------------------------- handles (see Archive)

    @property
    def _fh(self) -> Any:
        """This process's open archive handle, or ``None`` (for tests and diagnostics)."""
        return self._archive._fh

    @property
    def _fh_pid(self) -> int | None:
        """The pid that opened :attr:`_fh`."""
        return self._archive._fh_pid

    def close(self) -> None:
        """Close the file handles of this process (they reopen on the next access)."""
        self._archive.close()

    # ---------------------------------------------------------------- access

    def member_name(self, i: int) -> str:
        """Full name of sample ``i`` inside the archive / folder (e.g. ``cifar10/train/cat/0001.jpg``)."""
        return self._prefix + self.samples[i][0]

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of sample ``i``."""
        return self._archive.read_bytes(self.member_name(i), None if self._loc is None else self._loc[i])

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` decoded as an RGB PIL image (raises :class:`CorruptImageError`)."""
        return decode_image(self.read_bytes(i), self.member_name(i), self._archive.where)

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
