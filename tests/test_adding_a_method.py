"""docs/adding-a-method.md stays true: its files (loss, method, recipe, tests), written out of the page into a
package outside selfsup, pass their own tests, and the recipe, naming the class by its import path, pretrains through
the CLI on real images with the page's smoke command, logging the method's scalars at every step."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"
BLOCK = re.compile(r'```(?:python|yaml) title="([^"]+)"\n(.*?)```', re.S)


@pytest.fixture(scope="module")
def guide(tmp_path_factory) -> Path:
    """The page's titled code blocks written to their file names under a fresh directory."""
    root = tmp_path_factory.mktemp("guide")
    files = BLOCK.findall(DOC.read_text())
    assert {name for name, _ in files} >= {
        "my_ssl/losses.py",
        "my_ssl/method.py",
        "my_ssl-cpu-small.yaml",
        "test_my_ssl.py",
    }
    for name, text in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "my_ssl" / "__init__.py").write_text("")
    return root


def test_the_guides_own_tests_pass(guide):
    env_path = os.pathsep.join([str(guide), str(Path(__file__).resolve().parents[1])])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(guide / "test_my_ssl.py")],
        cwd=guide,
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout


def test_the_guides_smoke_command_runs_a_class_outside_the_package(guide, cifar_slice, monkeypatch, tmp_path):
    page = DOC.read_text()
    command = re.search(r"PYTHONPATH=\. selfsup (pretrain .*?)\n(?!\s)", page.replace("\\\n", " "), re.S)
    assert command, "the page's smoke command"
    args = command.group(1).split()
    args[args.index("--data.root") + 1] = str(cifar_slice)
    args[args.index("--trainer.out_dir") + 1] = str(tmp_path / "smoke")
    tiny = ["--method.init_args.backbone", "{name: resnet10, kwargs: {cifar_stem: true, width: 8}}"]
    monkeypatch.chdir(guide)  # PYTHONPATH=. in the page: the package is importable from here
    monkeypatch.syspath_prepend(str(guide))
    extra = ["--data.batch_size", "16", "--trainer.progress_bar", "false", "--monitor.every_n_epochs", "0"]
    assert main([*args, *tiny, *extra]) == 0
    with open(tmp_path / "smoke" / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # --trainer.log_every_n_steps 1: every step
    for r in rows:  # the method's own scalars, under train/<name>, and the loss is their sum
        assert float(r["train/loss"]) == pytest.approx(float(r["train/align"]) + float(r["train/spread"]), rel=1e-5)
