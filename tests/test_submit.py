"""``selfsup submit``: the arguments it builds and refuses, and a real job through submitit's local executor that is
pre-empted after its first step, requeued by :meth:`selfsup.submit.PretrainJob.checkpoint` and resumed."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_args import BATCHED_IN_MEMORY, QUIET, TINY_MMCR

from selfsup.cli import main
from selfsup.submit import PretrainJob, SubmitOptions, SubmitParser, job_arguments

TESTS = Path(__file__).resolve().parent
WAIT_S = 300  # generous: a loaded CI machine; the job itself takes seconds

TINY = [
    *TINY_MMCR,
    *BATCHED_IN_MEMORY,
    "--data.dataset",
    "cifar10",
    "--data.batch_size",
    "16",
    "--data.subset",
    "64",  # 4 steps per epoch: the pre-emption falls in the middle of the first epoch
    "--trainer.max_steps",
    "2",
    "--trainer.save_every_n_steps",
    "1",
    *QUIET,
]


def _pretrain_args(root, out_dir) -> list[str]:
    return [*TINY, "--data.root", str(root), "--trainer.out_dir", str(out_dir)]


def _value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


# ------------------------------------------------------------------------------------- arguments and errors
def test_job_arguments_add_resources_and_resume_auto(tmp_path):
    args = _pretrain_args(tmp_path / "data.zip", tmp_path / "run")
    argv = job_arguments(args, SubmitOptions(nodes=2, gpus_per_node=4), "slurm")
    assert argv[: len(args)] == args  # the user's arguments first, unchanged
    assert _value(argv, "--trainer.accelerator") == "gpu"
    assert _value(argv, "--trainer.devices") == "4"
    assert _value(argv, "--trainer.num_nodes") == "2"
    assert _value(argv, "--trainer.strategy") == "ddp"
    assert _value(argv, "--trainer.resume") == "auto"

    cpu = job_arguments(args, SubmitOptions(gpus_per_node=0), "local")
    assert _value(cpu, "--trainer.accelerator") == "cpu" and _value(cpu, "--trainer.devices") == "1"
    assert "--trainer.strategy" not in cpu  # one process

    given = job_arguments(
        [*args, "--trainer.resume", "true", "--trainer.strategy", "fsdp"], SubmitOptions(gpus_per_node=2), "slurm"
    )
    assert _value(given, "--trainer.resume") == "true" and _value(given, "--trainer.strategy") == "fsdp"


def test_job_arguments_refuse_what_contradicts_the_job(tmp_path):
    args = _pretrain_args(tmp_path / "data.zip", tmp_path / "run")
    with pytest.raises(ValueError, match="disagree"):
        job_arguments([*args, "--trainer.devices", "2"], SubmitOptions(gpus_per_node=4), "slurm")
    with pytest.raises(ValueError, match="--nodes must be 1"):
        job_arguments(args, SubmitOptions(nodes=2, gpus_per_node=0), "local")
    with pytest.raises(ValueError, match="one process"):
        job_arguments(args, SubmitOptions(gpus_per_node=2), "local")


def test_parser_splits_at_double_dash_and_checks_both_sides(tmp_path):
    args = _pretrain_args(tmp_path / "data.zip", tmp_path / "run")
    parsed = SubmitParser().parse_args(["--nodes", "2", "--partition", "gpu", "--time_min", "90", "--", *args])
    assert (parsed.options.nodes, parsed.options.partition, parsed.options.time_min) == (2, "gpu", 90)
    assert parsed.pretrain_argv == args


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--nodez", "2", "--", "--method", "MMCR"], "--nodez"),  # an unknown submit flag
        (["--nodes", "2"], "selfsup submit [submit flags] --"),  # no `--`: the convention is named
        (["--nodes", "2", "--"], "no pretrain arguments"),
        (["--", *TINY_MMCR, "--optim.lrr", "0.1"], "--optim.lrr"),  # a pretrain typo, before anything is submitted
    ],
)
def test_bad_submit_command_is_one_line_naming_the_culprit(argv, named, capsys):
    assert main(["submit", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("selfsup submit: error:") and named in err, err


def test_missing_submitit_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    args = _pretrain_args(tmp_path / "data.zip", tmp_path / "run")
    assert main(["submit", "--executor", "local", "--gpus_per_node", "0", "--", *args]) == 1
    err = capsys.readouterr().err
    assert 'pip install -e ".[slurm]"' in err and "submitit" in err, err
    assert not (tmp_path / "run").exists()


def test_a_taken_run_directory_is_refused_without_resume(tmp_path, capsys):
    pytest.importorskip("submitit")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    args = _pretrain_args(tmp_path / "data.zip", run)
    assert main(["submit", "--executor", "local", "--gpus_per_node", "0", "--", *args]) == 1
    assert "--trainer.resume auto" in capsys.readouterr().err
    assert not (run / "submitit").exists()  # nothing submitted


# ------------------------------------------------------------------------------- pre-empted, requeued, resumed
class PauseAfterFirstStep(L.Callback):
    """First attempt only: once step 1 is checkpointed (the next batch starts), write this process's pid to
    ``ready`` and wait there for the pre-emption signal, which ends the process (submitit's handler)."""

    def __init__(self, ready: str):
        self.ready = ready

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 1 or os.path.exists(self.ready):
            return
        tmp = self.ready + ".tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, self.ready)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)  # SIGUSR2 arrives here: submitit checkpoints, requeues and exits
        raise RuntimeError(f"no pre-emption signal within {WAIT_S} s")


class GatedPretrainJob(PretrainJob):
    """:class:`PretrainJob` whose first attempt pauses after step 1 (the test's hook to pre-empt it there)."""

    def run(self, argv: list[str]) -> int:
        from selfsup.cli import run_pretrain

        gate = [PauseAfterFirstStep(str(Path(self.run_dir) / "paused.pid"))] if self.attempt == 1 else []
        run_pretrain(argv, extra_callbacks=gate)
        return 0


def _wait_for(what: str, ready, job, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if job.done() and not ready():
            pytest.fail(f"the job ended before {what}:\n{_logs(job)}")
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"no {what} within {timeout} s:\n{_logs(job)}")
        time.sleep(0.1)


def _logs(job) -> str:
    parts = []
    for p in (job.paths.stdout, job.paths.stderr):
        text = p.read_text() if p.is_file() else "(missing)"
        parts.append(f"--- {p}\n{text[-4000:]}")
    return "\n".join(parts)


@pytest.mark.timeout(600)
def test_local_job_preempted_after_a_step_is_requeued_and_resumes(tmp_path, cifar_slice, monkeypatch, capsys):
    pytest.importorskip("submitit")
    from selfsup.submit import submit

    # the job process imports this module (GatedPretrainJob) by name; one thread: a tiny model on a shared CPU
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    job = submit(
        _pretrain_args(cifar_slice, run),
        SubmitOptions(executor="local", gpus_per_node=0, time_min=60),
        job_cls=GatedPretrainJob,
    )
    printed = capsys.readouterr().out
    assert f"job {job.job_id}" in printed and str(job.paths.stdout) in printed
    assert job.paths.folder == (run / "submitit").resolve()  # the job's folder and logs beside the run

    pid_file = run / "paused.pid"
    _wait_for("pause after step 1", pid_file.is_file, job)
    assert (run / "checkpoints" / "step00000001.ckpt").is_file()
    os.kill(int(pid_file.read_text()), signal.SIGUSR2)  # the pre-emption / time-limit signal SLURM sends

    _wait_for("end of the job", job.done, job)
    result = job.result()
    logs = _logs(job)
    assert result["attempt"] == 2, logs  # checkpoint() requeued the job once
    assert "selfsup submit: attempt 1" in logs and "selfsup submit: attempt 2" in logs
    assert "Requeued job" in logs  # submitit's local requeue
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    # resumed, not restarted: the second attempt loaded step 1 (a resume config) and did not save step 1 again
    assert len(list(run.glob("config-resume-*.json"))) == 1, sorted(p.name for p in run.iterdir())
    # (epoch0000: the epoch that max_steps ends; a second save of step 1 would be step00000001-v1.ckpt)
    names = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert names == ["epoch0000.ckpt", "last.ckpt", "step00000001.ckpt", "step00000002.ckpt"], names
