"""Run the vLLM project's Rust router (``vllm-router``, PyPI) in front of the rollout servers.

We do not balance load ourselves: the router brings its policies (round_robin, power_of_two,
cache_aware, random, ...), health checks, retries and circuit breaker. This module starts and stops the
binary, waits until it is ready, and keeps its worker set equal to a discovery file (one URL per line,
written by fleet jobs, e.g. ``megatron-amir serve --register FILE``) through the router's
``/add_worker`` and ``/remove_worker`` routes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

import httpx

from megatron_amir.fileio import atomic_write_text

log = logging.getLogger("megatron_amir.rollout.router")
POLICIES = ("round_robin", "power_of_two", "cache_aware", "random", "consistent_hash")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the router binary needs a number; a small race is possible)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def router_binary() -> str:
    """Path of ``vllm-router``: next to this Python (the venv) first, then $PATH."""
    cand = Path(sys.executable).parent / "vllm-router"
    if cand.exists():
        return str(cand)
    found = shutil.which("vllm-router")
    if not found:
        raise FileNotFoundError("vllm-router not found: pip install vllm-router (a dependency of megatron-amir)")
    return found


def read_discovery_file(path: str | Path, bad: Optional[list[str]] = None) -> list[str]:
    """URLs listed in a discovery file: one per line, '#' comments and blanks ignored, order kept, deduped.

    A line that is not an http(s) URL raises ValueError naming the file and line, unless ``bad`` is given:
    then it is appended there as ``"file:line: text"`` and skipped (the watcher's mode: one garbled line, e.g.
    a half-written append from a crashed member, must not hide every other member)."""
    p = Path(path)
    if not p.exists():
        return []
    out: list[str] = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        if not _is_http_url(url):
            msg = f"{path}:{i}: {url!r} is not an http(s) URL"
            if bad is None:
                raise ValueError(msg)
            bad.append(msg)
            continue
        url = url.rstrip("/")
        if url not in out:
            out.append(url)
    return out


@contextlib.contextmanager
def _discovery_lock(path: Path):
    """Exclusive ``flock`` on ``<file>.lock``: every writer of a discovery file takes it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _edit_discovery_file(path: str | os.PathLike, edit: Callable[[list[str]], list[str]]) -> None:
    """Read, edit and atomically replace (temp + rename) the file under the writers' lock, so readers never see
    a torn file and concurrent writers never lose each other's lines. Garbled lines are dropped on the way."""
    p = Path(path)
    with _discovery_lock(p):
        urls = read_discovery_file(p, bad=[])
        new = edit(urls)
        if new != urls or not p.exists():
            atomic_write_text(p, "".join(u + "\n" for u in new))


def register_url(path: str | os.PathLike, url: str) -> None:
    """Add ``url`` to the discovery file (idempotent)."""
    url = url.rstrip("/")
    _edit_discovery_file(path, lambda urls: urls if url in urls else urls + [url])


def unregister_url(path: str | os.PathLike, url: str) -> None:
    """Remove ``url`` from the discovery file (no error if it is not there)."""
    url = url.rstrip("/")
    _edit_discovery_file(path, lambda urls: [u for u in urls if u != url])


