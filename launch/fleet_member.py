"""Run one rollout server and keep its address in the fleet's discovery file while it is healthy.

slurm/fleet.sbatch and slurm/amir_hetjob.sbatch start one of these per GPU (or per tensor-parallel group)::

    python -m launch.fleet_member --discovery-file runs/fleet/servers.txt -- \
        python -m megatron_amir.rollout.server --model HF_DIR --host {host} --port {port}

or, for a stock vLLM member (``--vllm-model``; words after ``--`` are extra vLLM arguments)::

    python -m launch.fleet_member --discovery-file runs/fleet/servers.txt --vllm-model HF_DIR \
        [--vllm-python .venv-vllm/bin/python] [-- --tensor-parallel-size 2]

whose command line and environment come from megatron_amir.rollout.vllm_engine.vllm_serve_command (dev-mode
RLHF routes, our worker extension with this checkout on PYTHONPATH, --skip-tokenizer-init, explicit
--logprobs-mode, bound to ADDR).

It picks a free port (unless ``--port``), substitutes ``{port}`` / ``{host}`` in the command, starts the
server, waits until ``GET http://127.0.0.1:{port}/health`` answers 200, then adds ``http://ADDR:PORT`` to the
discovery file. When the server exits, or this wrapper gets SIGTERM / SIGINT (Slurm at the end of the job)
or SIGUSR2 (slurm/common.sh amir_stop_fleet, forwarded by srun), it removes its line and stops the server.
The wrapper's exit code is the server's (0 after a requested stop). SIGUSR1 is ignored: preemption
warnings are for the trainer; the fleet is stopped by the job script.

Discovery file format (read by the trainer's fleet client through ``rollout.discovery_file``): UTF-8 text,
one base URL per line (``http://host:port``), lines starting with ``#`` and blank lines ignored. Writers
take an exclusive ``flock`` on ``<file>.lock`` and replace the file atomically (temp + rename), so a reader
never sees a half-written file and concurrent servers never lose each other's lines.

ADDR is ``--host``, else the address of this Slurm node (``SLURMD_NODENAME`` resolved like rank 0's
address in megatron_amir/training/dist_env.py, so it works where node names are not DNS names), else the host name.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_amir.training.dist_env import node_address


# --------------------------------------------------------------------------------------------- the file
# one implementation for every writer (this wrapper and ``rollout.server --register``) and for the trainer's reader
from megatron_amir.rollout.router import read_discovery_file  # noqa: E402,F401 - re-exported
from megatron_amir.rollout.router import register_url as register  # noqa: E402
from megatron_amir.rollout.router import unregister_url as unregister  # noqa: E402


# --------------------------------------------------------------------------------------------- the member
def advertise_address(host: Optional[str] = None) -> str:
    if host:
        return host
    node = os.environ.get("SLURMD_NODENAME")
    if node:
        return node_address(node, os.environ)
    return socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float,
                 cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Poll ``url`` until it answers 200; False if the server exits, ``cancelled()`` or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None or cancelled():
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.fleet_member", description=__doc__.split("\n")[0])
    p.add_argument("--discovery-file", required=True, help="shared file listing the fleet's server URLs")
    p.add_argument("--host", default=None, help="address to advertise (default: this node's address)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one), substituted for {port}")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for the first 200")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--start-attempts", type=int, default=3,
                   help="with a free port chosen here: start again on another port when the server exits before it "
                        "is healthy (the port can be taken between our probe and the server's bind)")
    p.add_argument("--vllm-model", default=None,
                   help="run stock vLLM serving this HF directory (the words after -- are extra vLLM arguments)")
    p.add_argument("--vllm-python", default=os.environ.get("MEGATRON_AMIR_VLLM_PYTHON", sys.executable),
                   help="the Python that has vLLM (default $MEGATRON_AMIR_VLLM_PYTHON, else this one)")
    p.add_argument("--logprobs-mode", default=os.environ.get("MEGATRON_AMIR_LOGPROBS_MODE", "processed_logprobs"),
                   help="vLLM's --logprobs-mode (with --vllm-model)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SERVER COMMAND (use {port}, {host})")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    env = None
    if a.vllm_model:
        from megatron_amir.rollout.vllm_engine import vllm_serve_command

        cmd, extra_env = vllm_serve_command(a.vllm_model, "{port}", host="{host}", extra=cmd, python=a.vllm_python,
                                            logprobs_mode=a.logprobs_mode)
        env = {**os.environ, **extra_env}
    if not cmd:
        p.error("a server command is needed after -- (or --vllm-model)")
    addr = advertise_address(a.host)
    stopping: dict[str, Optional[int]] = {"sig": None}

    def on_signal(signum, _frame):  # only a flag: the loop below does the work
        stopping["sig"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):  # USR2: graceful stop from amir_stop_fleet
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # preemption warnings are for the trainer, not the fleet

    attempts = 1 if a.port else max(1, a.start_attempts)
    registered, proc = False, None
    try:
        for attempt in range(1, attempts + 1):
            port = a.port or _free_port()
            url = f"http://{addr}:{port}"
            tag = f"[fleet_member {url}]"
            # own session: signals srun/slurmstepd send to our process group reach only this wrapper, which first
            # unregisters and then stops the server (clients never get a listed server that is shutting down)
            proc = subprocess.Popen([c.replace("{port}", str(port)).replace("{host}", addr) for c in cmd],
                                    start_new_session=True, env=env)
            healthy = wait_healthy(f"http://127.0.0.1:{port}{a.health_path}", proc, a.ready_timeout,
                                   cancelled=lambda: stopping["sig"] is not None)
            if healthy or proc.poll() is None or stopping["sig"] is not None or attempt == attempts:
                break
            print(f"{tag} server exited with {proc.returncode} before it was healthy; starting it again on another "
                  f"port ({attempt}/{attempts})", file=sys.stderr, flush=True)
        if not healthy:
            died = proc.poll()  # None: still running (timed out or asked to stop)
            if died is None and stopping["sig"] is None:
                print(f"{tag} not healthy after {a.ready_timeout:.0f}s: stopping it", file=sys.stderr, flush=True)
            _stop(proc, a.stop_timeout)
            if stopping["sig"] is not None:
                return 0
            if died is not None:
                print(f"{tag} server exited with {died} before it was healthy", file=sys.stderr, flush=True)
            return died if died and died > 0 else 1
        register(a.discovery_file, url)
        registered = True
        print(f"{tag} registered in {a.discovery_file}", flush=True)
        while proc.poll() is None and stopping["sig"] is None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if stopping["sig"] is None:
            print(f"{tag} server exited with {proc.returncode}", file=sys.stderr, flush=True)
            return proc.returncode
        return 0  # a stop we were asked for (end of job) is a success whatever the server says on SIGTERM
    finally:
        if registered:
            unregister(a.discovery_file, url)
            print(f"{tag} removed from {a.discovery_file}", flush=True)
        if proc is not None and proc.poll() is None:
            _stop(proc, a.stop_timeout)


def _stop(proc: subprocess.Popen, timeout_s: float) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
