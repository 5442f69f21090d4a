"""A process pool that runs untrusted-input calls with a hard per-call time limit and a memory limit.

Why not ``concurrent.futures``/``multiprocessing.Pool``: neither can kill a worker stuck in one call
(``9**9**9**9`` spends minutes in C big-integer code, where no signal handler runs), and a crashed
worker breaks a ``ProcessPoolExecutor`` for good. Here each worker is a plain process with its own pipe:

- in the worker, two ``setitimer`` alarms interrupt pure-Python work with a ``BaseException`` that
  library ``except Exception`` blocks cannot swallow, and the worker survives: ``timeout_s`` of CPU time
  (ITIMER_PROF: whether a verification times out does not depend on how loaded the machine is, so
  rewards stay reproducible) and ``wall_limit_s = wall_factor * timeout_s`` of wall time (ITIMER_REAL:
  sleeping or blocked calls);
- in the parent, a worker that has not answered ``wall_limit_s + grace_s`` after its current call began
  is SIGKILLed and replaced (C-level hangs that no signal handler interrupts); a worker that dies
  (segfault, ``os._exit``, OOM kill) is replaced too; the call in flight is scored as a timeout or an
  error and the rest of its chunk re-queued. ``wall_limit_s + grace_s`` is the hard bound per call;
- ``resource.setrlimit(RLIMIT_AS)`` caps each worker's address space, so a huge allocation raises
  ``MemoryError`` inside the worker instead of exhausting the machine.

Workers start from a ``forkserver`` that has already imported the preload modules (math-verify and
sympy take ~0.3-1 s to import), so a replacement costs tens of milliseconds, not a fresh interpreter.
Calls are named by dotted path (``"pkg.module:function"``) and take picklable arguments; results come
back per call, in input order. Nothing is ever ``eval``'ed: inputs are data passed to the named function.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import types
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Optional, Sequence

__all__ = ["CallResult", "SandboxPool"]

log = logging.getLogger(__name__)


@dataclass
class CallResult:
    """status: ok | timeout | error; value: the function's return value when ok; error: a short reason."""

    status: str
    value: Any = None
    error: str = ""
    elapsed_s: float = 0.0  # seen by the parent: from the call's start in the worker to its answer


# ============================================================================================ worker side
class _Deadline(BaseException):
    """Raised by the worker's alarm; a BaseException so library code catching Exception lets it through."""


def _on_alarm(signum, frame):
    raise _Deadline()


