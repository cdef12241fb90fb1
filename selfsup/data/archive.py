"""Container access: the files of a directory, a ``.zip`` or a ``.tar``, read by name and locator.

An :class:`Archive` knows nothing about images or classes. It offers:

* :meth:`Archive.listing`: one pass over the container index (zip central directory, tar headers) or a
  lazy view of a directory, giving sub-folders, the files below a prefix and, for archives, one
  integer *locator* row per member (how to read it without a re-scan);
* :meth:`Archive.read_bytes`: the raw bytes of one member from its name and locator.

The three containers:

* **directory**: files are opened per read;
* **zip**: stored or deflated members are read straight from their offsets (locator
  ``(header_offset, compress_size, file_size, method, crc, flag_bits)``); other compression methods
  fall back to :mod:`zipfile`; encrypted members are refused;
* **tar**: locator ``(offset_data, size)``; a plain tar is then read with positioned reads.
  ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar.xz`` work too, but random access into a compressed
  stream is slow (a warning says so), so extract or repack them for training.

File handles are opened lazily, per process: a read in a DataLoader worker notices the pid change and
opens the worker's own handle; handles are never pickled. A member that cannot be read (truncated,
bad header, CRC mismatch) raises :class:`CorruptImageError` naming the member and the container.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["Archive", "CorruptImageError", "PathLike", "has_archive_suffix", "is_archive_file", "is_hidden"]

PathLike = Union[str, os.PathLike]

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


def is_hidden(parts: Sequence[str]) -> bool:
    """Hidden components (``.DS_Store``, ``._x.jpg``) and macOS ``__MACOSX`` folders are ignored."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def has_archive_suffix(p: Path) -> bool:
    """``p``'s name ends like a zip or tar archive (whether or not it exists)."""
    return Path(p).name.lower().endswith(_ZIP_SUFFIXES + _TAR_SUFFIXES)


def is_archive_file(p: Path) -> bool:
    """``p`` is a file whose name ends like a zip or tar archive."""
    return p.is_file() and has_archive_suffix(p)


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


# --------------------------------------------------------------------------------------------------
# Listings (construction time only; dropped once the member table is built)
# --------------------------------------------------------------------------------------------------


