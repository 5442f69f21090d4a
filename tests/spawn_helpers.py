"""Run a test worker in N spawned processes (e.g. 2 gloo ranks) and collect what each rank reports."""

from __future__ import annotations

import socket
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