def _resolve(path: str):
    mod_name, _, attr = path.partition(":")
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(conn, timeout_s: float, wall_limit_s: float, memory_limit_bytes: Optional[int],
                 preload: Sequence[str]) -> None:
    """Serve ``("run", fn_path, [(idx, args), ...])`` messages; answer each call with
    ``(idx, status, value, error)`` as soon as it finishes (the parent uses these as heartbeats)."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    for mod in preload:
        importlib.import_module(mod)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGPROF, _on_alarm)
    conn.send(("ready", os.getpid()))
    fns: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except _Deadline:  # a timer signal that was already pending when the call ended: ignore
            continue
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, fn_path, items = msg
        for idx, args in items:
            status, value, err = "ok", None, ""
            try:
                try:
                    fn = fns.get(fn_path) or fns.setdefault(fn_path, _resolve(fn_path))
                    signal.setitimer(signal.ITIMER_PROF, timeout_s)
                    signal.setitimer(signal.ITIMER_REAL, wall_limit_s)
                    value = fn(*args)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.setitimer(signal.ITIMER_PROF, 0)
            except _Deadline:
                status, value = "timeout", None
            except MemoryError:
                status, value, err = "error", None, "memory limit"
            except Exception as exc:  # the call failed; the worker goes on
                status, value, err = "error", None, f"{type(exc).__name__}: {str(exc)[:200]}"
            try:
                conn.send((idx, status, value, err))
            except _Deadline:  # alarm raced the reset: send again
                conn.send((idx, status, value, err))
            except Exception as exc:  # unpicklable return value
                conn.send((idx, "error", None, f"result not sendable: {type(exc).__name__}"))


# ============================================================================================ parent side
_MAIN_SWAP_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_main_module():
    """Start children without re-importing the parent's ``__main__``.

    spawn/forkserver children normally re-import the parent's main script (as ``__mp_main__``). For a
    trainer script that imports torch this costs seconds per worker start and ~600 MB of address space,
    which would count against the worker's RLIMIT_AS. The workers need nothing from it, so while a
    worker starts, ``__main__`` is briefly replaced by an empty module (no ``__file__``/``__spec__``,
    hence nothing to re-import)."""
    with _MAIN_SWAP_LOCK:
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if saved is not None:
                sys.modules["__main__"] = saved


class _Worker:
    def __init__(self, ctx, timeout_s, wall_limit_s, mem_bytes, preload):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main,
                                args=(child, timeout_s, wall_limit_s, mem_bytes, tuple(preload)),
                                daemon=True, name="megatron-amir-reward-worker")
        with _without_main_module():
            self.proc.start()
        child.close()
        self.ready = False
        self.pending: deque[int] = deque()  # call indices sent and not yet answered, in order
        self.started_at = time.monotonic()  # when the call at pending[0] began (or the process)

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(timeout=5)
        except (OSError, ValueError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass


class SandboxPool:
    """``num_workers`` killable worker processes. ``map(fn_path, args_list)`` -> list[CallResult].

    timeout_s: per-call CPU-time limit (the worker's alarm); wall_factor: the per-call wall-clock limit is
    ``wall_factor * timeout_s`` (also an alarm in the worker); grace_s: extra wall time after that before
    the parent SIGKILLs a worker that does not answer (hangs in C code); memory_limit_mb: RLIMIT_AS per worker (None = off);
    preload: modules imported in the forkserver and in each worker before serving; chunk_size: calls
    sent per message (fewer pipe round trips; a killed worker's unfinished calls are re-queued).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, memory_limit_mb: Optional[int] = 1024,
                 preload: Sequence[str] = (), grace_s: float = 0.5, chunk_size: int = 16, wall_factor: float = 2.0,
                 start_method: Optional[str] = None, startup_timeout_s: float = 60.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if wall_factor < 1:
            raise ValueError(f"wall_factor must be >= 1, got {wall_factor}")
        self.num_workers, self.timeout_s, self.grace_s = num_workers, float(timeout_s), float(grace_s)
        self.wall_limit_s = float(timeout_s) * float(wall_factor)
        self.hard_limit_s = self.wall_limit_s + self.grace_s  # the parent kills a worker past this
        self.mem_bytes = int(memory_limit_mb) * 1024 * 1024 if memory_limit_mb else None
        self.preload, self.chunk_size, self.startup_timeout_s = tuple(preload), max(1, chunk_size), startup_timeout_s
        method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        self._ctx = mp.get_context(method)
        if method == "forkserver" and self.preload:
            # import heavy modules once in the fork server; replacement workers then start fast.
            # (set before the fork server starts; harmless if another user started it already)
            self._ctx.set_forkserver_preload(list(self.preload))
        self.restarts = 0
        self._workers: list[_Worker] = [self._spawn() for _ in range(num_workers)]
        self._closed = False

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.timeout_s, self.wall_limit_s, self.mem_bytes, self.preload)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = self._spawn()
        self.restarts += 1

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def map(self, fn_path: str, args_list: Sequence[tuple]) -> list[CallResult]:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        n = len(args_list)
        results: list[Optional[CallResult]] = [None] * n
        queue: deque[int] = deque(range(n))
        done = 0
        while done < n:
            now = time.monotonic()
            # hand chunks to idle, ready workers (chunks shrink near the end so workers finish together)
            for w in self._workers:
                if w.ready and not w.pending and queue:
                    size = min(self.chunk_size, max(1, -(-len(queue) // self.num_workers)))
                    idxs = [queue.popleft() for _ in range(min(size, len(queue)))]
                    try:
                        w.conn.send(("run", fn_path, [(i, args_list[i]) for i in idxs]))
                    except (OSError, ValueError):  # the worker died between calls: re-queue and replace
                        queue.extendleft(reversed(idxs))
                        self._replace(self._workers.index(w))
                        continue
                    w.pending.extend(idxs)
                    w.started_at = now
            # wait for an answer or for the earliest deadline
            deadlines = []
            for w in self._workers:
                if w.pending:
                    deadlines.append(w.started_at + self.hard_limit_s)
                elif not w.ready:
                    deadlines.append(w.started_at + self.startup_timeout_s)
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.05
            ready_conns = wait([w.conn for w in self._workers], timeout=wait_s)
            for i, w in enumerate(list(self._workers)):
                if w.conn not in ready_conns:
                    continue
                try:
                    while w.conn.poll():
                        msg = w.conn.recv()
                        if msg[0] == "ready":
                            w.ready = True
                            w.started_at = time.monotonic()
                            continue
                        idx, status, value, err = msg
                        if w.pending and w.pending[0] == idx:
                            w.pending.popleft()
                            t = time.monotonic()
                            results[idx] = CallResult(status, value, err, t - w.started_at)
                            done += 1
                            w.started_at = t
                except (EOFError, OSError):  # crashed: the call in flight is an error, the rest re-queued
                    code = w.proc.exitcode if not w.proc.is_alive() else None
                    if w.pending:
                        idx = w.pending.popleft()
                        results[idx] = CallResult("error", None, f"worker died (exit code {code})",
                                                  time.monotonic() - w.started_at)
                        done += 1
                        queue.extendleft(reversed(w.pending))
                    elif not w.ready:
                        raise RuntimeError(f"reward worker failed to start (exit code {code}); "
                                           f"check that preload modules {self.preload} import") from None
                    self._replace(i)
            # kill workers past their deadline (stuck in C code, ignoring the alarm)
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.pending and now > w.started_at + self.hard_limit_s:
                    idx = w.pending.popleft()
                    results[idx] = CallResult("timeout", None, "killed after hard limit", now - w.started_at)
                    done += 1
                    queue.extendleft(reversed(w.pending))
                    log.warning("reward worker %d hung past %.1fs; killed and replaced", w.proc.pid,
                                self.hard_limit_s)
                    self._replace(i)
                elif not w.ready and not w.pending and now > w.started_at + self.startup_timeout_s:
                    raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s}s")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
