"""PNG plots of one or several runs (matplotlib, Agg canvas; pyplot and its global state are never touched).

Every figure is :data:`WIDTH` x :data:`HEIGHT` pixels. With several runs each plot overlays them (one colour per
run, the same colour in every plot); the singular-value spectra get one figure per run plus one overlay of the
latest spectrum of every run.

* ``loss-<term>.png``: each loss term (``train/<term>``) against the step;
* ``lr.png``: the learning rate;
* ``knn.png``: online kNN top-1 (solid) and top-5 (dashed), and, when ``selfsup select --by knn`` ran, its
  held-out kNN top-1 of every checkpoint (dash-dot; dotted: the diagnostic test top-1 of every checkpoint);
* ``effective_rank.png``: effective rank (left) and RankMe (right) of each embedding (backbone solid,
  projector dashed, ...), with kNN top-1 (online, and select's held-out per checkpoint) on a second axis (dotted)
  so both can be read against each other;
* ``alignment_uniformity.png``: alignment and uniformity of each embedding;
* ``spectrum-<run>.png``: singular values (log scale) at several checkpoints, one panel per embedding;
* ``spectrum-latest.png`` (several runs): the latest spectrum of each run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from selfsup.report.runs import Run

__all__ = ["DPI", "HEIGHT", "WIDTH", "make_plots", "spectrum_points"]

DPI = 100
WIDTH, HEIGHT = 1000, 450
LINESTYLES = ["-", "--", "-.", ":"]


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(
            "selfsup report needs matplotlib: pip install 'selfsup[report]' (or pip install matplotlib)"
        ) from e
    return Figure, FigureCanvasAgg


def _figure(ncols: int = 1):
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    Canvas(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _colors(runs: list[Run]) -> dict[str, Any]:
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {r.name: palette[i % len(palette)] for i, r in enumerate(runs)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _line(ax, series, label: str, color, style: str = "-", marker: Optional[str] = None) -> bool:
    if not series:
        return False
    xs, ys = zip(*series)
    ax.plot(xs, ys, style, color=color, label=label, marker=marker if marker or len(xs) > 1 else "o", markersize=4)
    return True


def _finish(ax, title: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _label(run: Run, multi: bool, what: str = "") -> str:
    return f"{run.name} {what}".strip() if multi else (what or run.name)


def embedding_names(runs: list[Run]) -> list[str]:
    """Embedding names with spectrum statistics in any run (``backbone`` and ``projector`` first)."""
    names: set[str] = set()
    for r in runs:
        for rec in r.spectrum:
            names.update(rec.get("singular_values", {}))
        names.update(k.split("/")[1] for k in r.metrics if k.startswith("spectrum/") and k.count("/") == 2)
    order = {"backbone": 0, "projector": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def spectrum_points(run: Run, max_points: int = 6) -> list[tuple[str, dict[str, Any]]]:
    """``(label, record)`` of the spectra to draw: the record at (or just before) the step of each of up to
    ``max_points`` checkpoints, evenly chosen, plus the first record; evenly spaced records when there are fewer
    than two readable checkpoints."""
    recs = run.spectrum
    if not recs:
        return []
    ckpts = [c for c in run.checkpoints if c["step"] is not None]
    chosen: dict[int, str] = {0: f"step {recs[0]['step']}" + (" (init)" if recs[0]["step"] == 0 else "")}
    if len({c["step"] for c in ckpts}) >= 2:
        distinct = {}
        for c in ckpts:
            distinct.setdefault(c["step"], c["name"])
        steps = sorted(distinct)
        picks = _evenly(steps, max_points - 1)
        for s in picks:
            # The record of step s was computed by the forward pass of the weights after s updates: those of a
            # checkpoint with global_step s.
            before = [i for i, r in enumerate(recs) if r["step"] <= s] or [0]
            i = before[-1]
            chosen.setdefault(i, f"step {recs[i]['step']} ({distinct[s]})")
    else:
        for i in _evenly(list(range(len(recs))), max_points):
            chosen.setdefault(i, f"step {recs[i]['step']}")
    return [(chosen[i], recs[i]) for i in sorted(chosen)]


def _nonzero(s: list[float], rel: float = 1e-5) -> list[float]:
    """Singular values above rounding level (``rel`` x the largest): centring ``B`` rows leaves one exact zero,
    which would only stretch the log axis."""
    top = max(s, default=0.0)
    return [x for x in s if x > rel * top] if top > 0 else []


def _spectrum_axes(ax, title: str, legend_size: int) -> None:
    """Log-scale singular values against their index k."""
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value (log)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)


def _evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else [items[-1]]


def make_plots(runs: list[Run], out_dir: Path) -> list[tuple[str, Path]]:
    """Write every plot that has data into ``out_dir``; returns ``[(title, path)]`` in display order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    multi, colors, made = len(runs) > 1, _colors(runs), []

    def add(title: str, fig, name: str) -> None:
        made.append((title, _save(fig, out_dir / name)))

    terms = sorted(
        {k for r in runs for k in r.metrics if k.startswith("train/") and k != "train/lr"},
        key=lambda k: (k != "train/loss", k),
    )
    for key in terms:
        fig, (ax,) = _figure()
        for r in runs:
            _line(ax, r.series(key), _label(r, multi), colors[r.name])
        _finish(ax, f"loss term {key}", key.split("/", 1)[1], legend=multi)
        add(f"Loss term {key}", fig, f"loss-{_slug(key.split('/', 1)[1])}.png")

    if any(r.series("train/lr") for r in runs):
        fig, (ax,) = _figure()
        for r in runs:
            _line(ax, r.series("train/lr"), _label(r, multi), colors[r.name])
        _finish(ax, "learning rate", "lr", legend=multi)
        add("Learning rate", fig, "lr.png")

    if any(r.series("knn/top1") or r.series("select/knn") for r in runs):
        fig, (ax,) = _figure()
        for r in runs:
            _line(ax, r.series("knn/top1"), _label(r, multi, "top-1"), colors[r.name], "-", "o")
            _line(ax, r.series("knn/top5"), _label(r, multi, "top-5"), colors[r.name], "--", "s")
            _line(
                ax,
                r.series("select/knn"),
                _label(r, multi, "top-1 held-out train, per checkpoint (select)"),
                colors[r.name],
                "-.",
                "^",
            )
            _line(
                ax,
                r.series("select/knn/test"),
                _label(r, multi, "top-1 test, per checkpoint (diagnostic)"),
                colors[r.name],
                ":",
                "v",
            )
        _finish(ax, "kNN accuracy", "accuracy (%)")
        add("kNN accuracy over training (online monitor; selfsup select's per-checkpoint scores)", fig, "knn.png")

    names = embedding_names(runs)
    if names:
        fig, axes = _figure(2)
        for ax, stat, title in zip(axes, ("effective_rank", "rankme"), ("effective rank", "RankMe")):
            for r in runs:
                for j, n in enumerate(names):
                    _line(
                        ax,
                        r.series(f"spectrum/{n}/{stat}"),
                        _label(r, multi, n),
                        colors[r.name],
                        LINESTYLES[j % len(LINESTYLES)],
                    )
            _finish(ax, f"{title} (view 0, one row per image)", title)
            if ax.get_legend():
                ax.legend(fontsize=8, loc="upper left")
        twin = axes[0].twinx()
        for r in runs:
            _line(twin, r.series("knn/top1"), _label(r, multi, "kNN top-1"), colors[r.name], ":", "o")
            _line(
                twin, r.series("select/knn"), _label(r, multi, "kNN top-1 held-out (select)"), colors[r.name], ":", "^"
            )
        if twin.get_legend_handles_labels()[0]:
            twin.set_ylabel("kNN top-1 (%)")
            twin.legend(fontsize=8, loc="lower right")
        else:
            twin.set_visible(False)
        add("Effective rank and RankMe over training (kNN top-1 dotted, right axis)", fig, "effective_rank.png")

        if any(r.series(f"spectrum/{n}/uniformity") for r in runs for n in names):
            fig, axes = _figure(2)
            for ax, stat in zip(axes, ("alignment", "uniformity")):
                for r in runs:
                    for j, n in enumerate(names):
                        _line(
                            ax,
                            r.series(f"spectrum/{n}/{stat}"),
                            _label(r, multi, n),
                            colors[r.name],
                            LINESTYLES[j % len(LINESTYLES)],
                        )
                _finish(ax, f"{stat} (lower is better)", stat)
            add("Alignment and uniformity over training", fig, "alignment_uniformity.png")

    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for r in runs:
        points = spectrum_points(r)
        if not points:
            continue
        fig, axes = _figure(len(names) if len(names) > 1 else 1)
        for ax, n in zip(axes, names):
            for i, (label, rec) in enumerate(points):
                s = _nonzero(rec.get("singular_values", {}).get(n, []))
                if s:
                    ax.plot(range(1, len(s) + 1), s, color=cmap(i / max(1, len(points) - 1)), label=label)
            _spectrum_axes(ax, f"{n} singular values" + (f" ({r.name})" if multi else ""), legend_size=7)
        add(f"Singular-value spectrum at several checkpoints ({r.name})", fig, f"spectrum-{_slug(r.name)}.png")

    if multi and any(r.spectrum for r in runs):
        fig, axes = _figure(len(names) if len(names) > 1 else 1)
        for ax, n in zip(axes, names):
            for r in runs:
                if r.spectrum:
                    s = _nonzero(r.spectrum[-1].get("singular_values", {}).get(n, []))
                    if s:
                        ax.plot(
                            range(1, len(s) + 1),
                            s,
                            color=colors[r.name],
                            label=f"{r.name} (step {r.spectrum[-1]['step']})",
                        )
            _spectrum_axes(ax, f"{n}: latest spectrum of each run", legend_size=8)
        add("Latest singular-value spectrum of each run", fig, "spectrum-latest.png")
    return made
