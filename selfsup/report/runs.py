"""Read what a pretraining run wrote, tolerating a run that is still going or was killed.

A run directory (``selfsup pretrain``'s ``trainer.out_dir``) may hold:

* ``config.json`` (and ``config-resume-*.json`` per resume): the resolved config;
* ``logs/metrics.csv`` (CSV logger): one row per logged step, sparse columns (``train/<term>``, ``train/lr``,
  ``knn/top1``, ``spectrum/<name>/<stat>``, ...); the CSV logger rewrites it when new columns appear and
  flushes every 100 steps, so a killed run can end in a half-written line;
* ``spectrum.jsonl`` (:mod:`selfsup.engine.spectrum`): a line per spectrum computation, possibly repeated
  after a resume (the later line wins) or cut short by a kill;
* ``checkpoints/*.ckpt`` (no ``last.ckpt`` yet in a running or killed run);
* ``eval/*.json`` (:mod:`selfsup.eval.results`).

:func:`load_run` reads all of it into a :class:`Run`; anything unreadable is skipped and described in
:attr:`Run.notes`, never an exception (except a path that is not a run directory at all).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from selfsup.eval.results import read_eval_results

__all__ = ["Run", "headline", "load_run", "read_metrics_csv", "read_spectrum"]

Series = list[tuple[int, float]]

#: Metrics logged at the end of an epoch. Lightning writes those at the step of the epoch's last batch (its global
#: step minus one), whereas a training-step metric of step ``s`` (loss, spectrum) and a checkpoint with
#: ``global_step`` ``s`` both describe the weights after ``s`` updates; the reader adds one to put them on that axis.
EPOCH_LEVEL_PREFIXES = ("knn/", "fewshot/")


@dataclass
class Run:
    """Everything the report shows about one run.

    Attributes:
        path: the run directory.
        name: its display name (the directory name).
        config: ``config.json`` (``{}`` if missing).
        metrics: ``key -> [(step, value)]`` from ``logs/metrics.csv``, sorted by step (the last value of a step wins).
        spectrum: ``spectrum.jsonl`` records sorted by step (one per step).
        evals: ``(path, result)`` of ``eval/*.json``.
        checkpoints: ``[{"name", "step", "epoch", "path"}]`` of ``checkpoints/*.ckpt`` by step (``None`` if unreadable).
        notes: what was missing or skipped (a killed run, a truncated line, no CSV log, ...).
    """

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)
    spectrum: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        m = self.config.get("method", {})
        return str(m.get("class_path", "?")).rsplit(".", 1)[-1] if isinstance(m, dict) else "?"

    @property
    def last_step(self) -> Optional[int]:
        steps = [s for series in self.metrics.values() for s, _ in series[-1:]]
        steps += [r["step"] for r in self.spectrum[-1:]]
        steps += [c["step"] for c in self.checkpoints if c["step"] is not None]
        return max(steps) if steps else None

    def series(self, key: str) -> Series:
        """``metrics[key]``; for ``spectrum/...`` keys the values of ``spectrum.jsonl`` when it has them; for
        ``select/<by>`` the per-checkpoint scores of the latest ``selfsup select --by <by>`` result (and
        ``select/<by>/test``: its diagnostic test scores, when computed)."""
        if key.startswith("spectrum/") and self.spectrum:
            pts = [(r["step"], r["metrics"][key]) for r in self.spectrum if key in r.get("metrics", {})]
            if pts:
                return pts
        if key.startswith("select/"):
            by, _, test = key[len("select/") :].partition("/")
            latest = [res for _, res in self.evals if res.get("kind") == f"select-{by}"]
            if not latest:
                return []
            if test:
                rows = (latest[-1].get("diagnostic_best_on_test") or {}).get("all", [])
                return sorted({int(r["step"]): float(r["test_top1"]) for r in rows}.items())
            return sorted({int(r["step"]): float(r["score"]) for r in latest[-1].get("scores", [])}.items())
        return self.metrics.get(key, [])

    def final(self, key: str) -> Optional[float]:
        s = self.series(key)
        return s[-1][1] if s else None


def read_metrics_csv(path: Path) -> tuple[dict[str, Series], list[str]]:
    """``(key -> [(step, value)], notes)`` of a Lightning CSV log; a cut-short or malformed line is skipped."""
    notes: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return {}, [f"{path.name}: unreadable ({e})"]
    lines = text.splitlines()
    if text and not text.endswith("\n") and len(lines) > 1:
        lines = lines[:-1]
        notes.append(f"{path.name}: last line cut short (the run was killed or is writing); skipped")
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows or "step" not in rows[0]:
        return {}, [*notes, f"{path.name}: no header with a 'step' column"]
    header, bad = rows[0], 0
    out: dict[str, dict[int, float]] = {}
    for row in rows[1:]:
        if len(row) != len(header):
            bad += 1
            continue
        rec = dict(zip(header, row))
        try:
            step = int(float(rec["step"]))
        except ValueError:
            bad += 1
            continue
        for key, val in rec.items():
            if key in ("step", "epoch") or val == "":
                continue
            try:
                v = float(val)
            except ValueError:
                continue
            if math.isfinite(v):
                out.setdefault(key, {})[step] = v
    if bad:
        notes.append(f"{path.name}: {bad} malformed line(s) skipped")
    if "train/loss" in out:
        out.pop("loss", None)  # the progress-bar copy of train/loss
    return {k: sorted(v.items()) for k, v in out.items()}, notes


def read_spectrum(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of ``spectrum.jsonl`` sorted by step (a repeated step keeps its later line); bad lines skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return [], [f"{path.name}: unreadable ({e})"]
    for line in lines:
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError):
            bad += 1
    notes = [f"{path.name}: {bad} unreadable line(s) skipped (a write cut short)"] if bad else []
    return [by_step[s] for s in sorted(by_step)], notes


def _checkpoints(run: Path) -> tuple[list[dict[str, Any]], list[str]]:
    out, notes = [], []
    for p in sorted((run / "checkpoints").glob("*.ckpt")):
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            out.append({"name": p.name, "step": int(ck["global_step"]), "epoch": int(ck.get("epoch", -1)), "path": p})
        except Exception as e:
            out.append({"name": p.name, "step": None, "epoch": None, "path": p})
            notes.append(f"checkpoint {p.name} unreadable ({type(e).__name__})")
    out.sort(key=lambda c: (c["step"] is None, c["step"] or 0, c["name"] == "last.ckpt", c["name"]))
    return out, notes


def _knn_from_checkpoint(ckpts: list[dict[str, Any]]) -> dict[str, Series]:
    """kNN history kept in the newest readable checkpoint (runs logged without the CSV logger)."""
    for c in reversed([c for c in ckpts if c["step"] is not None]):
        try:
            ck = torch.load(c["path"], map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            continue
        for key, state in (ck.get("callbacks") or {}).items():
            if "KNNMonitor" in str(key) and isinstance(state, dict) and state.get("history"):
                hist = state["history"]
                return {
                    "knn/top1": [(int(h["step"]), float(h["top1"])) for h in hist],
                    "knn/top5": [(int(h["step"]), float(h["top5"])) for h in hist],
                }
        return {}
    return {}


def load_run(path: str | Path) -> Run:
    """Read a run directory (see the module docstring). A missing path is a ``FileNotFoundError``; a directory
    with none of the files a run writes is a ``ValueError`` naming it."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory '{p}' does not exist")
    known = ("config.json", "logs", "spectrum.jsonl", "checkpoints")
    if not any((p / n).exists() for n in known):
        raise ValueError(f"'{p}' is not a run directory (no config.json, logs/, spectrum.jsonl or checkpoints/)")
    run = Run(path=p, name=p.resolve().name)
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            run.config = json.loads(cfg.read_text())
        except ValueError:
            run.notes.append("config.json unreadable")
    else:
        run.notes.append("no config.json")
    csv_path = p / "logs" / "metrics.csv"
    if csv_path.is_file():
        run.metrics, notes = read_metrics_csv(csv_path)
        run.notes += notes
        for key in run.metrics:  # one step axis: the number of optimiser steps the weights had taken
            if key.startswith(EPOCH_LEVEL_PREFIXES):
                run.metrics[key] = [(s + 1, v) for s, v in run.metrics[key]]
    else:
        tb = list((p / "logs").glob("events.out.tfevents*")) if (p / "logs").is_dir() else []
        run.notes.append(
            "no logs/metrics.csv"
            + (" (TensorBoard logs are not read: pretrain with --trainer.logger csv for loss plots)" if tb else "")
        )
    spec = p / "spectrum.jsonl"
    if spec.is_file():
        run.spectrum, notes = read_spectrum(spec)
        run.notes += notes
    else:
        run.notes.append("no spectrum.jsonl (monitor.spectrum_every_n_steps 0 or an older run)")
    run.checkpoints, notes = _checkpoints(p)
    run.notes += notes
    if not any(c["name"] == "last.ckpt" for c in run.checkpoints):
        run.notes.append("no checkpoints/last.ckpt: the run is still going or was stopped before its end")
    if "knn/top1" not in run.metrics:
        run.metrics.update(_knn_from_checkpoint(run.checkpoints))
    run.evals = read_eval_results(p)
    return run


#: Keys that give an evaluation result's headline number, in order of preference.
HEADLINE_KEYS = ("test_top1", "top1", "accuracy", "acc")


def headline(result: dict[str, Any]) -> Optional[float]:
    """The main number of an evaluation result (``test_top1``, else ``top1``, ...); for a ``select-*`` result the
    pick's test score."""
    if isinstance(result.get("pick"), dict):
        result = result["pick"]
    for k in HEADLINE_KEYS:
        v = result.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None