def _is_http_url(url: str) -> bool:
    """http(s)://host[:port][/path] in printable ASCII with a valid port (a torn or garbled line fails)."""
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class VllmRouter:
    """One ``vllm-router`` process. ``workers``: initial worker URLs; ``policy``: its routing policy;
    ``extra_args``: any further CLI flags (e.g. ``["--retry-max-retries", "5"]``)."""

    def __init__(
        self,
        workers: Sequence[str] = (),
        policy: str = "round_robin",
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        health_check_interval_s: int = 1,
        request_timeout_s: int = 600,
        max_retries: int = 3,
        extra_args: Sequence[str] = (),
        log_file: Optional[str | Path] = None,
        api_key: Optional[str] = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {POLICIES}, got {policy!r}")
        self.workers = [w.rstrip("/") for w in workers]
        self.policy, self.host = policy, host
        self.port = port or free_port(host)
        self.health_check_interval_s = health_check_interval_s
        self.request_timeout_s, self.max_retries = request_timeout_s, max_retries
        self.extra_args, self.log_file, self.api_key = list(extra_args), log_file, api_key
        self.proc: Optional[subprocess.Popen] = None
        self._log_fh = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            router_binary(), "--host", self.host, "--port", str(self.port), "--policy", self.policy,
            "--prometheus-host", self.host, "--prometheus-port", str(free_port(self.host)),
            "--health-check-interval-secs", str(self.health_check_interval_s),
            "--health-check-endpoint", "/health",
            "--worker-startup-check-interval", "1",
            "--request-timeout-secs", str(self.request_timeout_s),
            "--retry-max-retries", str(self.max_retries),
            "--log-level", "warning",
        ]
        if self.workers:
            cmd += ["--worker-urls", *self.workers]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 60.0) -> "VllmRouter":
        """Start the router and wait until it answers ``/list_workers`` (workers healthy)."""
        if self.proc is not None:
            raise RuntimeError("router already started")
        if self.log_file:
            self._log_fh = open(self.log_file, "ab")
        out = self._log_fh or subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited with code {self.proc.returncode} "
                                   f"(log: {self.log_file or 'pass log_file to keep it'})")
            try:
                r = httpx.get(f"{self.url}/list_workers", timeout=1.0)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"vllm-router on {self.url} not ready after {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only the router and its children
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "VllmRouter":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- worker management
    def list_workers(self) -> list[str]:
        r = httpx.get(f"{self.url}/list_workers", timeout=5.0)
        r.raise_for_status()
        return [u.rstrip("/") for u in r.json().get("urls", [])]

    def add_worker(self, url: str) -> None:
        r = httpx.post(f"{self.url}/add_worker", params={"url": url.rstrip("/")}, timeout=30.0)
        if r.status_code >= 400:
            raise RuntimeError(f"router refused worker {url}: HTTP {r.status_code} {r.text[:200]}")

    def remove_worker(self, url: str) -> None:
        r = httpx.post(f"{self.url}/remove_worker", params={"url": url.rstrip("/")}, timeout=30.0)
        if r.status_code >= 400:
            raise RuntimeError(f"router could not remove worker {url}: HTTP {r.status_code} {r.text[:200]}")

    def sync_workers(self, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
        """Make the router's worker set equal ``wanted``; returns (added, removed)."""
        have = set(self.list_workers())
        want = [w.rstrip("/") for w in wanted]
        added = [w for w in want if w not in have]
        removed = [w for w in have if w not in set(want)]
        for w in removed:
            self.remove_worker(w)
        for w in added:
            self.add_worker(w)
        return added, removed


class DiscoveryWatcher:
    """Poll a discovery file and apply changes: to the router's worker set and to ``on_change(urls)``
    (the fleet client's fan-out list). Runs in a daemon thread; ``check()`` does one poll synchronously."""

    def __init__(self, path: str | Path, router: Optional[VllmRouter] = None,
                 on_change: Optional[Callable[[list[str]], None]] = None, interval_s: float = 1.0,
                 prepare: Optional[Callable[[list[str]], list[str]]] = None, lock: Optional[Any] = None,
                 max_backoff_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        """``prepare(added) -> ready``: called with newly listed servers before any traffic can reach them (the
        fleet engine loads the current weights there); a server it does not return is retried after
        ``interval_s``, then after twice as long each time, up to ``max_backoff_s``.
        ``lock``: held while a change is prepared and applied (the fleet engine's weight-update lock).
        Lines of the file that are not URLs are skipped with one warning each."""
        self.path, self.router, self.on_change, self.interval_s = Path(path), router, on_change, interval_s
        self.prepare, self.lock = prepare, lock
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self._last: Optional[list[str]] = None
        self._bad_seen: set[str] = set()
        # url -> (next attempt time, current delay): a listed server that ``prepare`` turned away is retried
        # with exponential back-off, so a dead entry does not take the weight-update lock at every poll
        self._backoff: dict[str, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def check(self) -> bool:
        """Re-read the file; returns True when the worker list changed (and was applied)."""
        bad: list[str] = []
        try:
            urls = read_discovery_file(self.path, bad=bad)
        except OSError as exc:
            log.warning("discovery file %s: %s (keeping %s)", self.path, exc, self._last)
            return False
        for msg in bad:
            if msg not in self._bad_seen:
                log.warning("discovery: skipping %s", msg)
        self._bad_seen = set(bad)
        now = self.clock()
        self._backoff = {u: b for u, b in self._backoff.items() if u in urls}  # delisted: forget
        waiting = {u for u, (due, _) in self._backoff.items() if due > now}
        want = [u for u in urls if u not in waiting]  # a server in back-off was never accepted (not in _last)
        if want == self._last:
            return False
        with self.lock if self.lock is not None else contextlib.nullcontext():
            added = [u for u in want if u not in (self._last or [])]
            if self.prepare is not None and added:
                ready = set(self.prepare(added))
                for u in added:
                    if u in ready:
                        self._backoff.pop(u, None)
                    else:
                        delay = min(self.max_backoff_s, 2 * self._backoff[u][1]) if u in self._backoff else self.interval_s
                        self._backoff[u] = (now + delay, delay)
                if ready != set(added):
                    log.warning("discovery: not adding %s yet (not ready; next tries in %s s)",
                                [u for u in added if u not in ready],
                                [round(self._backoff[u][1], 1) for u in added if u not in ready])
                want = [u for u in want if u not in added or u in ready]
            if want == self._last:
                return False
            if self.router is not None:
                added, removed = self.router.sync_workers(want)
                log.info("discovery: added %s removed %s", added, removed)
            if self.on_change is not None:
                self.on_change(list(want))
            self._last = want
        return True

    def start(self) -> "DiscoveryWatcher":
        self.check()
        self._thread = threading.Thread(target=self._loop, name="discovery-watcher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a flaky router call must not kill the watcher
                log.exception("discovery watcher")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
