"""Recipes ship inside the package: named without a path from any directory and from a non-editable install, listed
by ``selfsup recipes``; paths keep working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from selfsup.cli import _pretrain_parser, main, recipe_paths
from selfsup.recipes import RECIPES_DIR, available_recipes, recipe_info, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def test_a_recipe_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    cfg = _pretrain_parser().parse_args(recipe_paths(["--config", "cpu-small", "--optim.lr", "0.5"]))
    assert cfg.method.class_path.endswith("MMCR") and cfg.optim.lr == 0.5
    assert recipe_paths(["--config=mae-cpu-small.yaml"]) == [f"--config={RECIPES_DIR / 'mae-cpu-small.yaml'}"]
    local = tmp_path / "cpu-small"  # an existing file of that name wins over the shipped recipe
    local.write_text((RECIPES_DIR / "simclr-cpu-small.yaml").read_text())
    assert resolve_recipe("cpu-small") == "cpu-small"


def test_paths_keep_working_and_unknown_names_are_named(capsys):
    assert Path(resolve_recipe("recipes/cpu-small.yaml")).resolve() == (RECIPES_DIR / "cpu-small.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="did you mean cpu-small"):
        resolve_recipe("cpu-smal")
    assert main(["pretrain", "--config", "no/such/recipe.yaml"]) == 1
    assert "recipe 'no/such/recipe.yaml' is neither a file nor a shipped recipe" in capsys.readouterr().err


def test_selfsup_recipes_lists_every_recipe_on_one_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == available_recipes()
    for line, name in zip(lines, available_recipes()):
        info = recipe_info(name)
        assert line.split()[1:3] == [info.method, info.dataset] and len(line) <= 160
        assert len(info.summary) > 10, f"{name}: the header's first line should say what the recipe is"
    assert main(["recipes", "--method", "MAE"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "mae-cifar10",
        "mae-cpu-small",
        "mae-imagenet",
    ]
    assert main(["recipes", "cpu-small"]) == 0
    assert "class_path: MMCR" in capsys.readouterr().out


def test_a_non_editable_install_ships_the_recipes(tmp_path):
    """Build the wheel (what `pip install .` installs) from a copy of the sources, unpack it away from the clone and
    name a recipe there."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(REPO / "selfsup", src / "selfsup", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("selfsup-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert {f"selfsup/recipes/{r}.yaml" for r in available_recipes()} <= set(names)
        zf.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import selfsup, sys; from selfsup.cli import main; "
        "assert selfsup.__file__.startswith(sys.argv[1]), selfsup.__file__; "
        "sys.exit(main(['pretrain', '--config', 'cpu-small', '--print_config']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: selfsup.methods.MMCR" in out.stdout and "projector:" in out.stdout
