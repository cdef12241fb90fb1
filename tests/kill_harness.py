"""Run ``selfsup pretrain`` in a subprocess that SIGKILLs itself when training reaches a given step: a crash with no
chance to save anything, after which a resume must continue exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
    """``selfsup pretrain ARGS`` killed by SIGKILL at the start of optimiser step ``step`` (returncode -9)."""
    script = workdir / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    return subprocess.run([sys.executable, str(script), str(step), *args], capture_output=True, text=True, timeout=600)
