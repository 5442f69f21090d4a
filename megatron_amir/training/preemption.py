"""Preemption: turn SIGUSR1 / SIGTERM into "finish this step, checkpoint, exit for requeue".

The flow on a Slurm cluster (slurm/*.sbatch, docs/slurm.md):

1. Slurm sends ``SIGUSR1`` to the batch shell ``--signal=B:USR1@180`` seconds before the time limit (or an
   operator runs ``scancel --signal=USR1 --batch JOBID``); the script forwards it to ``srun``, which forwards
   it to every task. ``SIGTERM`` (scancel, node shutdown, preemption by a higher-priority job) is handled
   the same way, with less time left.
2. The handler only sets a flag: signal handlers run between bytecodes, and doing real work (I/O,
   collectives) inside one can deadlock.
3. The trainer polls :func:`should_stop` between optimizer steps. It all-reduces the flag (MAX) across ranks,
   so all ranks agree to stop after the *same* step even when the signal reached them at different moments
   -- otherwise one rank would enter the checkpoint collective while another starts the next step's.
4. The trainer checkpoints, calls :func:`exit_for_requeue` (a barrier, so no rank leaves while another still
   writes its shard), which exits with :data:`REQUEUE_EXIT_CODE`; srun reports 75 when every rank exits
   with it, and the script runs ``scontrol requeue $SLURM_JOB_ID``.
5. The requeued job starts the same script again, and the trainer resumes from the latest good checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable, Optional

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- the sbatch scripts requeue on it
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Installs handlers that set a flag; restores the previous handlers on ``uninstall()``."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ install
    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("preemption handlers can only be installed from the main thread (Python signals)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, _frame) -> None:
        first = not self._event.is_set()
        if not first and signum == signal.SIGINT and self.received == signal.SIGINT:
            # a second Ctrl-C means "now": a step stuck in I/O or a collective must not hold the user hostage
            os.write(2, b"[preemption] second SIGINT: stopping now, without a checkpoint\n")
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()
        if first:  # os.write: no locks taken (the logging module may hold one we interrupted)
            name = signal.Signals(signum).name
            hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            os.write(2, f"[preemption] received {name}: stopping after the current step{hint}\n".encode())

    # ------------------------------------------------------------------ query
    @property
    def requested(self) -> bool:
        """This process got a signal (no communication)."""
        return self._event.is_set()

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Set the flag by hand (tests; a trainer that decides to stop early for requeue)."""
        self.received = signum
        self._event.set()

    def reset(self) -> None:
        self._event.clear()
        self.received = None

    def should_stop(self, group=None) -> bool:
        """True on every rank when any rank of ``group`` (default: the world) got a signal.

        Collective when torch.distributed is initialized with more than one rank: every rank of the group
        must call it at the same point (between steps). A single process just reads its flag.
        """
        flag = self.requested
        try:
            import torch.distributed as dist
        except ImportError:  # torch is a project dependency; keep the helper usable without it
            return flag
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return flag
        import torch

        device = "cpu"
        if dist.get_backend(group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())


_HANDLER: Optional[PreemptionHandler] = None


def install_handlers(signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionHandler:
    """Install (once per process) the flag-setting handlers for ``signals``; returns the handler."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = PreemptionHandler(signals).install()
    return _HANDLER


def uninstall_handlers() -> None:
    global _HANDLER
    if _HANDLER is not None:
        _HANDLER.uninstall()
        _HANDLER = None


def preemption_requested() -> bool:
    """This process got a preemption signal (False when no handler is installed)."""
    return _HANDLER is not None and _HANDLER.requested


def should_stop(group=None) -> bool:
    """Collective: some rank got a preemption signal. See :meth:`PreemptionHandler.should_stop`."""
    if _HANDLER is None:
        raise RuntimeError("call install_handlers() before polling should_stop()")
    return _HANDLER.should_stop(group)


def exit_for_requeue(group=None) -> None:
    """After the checkpoint: wait for every rank (so none is killed mid-write), then exit with 75."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=group)
    except ImportError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(REQUEUE_EXIT_CODE)
