"""Evaluation results land in the run they evaluate: ``RUN_DIR/eval/<kind>-<checkpoint>[-N].json``.

A run directory is what ``selfsup pretrain`` writes (``config.json``, ``checkpoints/``, ``logs/``). Every
evaluation of a checkpoint inside one (``RUN_DIR/checkpoints/x.ckpt`` or ``RUN_DIR/x.ckpt``) writes its JSON
into ``RUN_DIR/eval/`` by default, so ``selfsup report`` and ``selfsup select`` find it. A file is never
overwritten: a repeated evaluation gets the first free counter suffix (``knn-last.json``, ``knn-last-1.json``,
...), claimed with an exclusive create, so concurrent evaluations cannot clobber each other.

* :func:`find_run_dir` -- the run directory holding a checkpoint, or ``None``.
* :func:`write_eval_result` -- write one result, return its path.
* :func:`read_eval_results` -- every result of a run, oldest first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["EVAL_DIR", "find_run_dir", "is_run_dir", "read_eval_results", "write_eval_result"]

#: Sub-directory of a run that holds evaluation results.
EVAL_DIR = "eval"

PathLike = Union[str, "os.PathLike[str]"]


def is_run_dir(path: PathLike) -> bool:
    """A directory written by ``selfsup pretrain``: it holds ``config.json``, ``checkpoints/`` or ``logs/``."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("config.json", "checkpoints", "logs", "spectrum.jsonl"))


def find_run_dir(checkpoint: PathLike) -> Optional[Path]:
    """The run directory of ``checkpoint``: ``RUN_DIR`` for ``RUN_DIR/checkpoints/x.ckpt`` and for ``RUN_DIR/x.ckpt``
    (``RUN_DIR`` being a run directory, see :func:`is_run_dir`); ``None`` for a file elsewhere (an export)."""
    p = Path(checkpoint).resolve()
    if p.parent.name == "checkpoints" and is_run_dir(p.parent.parent):
        return p.parent.parent
    if is_run_dir(p.parent):
        return p.parent
    return None


def _name(text: str) -> str:
    """``text`` made safe as part of a file name."""
    keep = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text).strip("._")
    return keep or "result"


def write_eval_result(target: PathLike, kind: str, result: dict[str, Any], name: Optional[str] = None) -> Path:
    """Write ``result`` as JSON to ``RUN_DIR/eval/<kind>-<name>[-N].json`` and return that path.

    Args:
        target: a checkpoint inside a run directory (``RUN_DIR/checkpoints/x.ckpt``; ``name`` defaults to its
            stem ``x``), or the run directory itself (``name`` then defaults to nothing: ``<kind>.json``).
        kind: what was measured: ``knn``, ``linear``, ``finetune``, ``fewshot``, ``select-knn``, ...
        result: JSON-able dict (``kind`` is added if absent).
        name: overrides the part after the kind.

    Never overwrites: the first free ``-1``, ``-2``, ... suffix is taken (exclusive create). A checkpoint that
    is not inside a run directory is a ``ValueError`` naming it (pass an explicit output path instead).
    """
    t = Path(target)
    if t.is_dir():
        if not is_run_dir(t):
            raise ValueError(f"'{t}' is not a run directory (no config.json, checkpoints/ or logs/)")
        run_dir = t
    else:
        run_dir = find_run_dir(t)
        if run_dir is None:
            raise ValueError(f"'{t}' is not inside a run directory (RUN_DIR/checkpoints/x.ckpt); give an output path")
        name = t.stem if name is None else name
    stem = _name(kind) + (f"-{_name(name)}" if name else "")
    out_dir = run_dir / EVAL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"kind": kind, **result}, indent=2, default=str)
    for n in range(10_000):
        path = out_dir / (f"{stem}.json" if n == 0 else f"{stem}-{n}.json")
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"'{out_dir}' already holds 10,000 results named {stem}*.json")


def read_eval_results(run_dir: PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, result)`` of every readable ``RUN_DIR/eval/*.json``, oldest first (a half-written or foreign
    file is skipped). ``result["kind"]`` is filled from the file name when missing."""
    d = Path(run_dir) / EVAL_DIR
    out = []
    for path in sorted(d.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if d.is_dir() else []:
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            res.setdefault("kind", path.stem.split("-")[0])
            out.append((path, res))
    return out
