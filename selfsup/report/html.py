"""One self-contained HTML page: PNGs embedded as base64 ``data:`` URIs, no external resource, no server.

Sections: a results table (one row per run: steps, final loss, last kNN top-1, final effective rank, the headline
number of each kind of evaluation found in ``RUN_DIR/eval/``), the plots, then per run its notes (a killed run,
skipped lines), every evaluation result and the resolved config (a table of dotted keys and the raw JSON).

A short inline script marks ``<body data-images-loaded="N" data-images-total="M">`` once the page has loaded, so a
headless browser can check that every embedded image decodes.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any, Optional

from selfsup.report.runs import Run, headline

__all__ = ["build_html", "flatten", "results_table"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #a05a00; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(dotted.key, leaf value)]`` of a nested dict (lists kept as values)."""
    if not isinstance(d, dict):
        return [(prefix, d)]
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.extend(flatten(v, key) if isinstance(v, dict) and v else [(key, v)])
    return out


def _table(header: list[str], rows: list[list[Any]], numeric: Optional[set[int]] = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(_fmt(c))}</td>' if i in numeric else f"<td>{_e(_fmt(c))}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _eval_label(res: dict[str, Any]) -> str:
    ckpt = Path(str(res.get("checkpoint", ""))).name
    return f"{res.get('kind', '?')}" + (f" ({ckpt})" if ckpt else "")


def results_table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the one results table: a row per run, a column per kind of evaluation (its latest result)."""
    names = [n for r in runs for n in _embedding_names(r)]
    emb = "backbone" if "backbone" in names else (names[0] if names else None)
    kinds: list[str] = []
    for r in runs:
        for _, res in r.evals:
            if str(res.get("kind")) not in kinds:
                kinds.append(str(res.get("kind")))
    header = ["run", "method", "last step", "final train/loss", "last kNN top-1 (%)"]
    header += [f"final eff. rank ({emb})"] if emb else []
    header += [f"{k} (latest)" for k in kinds]
    rows = []
    for r in runs:
        row: list[Any] = [r.name, r.method, r.last_step, r.final("train/loss"), r.final("knn/top1")]
        if emb:
            row.append(r.final(f"spectrum/{emb}/effective_rank"))
        latest = {str(res.get("kind")): res for _, res in r.evals}
        for k in kinds:
            res = latest.get(k)
            if res is None:
                row.append("")
            else:
                v = headline(res)
                pick = res.get("pick", {}).get("checkpoint") if isinstance(res.get("pick"), dict) else None
                where = pick or Path(str(res.get("checkpoint", ""))).name
                row.append(f"{_fmt(v)}" + (f" [{where}]" if where else ""))
        rows.append(row)
    return header, rows


def _embedding_names(run: Run) -> list[str]:
    names: list[str] = []
    for rec in run.spectrum[-1:]:
        names += list(rec.get("singular_values", {}))
    names += [k.split("/")[1] for k in run.metrics if k.startswith("spectrum/") and k.count("/") == 2]
    return list(dict.fromkeys(names))


def _eval_section(run: Run) -> str:
    if not run.evals:
        return "<p>No evaluation results in <code>eval/</code> yet (selfsup knn / linear / select write there).</p>"
    keys = ["top1", "top5", "test_top1", "test_top5", "val_top1"]
    rows = []
    for path, res in run.evals:
        if isinstance(res.get("pick"), dict):
            p, last = res["pick"], res.get("last", {})
            summary = (
                f"pick {p.get('checkpoint')} (score {_fmt(p.get('score'))}, test {_fmt(p.get('test_top1'))}) | "
                f"last {last.get('checkpoint')} (score {_fmt(last.get('score'))}, test "
                f"{_fmt(last.get('test_top1'))})"
            )
            rows.append([path.name, _eval_label(res), summary, "", "", "", ""])
            continue
        rows.append(
            [
                path.name,
                _eval_label(res),
                "",
                *[res.get(k) for k in keys[:2]],
                res.get("test_top1"),
                res.get("val_top1"),
            ]
        )
    table = _table(
        ["file", "evaluation", "selection", "top-1", "top-5", "test top-1", "val top-1"], rows, numeric={3, 4, 5, 6}
    )
    details = "".join(
        f"<details><summary>{_e(path.name)}</summary><pre>{_e(json.dumps(res, indent=2, default=str))}</pre></details>"
        for path, res in run.evals
    )
    return table + details


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_html(runs: list[Run], plots: list[tuple[str, Path]], out_path: Path, commands: Optional[str] = None) -> Path:
    """Write the report page to ``out_path`` and return it."""
    title = "selfsup report: " + ", ".join(r.name for r in runs)
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        + (f" by <code>{_e(commands)}</code>" if commands else "")
        + ".</p>",
    ]
    header, rows = results_table(runs)
    parts += ['<h2 id="results">Results</h2>', _table(header, rows, numeric={2, 3, 4, 5})]
    parts.append('<h2 id="plots">Plots</h2>')
    if not plots:
        parts.append('<p class="note">Nothing to plot yet (no logs/metrics.csv or spectrum.jsonl with data).</p>')
    for caption, path in plots:
        parts.append(
            f'<figure><img src="{_png_data_uri(path)}" alt="{_e(caption)}" data-file="{_e(path.name)}">'
            f"<figcaption>{_e(caption)} ({_e(path.name)})</figcaption></figure>"
        )
    for r in runs:
        parts.append(f'<h2 class="run" id="run-{_e(r.name)}">Run {_e(r.name)}</h2>')
        parts.append(
            f"<p><code>{_e(r.path.resolve())}</code>; checkpoints: "
            f"{_e(', '.join(c['name'] for c in r.checkpoints) or 'none')}</p>"
        )
        if r.notes:
            parts.append("<ul>" + "".join(f'<li class="note">{_e(n)}</li>' for n in r.notes) + "</ul>")
        parts += ["<h3>Evaluation results</h3>", _eval_section(r), "<h3>Resolved config</h3>"]
        if r.config:
            parts.append(
                _table(
                    ["key", "value"],
                    [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in flatten(r.config)],
                )
            )
            parts.append(
                f"<details><summary>config.json</summary><pre>{_e(json.dumps(r.config, indent=2))}</pre></details>"
            )
        else:
            parts.append('<p class="note">no config.json</p>')
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path
