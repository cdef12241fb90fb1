"""``selfsup submit``: a pretraining run as a submitit job (SLURM, or the local executor), requeued when pre-empted.

``selfsup submit [submit flags] -- <pretrain arguments>``: everything after ``--`` is what ``selfsup pretrain``
takes, parsed (and checked) before anything is submitted; an unknown submit flag is an error.

* The job runs ``selfsup pretrain <arguments> --trainer.resume auto`` (``auto`` is added unless the arguments or
  the recipe set ``trainer.resume``): a first attempt starts the run, a requeued one continues it from its newest
  checkpoint (``last.ckpt``, or a step checkpoint with ``--trainer.save_every_n_steps``; Lightning's SLURM
  pre-emption checkpoint ``hpc_ckpt_*.ckpt`` too).
* Pre-emption and the time limit: SLURM (or the local executor) sends ``SIGUSR2`` ``--signal_delay_s`` before the
  end; submitit calls :meth:`PretrainJob.checkpoint`, which resubmits the same job, and requeues it. Work since
  the last checkpoint is redone: ``--trainer.save_every_n_steps`` bounds it. A job that reaches its time limit is
  requeued at most ``--max_num_timeout`` times (pre-emptions do not count).
* Resources: ``--nodes N --gpus_per_node G`` make ``N`` x ``G`` tasks (one per GPU; Lightning reads the ranks from
  SLURM), and the pretrain arguments get ``--trainer.accelerator gpu --trainer.devices G --trainer.num_nodes N``
  (``cpu`` and 1 device with ``G = 0``) and ``--trainer.strategy ddp`` when there is more than one process, each
  unless given on the command line; given ones must agree with the resources.
* The job's folder (submitit's pickles and logs) is ``<trainer.out_dir>/submitit``, beside the run, with
  ``trainer.out_dir`` as the pretrain arguments (and recipe) resolve it; ``--job_dir`` puts it elsewhere.

submitit is the ``slurm`` extra (``pip install -e ".[slurm]"``); this module imports it only when submitting.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

#: The convention, shown in ``selfsup submit --help`` and in errors.
USAGE = "selfsup submit [submit flags] -- <selfsup pretrain arguments>"
MISSING_SUBMITIT = 'selfsup submit needs submitit, the slurm extra: pip install -e ".[slurm]" (or pip install submitit)'


def require_submitit():
    """The ``submitit`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError(MISSING_SUBMITIT) from e
    return submitit


def _given(argv: list[str], flag: str) -> bool:
    """Whether ``--flag`` is on the command line (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


class PretrainJob:
    """The submitted callable: ``selfsup pretrain <argv>`` in the job, requeued with its state on pre-emption.

    Picklable (submitit pickles it into the job folder); :meth:`checkpoint` is what submitit calls on the
    pre-emption / time-limit signal: it returns the same job (one more attempt) to be requeued, which resumes the
    run through ``--trainer.resume auto``.
    """

    def __init__(self, argv: list[str], run_dir: str):
        self.argv = list(argv)
        self.run_dir = run_dir
        self.attempt = 1

    def __call__(self) -> dict:
        env = require_submitit().JobEnvironment()
        print(
            f"selfsup submit: attempt {self.attempt} of job {env.job_id} (rank {env.global_rank} of {env.num_tasks}): "
            f"selfsup pretrain {shlex.join(self.argv)}",
            flush=True,
        )
        rc = self.run(self.argv)
        if rc:
            raise RuntimeError(f"selfsup pretrain exited with status {rc}; its error is in this job's stderr log")
        last = Path(self.run_dir) / "checkpoints" / "last.ckpt"
        return {
            "run_dir": self.run_dir,
            "last_checkpoint": str(last) if last.is_file() else None,
            "attempt": self.attempt,
        }

    def run(self, argv: list[str]) -> int:
        """Run ``selfsup pretrain`` in this process; its exit status."""
        from selfsup.cli import main

        return main(["pretrain", *argv])

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on pre-emption / time-out: requeue this job; the next attempt resumes the run."""
        submitit = require_submitit()
        self.attempt += 1
        print(f"selfsup submit: pre-empted or timed out; requeued as attempt {self.attempt}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class SubmitOptions:
    """What ``selfsup submit`` asks the scheduler for (the flags before ``--``)."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    partition: Optional[str] = None
    time_min: int = 1440
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    job_name: Optional[str] = None
    job_dir: Optional[str] = None
    executor: Literal["auto", "slurm", "local"] = "auto"
    signal_delay_s: int = 120
    max_num_timeout: int = 10
    setup: list[str] = field(default_factory=list)
    slurm_parameters: dict = field(default_factory=dict)
    wait: bool = False


def _flags_parser():
    from jsonargparse import ArgumentParser

    p = ArgumentParser(
        prog="selfsup submit",
        description=f"Submit `selfsup pretrain` as a submitit job, requeued and resumed when pre-empted. Usage: "
        f"{USAGE}. The pretrain arguments come after `--`; `--trainer.resume auto` is added unless given. "
        "The job's folder and logs go to <trainer.out_dir>/submitit. Needs the slurm extra (submitit).",
        exit_on_error=False,
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument(
        "--gpus_per_node",
        type=int,
        default=1,
        help="GPUs per node, one task each (0: a CPU job, one task per node)",
    )
    p.add_argument("--cpus_per_task", type=Optional[int], default=None, help="default: the cluster's")
    p.add_argument("--mem_gb", type=Optional[int], default=None, help="memory per node (default: the cluster's)")
    p.add_argument("--partition", type=Optional[str], default=None, help="SLURM partition")
    p.add_argument("--time_min", type=int, default=1440, help="time limit of one attempt, in minutes")
    p.add_argument("--account", type=Optional[str], default=None, help="SLURM account")
    p.add_argument("--qos", type=Optional[str], default=None, help="SLURM quality of service")
    p.add_argument("--constraint", type=Optional[str], default=None, help="SLURM node constraint")
    p.add_argument("--job_name", type=Optional[str], default=None, help="default: selfsup-<run directory name>")
    p.add_argument(
        "--job_dir", type=Optional[str], default=None, help="submitit's folder and logs; default <out_dir>/submitit"
    )
    p.add_argument(
        "--executor",
        type=Literal["auto", "slurm", "local"],
        default="auto",
        help="slurm (sbatch), local (submitit's LocalExecutor: this machine), auto (slurm where sbatch is found)",
    )
    p.add_argument("--signal_delay_s", type=int, default=120, help="SIGUSR2 this long before the time limit (requeue)")
    p.add_argument(
        "--max_num_timeout", type=int, default=10, help="requeues after reaching the time limit (pre-emptions: any)"
    )
    p.add_argument(
        "--setup", type=list[str], default=[], help="shell lines run before the job (module load, source venv)"
    )
    p.add_argument(
        "--slurm_parameters",
        type=dict,
        default={},
        help="further sbatch options, e.g. '{exclude: node12, mail_type: END}' (submitit's additional_parameters)",
    )
    p.add_argument("--wait", type=bool, default=False, help="wait for the job to finish and print its result")
    return p


@dataclass
class ParsedSubmit:
    options: SubmitOptions
    pretrain_argv: list[str]


class SubmitParser:
    """``selfsup submit``'s parser: the submit flags before ``--`` (jsonargparse, unknown flags rejected) and the
    pretrain arguments after it (parsed by ``selfsup pretrain``'s parser, not run)."""

    def __init__(self):
        self.flags = _flags_parser()

    def parse_args(self, argv: list[str]) -> ParsedSubmit:
        argv = list(argv)
        if "--" not in argv:
            if any(a in ("-h", "--help") for a in argv):
                self.flags.parse_args(["--help"])  # prints the help and exits
            raise ValueError(f"no pretrain arguments: {USAGE}")
        cut = argv.index("--")
        flags, pretrain_argv = argv[:cut], argv[cut + 1 :]
        cfg = self.flags.parse_args(flags)
        if not pretrain_argv:
            raise ValueError(f"no pretrain arguments after `--`: {USAGE}")
        options = SubmitOptions(**{k: cfg[k] for k in SubmitOptions.__dataclass_fields__})
        pretrain_config(pretrain_argv)  # a wrong pretrain argument is named now, not in the queue
        return ParsedSubmit(options, pretrain_argv)


def pretrain_config(argv: list[str]):
    """``selfsup pretrain``'s parsed config of ``argv`` (recipes resolved; nothing is built or run)."""
    from selfsup.cli import _pretrain_parser, recipe_paths

    return _pretrain_parser().parse_args(recipe_paths(argv))


def job_arguments(pretrain_argv: list[str], options: SubmitOptions, executor: str) -> list[str]:
    """The pretrain arguments the job runs: the user's, then the trainer resources and ``--trainer.resume auto``
    where not given. Raises ``ValueError`` when given ones contradict the requested resources."""
    if options.nodes < 1 or options.gpus_per_node < 0:
        raise ValueError(
            f"--nodes must be >= 1 and --gpus_per_node >= 0 (got {options.nodes}, {options.gpus_per_node})"
        )
    if executor == "local" and options.nodes != 1:
        raise ValueError(f"--executor local runs on this machine: --nodes must be 1 (got {options.nodes})")
    if executor == "local" and options.gpus_per_node > 1:
        raise ValueError(
            f"--executor local runs one process: --gpus_per_node 0 or 1 (got {options.gpus_per_node}); "
            "for several GPUs of this machine run selfsup pretrain itself"
        )
    if executor == "local" and options.gpus_per_node:
        import torch

        if torch.cuda.device_count() < options.gpus_per_node:
            raise ValueError(
                f"--executor local: this machine has {torch.cuda.device_count()} GPU(s), --gpus_per_node asks for "
                f"{options.gpus_per_node}; --gpus_per_node 0 runs on the CPU"
            )
    devices = max(options.gpus_per_node, 1)
    wanted = {
        "--trainer.accelerator": "gpu" if options.gpus_per_node else "cpu",
        "--trainer.devices": str(devices),
        "--trainer.num_nodes": str(options.nodes),
    }
    if options.nodes * devices > 1:
        wanted["--trainer.strategy"] = "ddp"
    argv = list(pretrain_argv)
    for flag, value in wanted.items():
        if not _given(argv, flag):
            argv += [flag, value]
    cfg = pretrain_config(argv)
    if cfg.trainer.resume is False and not _given(argv, "--trainer.resume"):
        argv += ["--trainer.resume", "auto"]
    # one task per device: Lightning's world must be the job's (SLURM's; one process with the local executor)
    if str(cfg.trainer.devices) != str(devices) or cfg.trainer.num_nodes != options.nodes:
        raise ValueError(
            f"--trainer.devices {cfg.trainer.devices} --trainer.num_nodes {cfg.trainer.num_nodes} disagree with "
            f"the job's {options.nodes} node(s) x {devices} task(s) (--nodes, --gpus_per_node); drop them or "
            "make them agree"
        )
    return argv


def _resolve_executor(name: str) -> str:
    if name == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if name == "slurm" and not shutil.which("sbatch"):
        raise ValueError(
            "--executor slurm: sbatch is not found here (not a SLURM login node); --executor local runs here"
        )
    return name


def submit(pretrain_argv: list[str], options: Optional[SubmitOptions] = None, job_cls: type = PretrainJob, **kwargs):
    """Submit ``selfsup pretrain <pretrain_argv>``; returns the submitit job.

    ``options`` (or its fields as keyword arguments: ``nodes``, ``gpus_per_node``, ``time_min``, ``partition``, ...)
    says what to ask for; ``job_cls`` is the callable submitted (a :class:`PretrainJob` subclass). Prints the job id,
    the run directory and the log paths.
    """
    options = options or SubmitOptions(**kwargs)
    submitit = require_submitit()
    executor_name = _resolve_executor(options.executor)
    given = pretrain_config(pretrain_argv).trainer
    out_dir = Path(given.out_dir)
    argv = job_arguments(pretrain_argv, options, executor_name)
    from selfsup.engine.checkpoint import existing_checkpoints

    if given.resume is False and existing_checkpoints(out_dir):
        raise FileExistsError(
            f"run directory '{out_dir}' already holds checkpoints: pass --trainer.resume auto (or true) to continue "
            "that run, or choose another --trainer.out_dir. Nothing was submitted."
        )
    job_dir = Path(options.job_dir) if options.job_dir else out_dir / "submitit"
    name = options.job_name or f"selfsup-{out_dir.resolve().name}"
    devices = max(options.gpus_per_node, 1)
    if executor_name == "local":
        ignored = [
            f for f in ("partition", "account", "qos", "constraint", "mem_gb", "cpus_per_task") if getattr(options, f)
        ]
        if ignored or options.slurm_parameters:
            print(
                f"selfsup submit: the local executor ignores {', '.join(ignored + ['slurm_parameters'] * bool(options.slurm_parameters))}",
                file=sys.stderr,
            )
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=options.max_num_timeout)
        executor.update_parameters(
            timeout_min=options.time_min,
            tasks_per_node=1,
            gpus_per_node=options.gpus_per_node,
            signal_delay_s=options.signal_delay_s,
            setup=list(options.setup),
        )
    else:
        executor = submitit.AutoExecutor(folder=job_dir, cluster="slurm", slurm_max_num_timeout=options.max_num_timeout)
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": options.time_min,
            "nodes": options.nodes,
            "tasks_per_node": devices,
            "cpus_per_task": options.cpus_per_task,
            "mem_gb": options.mem_gb,
            "slurm_partition": options.partition,
            "slurm_account": options.account,
            "slurm_qos": options.qos,
            "slurm_constraint": options.constraint,
            "slurm_signal_delay_s": options.signal_delay_s,
        }
        if options.gpus_per_node:
            params["gpus_per_node"] = options.gpus_per_node
        if options.setup:
            params["slurm_setup"] = list(options.setup)
        if options.slurm_parameters:
            params["slurm_additional_parameters"] = dict(options.slurm_parameters)
        executor.update_parameters(**params)
    job = executor.submit(job_cls(argv, str(out_dir)))
    print(f"selfsup submit: job {job.job_id} ({executor_name}) submitted: selfsup pretrain {shlex.join(argv)}")
    print(f"  run directory: {out_dir}")
    print(f"  job folder:    {job_dir}")
    print(f"  stdout:        {job.paths.stdout}")
    print(f"  stderr:        {job.paths.stderr}")
    return job
