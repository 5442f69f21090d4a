"""Run a test worker in N spawned processes (e.g. 2 gloo ranks) and collect what each rank reports, or under
torchrun (``torchrun_worker``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[..., None], world: int, *args: Any, timeout: float = 180) -> dict[int, Any]:
    """Start ``worker(rank, world, port, queue, *args)`` in ``world`` spawned processes; each must put
    ``(rank, result)`` on the queue once. Returns {rank: result} after every process exited with 0."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank {procs.index(p)} exited with {p.exitcode}"
    return out


def torchrun_worker(worker: Path, nproc: int, *args: str, timeout: float = 600) -> None:
    """``torchrun --standalone --nproc-per-node=nproc worker args`` with the repository on PYTHONPATH; raises with
    the tail of its output when it fails."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(worker), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