class _DirListing:
    """A directory, listed lazily from the file system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def subdirs(self, rel: str) -> list[str]:
        """Sorted visible sub-folders of folder ``rel`` (``""`` or ``"a/"``; empty ones included)."""
        d = self.path / rel if rel else self.path
        try:
            return sorted(e.name for e in os.scandir(d) if e.is_dir() and not is_hidden([e.name]))
        except OSError:
            return []

    def files(self, prefix: str) -> list[str]:
        """Every file below folder ``prefix`` (hidden folders pruned), named relative to it."""
        base = self.path / prefix if prefix else self.path
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = [d for d in dirnames if not is_hidden([d])]
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            out.extend(filenames if rel_dir == "." else (f"{rel_dir}/{f}" for f in filenames))
        return out

    def locators(self, names: Sequence[str]) -> None:
        """Directories need no locators: members are opened by name."""
        return None


class _IndexListing:
    """A zip / tar index: every file member (normalised name) and its locator."""

    def __init__(self, archive: Archive, locators: dict[str, tuple[int, ...]]) -> None:
        self.archive = archive
        self._locators = locators
        self.names = sorted(locators)
        # folder tree down to depth 2 (enough for "<top>/<split>/"), implied by the file names
        self._children: dict[str, set[str]] = {"": set()}
        for n in self.names:
            parts = n.split("/", 3)
            if len(parts) < 2 or is_hidden(parts[:2]):
                continue
            self._children[""].add(parts[0])
            if len(parts) >= 3:
                self._children.setdefault(parts[0] + "/", set()).add(parts[1])

    def subdirs(self, rel: str) -> list[str]:
        """Sorted visible folders holding files under ``rel`` (``""`` or ``"a/"``)."""
        return sorted(self._children.get(rel, ()))

    def files(self, prefix: str) -> list[str]:
        """Every file member below ``prefix``, named relative to it."""
        return [n[len(prefix) :] for n in self.names if n.startswith(prefix)]

    def locators(self, names: Sequence[str]) -> np.ndarray:
        """``int64 [len(names), k]`` locator rows of these (full) member names, in order."""
        rows = [self._locators[n] for n in names]
        loc = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
        if self.archive.kind == "zip" and len(rows):
            encrypted = loc[:, 5] & 0x1
            if encrypted.any():
                bad = names[int(np.flatnonzero(encrypted)[0])]
                raise ValueError(f"{self.archive.path} has encrypted members (e.g. '{bad}')")
        return loc


# --------------------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------------------


class Archive:
    """Read-only access to the files of a directory, a ``.zip`` or a ``.tar`` (see the module doc).

    Args:
        path: the directory or archive; ``FileNotFoundError`` if missing, ``ValueError`` if it is
            neither a directory nor a zip / tar (by extension, then by sniffing).

    Attributes:
        path: the expanded path. kind: ``"dir"``, ``"zip"`` or ``"tar"``.
        where: ``"folder <path>"`` / ``"zip archive <path>"`` for error messages.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"dataset path {self.path} does not exist")
        self.kind = _archive_kind(self.path)
        self.where = f"{'folder' if self.kind == 'dir' else self.kind + ' archive'} {self.path}"
        self._compression: str | None = None
        self._fh: Any = None
        self._fh_pid: int | None = None
        self._zf: zipfile.ZipFile | None = None
        self._zf_pid: int | None = None
        self._lock = threading.Lock()
        # archive spelling of member names whose normalised name differs (zipfile fallback only)
        self._raw_names: dict[str, str] = {}

    # ---------------------------------------------------------------- listing (construction only)

    def listing(self) -> _DirListing | _IndexListing:
        """List the container: ``subdirs(rel)``, ``files(prefix)`` and ``locators(names)``.

        For a zip / tar this reads the whole index once (``ValueError`` if unreadable); keep the result
        only while building a member table, it holds every member name.
        """
        if self.kind == "dir":
            return _DirListing(self.path)
        if self.kind == "zip":
            return _IndexListing(self, self._scan_zip())
        return _IndexListing(self, self._scan_tar())

    def _scan_zip(self) -> dict[str, tuple[int, ...]]:
        locators: dict[str, tuple[int, ...]] = {}
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
        return locators

    def _scan_tar(self) -> dict[str, tuple[int, ...]]:
        self._compression = _tar_compression(self.path)
        if self._compression is not None:
            warnings.warn(
                f"{self.path} is a compressed tar ({self._compression}): random access decompresses "
                f"from the start for every backward seek and is very slow; extract it or repack as "
                f"a plain .tar",
                stacklevel=4,
            )
        locators: dict[str, tuple[int, ...]] = {}
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
        return locators

    # ---------------------------------------------------------------- per-process handles

    def _handle(self) -> Any:
        """The raw file handle of this process (opened lazily; reopened after a fork)."""
        pid = os.getpid()
        if self._fh is None or self._fh_pid != pid:
            old, self._fh = self._fh, None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()  # the inherited copy: closing it here does not affect the parent
            if self._compression is not None:
                self._fh = _open_compressed(self.path, self._compression)
            else:
                self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open per process)
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
        """Close the file handles of this process (they reopen on the next read)."""
        for attr in ("_fh", "_zf"):
            h = getattr(self, attr, None)
            if h is not None:
                with contextlib.suppress(Exception):
                    h.close()
            setattr(self, attr, None)
        self._fh_pid = self._zf_pid = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fh=None, _fh_pid=None, _zf=None, _zf_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- reading

    def read_bytes(self, name: str, loc: Optional[np.ndarray] = None) -> bytes:
        """The raw bytes of member ``name`` (its full name); ``loc`` is its locator row (zip / tar).

        Raises :class:`CorruptImageError` for a truncated member, a bad zip local header or a size /
        CRC mismatch; ``OSError`` from the file system passes through.
        """
        if self.kind == "dir":
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        if loc is None:
            raise ValueError(f"reading '{name}' from {self.where} needs its locator")
        if self.kind == "tar":
            offset, size = int(loc[0]), int(loc[1])
            data = self._pread(size, offset)
            if len(data) != size:
                raise CorruptImageError(f"member '{name}' of {self.where} is truncated ({len(data)} of {size} bytes)")
            return data
        header_offset, csize, usize, method, crc = (int(v) for v in loc[:5])
        if method not in (_ZIP_STORED, _ZIP_DEFLATED):
            try:
                return self._zipfile().read(self._raw_names.get(name, name))
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise CorruptImageError(f"cannot read member '{name}' of {self.where}: {e}") from e
        header = self._pread(_ZIP_LOCAL_HEADER.size, header_offset)
        if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != _ZIP_LOCAL_MAGIC:
            raise CorruptImageError(f"bad local header for member '{name}' of {self.where}")
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
            raise CorruptImageError(f"cannot read member '{name}' of {self.where}: {e}") from e
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, kind={self.kind!r})"
