"""Progress written to a log: one complete line per logging interval when stdout is not a terminal (no carriage
returns), a tqdm bar on a terminal, and the explicit settings."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from cli_args import BATCHED_IN_MEMORY, TINY_MMCR

from selfsup.engine.progress import LineProgress, progress_mode


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_mode_follows_the_setting_and_the_terminal():
    assert progress_mode("auto", _Tty()) == "bar" and progress_mode("auto", io.StringIO()) == "lines"
    assert [progress_mode(s, io.StringIO()) for s in (True, "bar", False, "none", "lines")] == [
        "bar",
        "bar",
        "none",
        "none",
        "lines",
    ]
    with pytest.raises(ValueError, match="trainer.progress_bar must be auto, bar, lines, none"):
        progress_mode("dots")
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LineProgress(0)


def test_a_run_logged_to_a_file_writes_one_line_per_interval(tmp_path, cifar_slice):
    """A real 2-epoch run (4 steps each) with stdout to a pipe: lines at steps 3 and 6 (every 3) and at the last
    step 8, each complete, with loss, lr and rate; no carriage return anywhere in the output."""
    args = [
        "pretrain",
        *TINY_MMCR,
        *BATCHED_IN_MEMORY,
        "--data.dataset",
        "folder",
        "--data.root",
        str(cifar_slice),
        "--data.subset",
        "64",
        "--data.batch_size",
        "16",
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "3",
        "--monitor.every_n_epochs",
        "0",
        "--trainer.out_dir",
        str(tmp_path / "run"),
    ]
    code = "import sys; from selfsup.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    steps = [int(re.match(r"epoch \d+ step (\d+)/8 \(\d+%\)", line).group(1)) for line in lines]
    assert steps == [3, 6, 8], lines
    assert all(re.search(r"loss -?\d+\.\d{4}  lr \S+  \d+\.\d\d steps/s  eta \d+\.\d min$", line) for line in lines)
