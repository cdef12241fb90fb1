"""Run ``selfsup pretrain`` in a subprocess that SIGKILLs itself when training reaches a given step: a crash with no
chance to save anything, after which a resume must continue exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KILLER = """
import os, signal, sys
import lightning as L
from selfsup.cli import run_pretrain

STEP = int(sys.argv[1])

class KillAtStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == STEP:
            os.kill(os.getpid(), signal.SIGKILL)

run_pretrain(sys.argv[2:], extra_callbacks=[KillAtStep()])
"""


def pretrain_killed_at(step: int, args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """``selfsup pretrain ARGS`` killed by SIGKILL at the start of optimiser step ``step`` (returncode -9), run from
    the repository root (recipes given by relative path) with this checkout first on the import path."""
    script = workdir / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script), str(step), *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )
