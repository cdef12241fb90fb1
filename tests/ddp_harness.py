"""Spawn real CPU (gloo) process groups for tests: each rank runs ``worker(rank, port, out_dir)``, which saves
``rank{r}.pt`` (a dict; key ``error`` holds a traceback if the rank failed); the parent collects them."""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(
    worker: Callable[[int, int, str], None], world: int, out_dir: Path, timeout: float = 400
) -> list[dict[str, Any]]:
    """Run ``worker`` on ``world`` spawned ranks and return each rank's saved result, in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for r, p in enumerate(procs):
        if p.is_alive():  # a rank that saved its result and then hung tearing the group down is not a failure
            p.terminate()
            p.join()
            if not (Path(out_dir) / f"rank{r}.pt").exists():
                pytest.fail(f"DDP worker {r} timed out after {timeout} s without a result")
    results = []
    for r in range(world):
        f = Path(out_dir) / f"rank{r}.pt"
        assert f.exists(), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        res = torch.load(f, weights_only=False)
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
        results.append(res)
    return results


@contextlib.contextmanager
def gloo_rank(rank: int, port: int, world: int, out_dir: str) -> Iterator[dict[str, Any]]:
    """Inside a spawned worker: join a gloo group of ``world`` ranks and yield the result dict that is saved as
    ``rank{rank}.pt`` on exit; an exception in the block is recorded as ``error`` (the parent reports it)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        # generous: on a loaded 2-core machine one rank can lag the other by tens of seconds (imports, a descheduled
        # process); a real hang still fails, at the parent's join timeout
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        yield result
        dist.barrier()
    except Exception:  # report to the parent instead of dying silently
        result["error"] = traceback.format_exc()
    finally:
        tmp = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        tmp.rename(Path(out_dir) / f"rank{rank}.pt")  # whole or absent, never half-written
        if dist.is_initialized():
            dist.destroy_process_group()
