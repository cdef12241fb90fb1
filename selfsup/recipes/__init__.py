"""The recipes shipped with the package: one YAML per experiment (``selfsup/recipes/<name>.yaml``).

``selfsup pretrain --config cpu-small`` names a recipe without a path, from any directory and any install (an
existing file of that name wins); ``selfsup recipes`` lists them. In a clone, ``recipes/`` at the top links here,
so ``--config recipes/cpu-small.yaml`` works as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

__all__ = ["RECIPES_DIR", "RecipeInfo", "available_recipes", "recipe_info", "resolve_recipe"]

#: Where the shipped recipes lie (inside the installed package).
RECIPES_DIR = Path(__file__).resolve().parent


def available_recipes() -> list[str]:
    """The names of the shipped recipes (file stems), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name: str) -> str:
    """The path of ``name``: an existing file as given, else the shipped recipe ``name`` (with or without
    ``.yaml``). Raises ``FileNotFoundError`` naming the closest shipped recipes when neither exists."""
    if Path(name).is_file():
        return name
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    shipped = RECIPES_DIR / f"{stem}.yaml"
    if "/" not in stem and shipped.is_file():
        return str(shipped)
    import difflib

    close = difflib.get_close_matches(Path(stem).name, available_recipes(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `selfsup recipes` lists the shipped recipes"
    raise FileNotFoundError(f"recipe '{name}' is neither a file nor a shipped recipe{hint}")


@dataclass(frozen=True)
class RecipeInfo:
    """What ``selfsup recipes`` shows of a recipe."""

    name: str
    method: str
    dataset: str
    backbone: str
    summary: str
    path: str


def _summary(name: str, text: str) -> str:
    """The header's first sentence, without a leading ``<name>:``."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("selfsup ") or not body:
            break
        lines.append(body)
    head = " ".join(lines)
    head = re.sub(rf"^{re.escape(name)}(\.yaml)?:\s*", "", head)
    cut = re.search(r"(?<=[a-z0-9)])\.(\s|$)|;", head)
    return (head[: cut.start()] if cut else head).strip()


def recipe_info(name: str) -> RecipeInfo:
    """Method, dataset, backbone and one-line summary of a shipped recipe (read from its YAML and header)."""
    path = RECIPES_DIR / f"{name}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text) or {}
    method = cfg.get("method", {}) or {}
    init = method.get("init_args", {}) or {}
    backbone: Optional[dict] = init.get("backbone")
    if isinstance(backbone, dict):
        bb = str(backbone.get("name", "?"))
    else:
        bb = str(backbone or "default")
    return RecipeInfo(
        name=name,
        method=str(method.get("class_path", "?")).rsplit(".", 1)[-1],
        dataset=str((cfg.get("data") or {}).get("dataset", "?")),
        backbone=bb,
        summary=_summary(name, text),
        path=str(path),
    )
