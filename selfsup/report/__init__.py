"""Run reports: ``selfsup report RUN_DIR [RUN_DIR ...]``.

:func:`build_report` reads each run (:mod:`selfsup.report.runs`, tolerant of a run that is still going or was
killed), writes the PNG plots (:mod:`selfsup.report.plots`) and one self-contained HTML page
(:mod:`selfsup.report.html`) into the output directory: ``RUN_DIR/report/`` for one run; for several runs
(plots overlaid, one results table) ``reports/<run1>-vs-<run2>...`` unless given. The report's own files
(``report.html`` and the PNGs) are rewritten on every call (a report of a running run is refreshed); nothing
else is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from selfsup.report.runs import Run, load_run

__all__ = ["Run", "build_report", "load_run"]


def _unique_names(runs: list[Run]) -> None:
    """Give runs with the same directory name distinct names (``parent/name``), used for colours and file names."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i + 1}"


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """``RUN_DIR/report`` for one run, ``reports/<a>-vs-<b>...`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    name = "-vs-".join(Path(p).resolve().name for p in run_dirs)[:120]
    return Path("reports") / name


def build_report(
    run_dirs: Sequence[str | Path], out_dir: Optional[str | Path] = None, command: Optional[str] = None
) -> dict[str, Any]:
    """Write the report of ``run_dirs``; returns ``{"html": path, "pngs": [paths], "runs": [names], "notes": {...}}``.

    A missing run directory is a ``FileNotFoundError``, a directory that holds nothing a run writes a
    ``ValueError``, both naming it; matplotlib missing is a ``ValueError`` saying how to install it.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    _unique_names(runs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    from selfsup.report.html import build_html
    from selfsup.report.plots import make_plots

    plots = make_plots(runs, out)
    page = build_html(runs, plots, out / "report.html", commands=command)
    return {
        "html": str(page),
        "pngs": [str(p) for _, p in plots],
        "runs": [r.name for r in runs],
        "notes": {r.name: r.notes for r in runs},
    }
