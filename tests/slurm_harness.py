"""A real, throw-away Slurm cluster on this machine for the `slurm` tests.

What it does (self-contained: nothing outside the test's temporary directory is configured):
- installs Debian's ``slurmctld slurmd slurm-client munge`` with apt when they are missing and we are root;
- writes ``slurm.conf`` into a fresh temporary directory (nothing under /etc is touched, clients find it
  through ``SLURM_CONF``), on free TCP ports, with its own munge key and socket (``AuthInfo=socket=...``),
  so two test sessions on one machine do not see each other's cluster;
- starts ``munged``, ``slurmctld`` and one ``slurmd`` per emulated node (n1, n2, ...) in the foreground
  as our own children, so we hold their exact PIDs;
- waits until every node is idle, and on ``stop()`` cancels its jobs and stops exactly those PIDs.

Use from a test module::

    from slurm_harness import slurm_cluster  # noqa: F401  (the session-scoped fixture)

    @pytest.mark.slurm
    def test_x(slurm_cluster):
        res = slurm_cluster.sbatch_wait(["-t", "2", "--wrap", "hostname"], timeout=60)

Tests that use the fixture skip with a reason when we are not root or Slurm cannot be installed.
The cluster is also usable by hand: ``python tests/slurm_harness.py`` starts one, prints the
``export SLURM_CONF=...`` line and stops it on Enter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pytest

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")


# --------------------------------------------------------------------------------------------- install
def _missing_binaries() -> list[str]:
    return [b for b in _DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_slurm_installed() -> Optional[str]:
    """Install Slurm + munge with apt if needed. Returns None when usable, else the reason it is not."""
    if not _missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries missing ({', '.join(_missing_binaries())}) and not root, so cannot apt-get install them"
    if shutil.which("apt-get") is None:
        return f"Slurm binaries missing ({', '.join(_missing_binaries())}) and apt-get is unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or _missing_binaries():
        tail = (res.stderr or res.stdout).strip()[-500:]
        return f"apt-get install {' '.join(SLURM_PACKAGES)} failed (rc={res.returncode}): {tail}"
    return None


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot run here (None if it can). Installs Slurm when possible."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "the local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd and munged run as root/munge)"
    return ensure_slurm_installed()


def _load_prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


# Resolved here, in the parent: after Popen's setuid (munged runs as `munge`) the child may no longer be
# able to read the Python installation to import ctypes.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this daemon when the process that started it dies (a test session killed by
    `timeout` or SIGKILL never runs its teardown; without this the daemons would outlive it). Runs after
    Popen's setuid, which would otherwise clear the setting."""
    PR_SET_PDEATHSIG = 1
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound and released; the kernel will not hand them out again at once)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _detect_node() -> tuple[int, int]:
    """(CPUs, RealMemory MiB) as slurmd itself detects them: RealMemory above this drains the node."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return int(fields["CPUs"]), int(fields["RealMemory"])


# --------------------------------------------------------------------------------------------- cluster
@dataclass(frozen=True)
class JobResult:
    state: str  # final JobState (COMPLETED, FAILED, ...)
    exit_code: int  # of the batch script (128 + signal if it was killed)
    restarts: int  # how many times the job was requeued
    record: dict


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


@dataclass
class SlurmCluster:
    """One controller + ``nodes`` emulated compute nodes, all on 127.0.0.1, under ``base``."""

    nodes: int = 2
    base: Optional[Path] = None
    cred_expire_s: int = 5  # also the minimum wait before a requeued job may start again (default 120)
    # How long finished jobs stay visible to scontrol. `sbatch --wait` polls after 2 s, then 4x longer each
    # time while the interval is below MinJobAge/2: 16 keeps its interval at 8 s (600 gives 2, 8, 32 s).
    min_job_age_s: int = 16
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    conf_path: Optional[Path] = None
    _own_base: bool = False

    # ------------------------------------------------------------------ environment for clients
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF pointing at this cluster (for sbatch/squeue/scontrol/srun)."""
        assert self.conf_path is not None, "cluster not started"
        # torchrun's variables in the test process (set by an in-process distributed test) must not leak into
        # jobs: sbatch exports the environment, and a task would take RANK=0 over its SLURM_PROCID
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="megatron-amir-slurm-"))
            self._own_base = True
        base = self.base
        os.chmod(base, 0o755)  # munged refuses sockets/keys below group/world-writable directories
        for sub in ("ctld", "log", "run", "job-tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._start_slurm()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        import grp
        import pwd

        mdir = self.base / "munge"  # key, seed, log: private to the munge user
        sdir = self.base / "munge-run"  # the socket: munged wants its directory searchable by all
        mdir.mkdir(mode=0o700, exist_ok=True)
        sdir.mkdir(mode=0o755, exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        for p in (mdir, sdir, key):
            os.chown(p, uid, gid)
        os.chmod(key, 0o400)
        self.munge_socket = sdir / "munge.socket"
        log = open(self.base / "log" / "munged.out", "ab")
        self.procs["munged"] = subprocess.Popen(
            ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
             f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"],
            user=uid, group=gid, extra_groups=[], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        deadline = time.time() + 10
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail(mdir / 'munged.log')}"
                                   f"{self._tail(self.base / 'log' / 'munged.out')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        cpus, mem = _detect_node()
        node_mem = mem // self.nodes
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        self.node_ports = node_ports
        base = self.base
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
            f"RealMemory={node_mem} State=UNKNOWN"
            for name, port in zip(self.node_names, node_ports)
        )
        # A random first job id: two clusters on one machine never produce the same job ids, so per-job
        # log directories keyed by the id do not collide.
        first_job = 1000 + int.from_bytes(os.urandom(4), "little") % 59000  # not `random`: tests seed it
        conf = f"""\
# generated by tests/slurm_harness.py
ClusterName=amirci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# het jobs start only from the backfill scheduler: make it run every second
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default every job takes the node's whole memory and jobs run one at a time
DefMemPerCPU={max(1, node_mem // cpus)}
# a job that can never fit is rejected at submit instead of pending forever
EnforcePartLimits=ALL
FirstJobId={first_job}
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={base}/ctld
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge={self.min_job_age_s}
KillWait=5
Waittime=0
JobRequeue=1
TmpFS={base}/job-tmp
{node_lines}
PartitionName=debug Nodes=n[1-{self.nodes}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf_path = base / "slurm.conf"
        tmp = base / "slurm.conf.tmp"
        tmp.write_text(conf)
        os.replace(tmp, self.conf_path)

    def _start_slurm(self) -> None:
        conf = str(self.conf_path)
        env = self.env

        def spawn(name: str, argv: list[str]) -> None:
            out = open(self.base / "log" / f"{name}.out", "ab")
            # own session: a Ctrl-C in the test terminal does not hit the daemons before stop() does
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=_die_with_parent)

        spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        for name in self.node_names:
            (self.base / f"spool-{name}").mkdir(exist_ok=True)
            spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", conf])

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} during start-up:\n{self.logs_tail()}")
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            last = res.stdout.strip() or res.stderr.strip()
            states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
            if res.returncode == 0 and len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout:.0f}s (sinfo: {last})\n{self.logs_tail()}")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons we started (by PID)."""
        if self.conf_path is not None and "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--quiet", "--full", f"--user={os.geteuid()}"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.time() + 20  # let slurmstepd clean up the jobs' processes while slurmd lives
            while time.time() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.3)
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            self.procs.pop(name)
        if self._own_base and self.base is not None and not os.environ.get("MEGATRON_AMIR_KEEP_SLURM_DIR"):
            shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ job helpers
    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        env = dict(self.env, **kw.pop("env", {}))
        return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, **kw)

    def sbatch(self, args: Sequence[str], env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        """Submit without waiting; returns the job id."""
        res = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def sbatch_wait(self, args: Sequence[str], timeout: float, env: Optional[dict] = None,
                    cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """``timeout <s> sbatch --wait ...``: the job's exit code comes back as returncode.

        On timeout the job is cancelled (an `sbatch --wait` on a job that cannot start would hang forever)
        and the returncode is 124, like coreutils timeout.
        """
        full_env = dict(self.env, **(env or {}))
        argv = ["timeout", "--signal=TERM", str(int(timeout)), "sbatch", "--parsable", "--wait", *args]
        res = subprocess.run(argv, env=full_env, capture_output=True, text=True, cwd=cwd, timeout=timeout + 30)
        if res.returncode == 124:
            job = res.stdout.strip().split(";")[0]
            if job.isdigit():
                self.run(["scancel", job])
        return res

    TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")

    def wait_done(self, job_id: int, timeout: float) -> "JobResult":
        """Poll (every 0.25 s, unlike ``sbatch --wait``'s back-off) until the job ends for good and return its
        final record. A requeued job passes through PENDING and is waited for. On timeout the job is
        cancelled and TimeoutError raised."""
        deadline = time.time() + timeout
        rec: dict[str, str] = {}
        while time.time() < deadline:
            rec = self.job_record(job_id)
            if rec.get("JobState") in self.TERMINAL:
                rc, _, sig = rec.get("ExitCode", "-1:0").partition(":")
                code = int(rc) if rc.isdigit() else -1
                if code == 0 and sig.isdigit() and int(sig):
                    code = 128 + int(sig)
                return JobResult(rec["JobState"], code, int(rec.get("Restarts", "0")), rec)
            time.sleep(0.25)
        self.run(["scancel", str(job_id)])
        raise TimeoutError(f"job {job_id} did not finish in {timeout}s (last record {rec})\n{self.logs_tail()}")

    def wait_state(self, job_id: int, states: Sequence[str], timeout: float) -> str:
        """Poll until the job (or, for a requeued job, its current incarnation) is in one of ``states``."""
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_record(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {list(states)} after {timeout}s (last state {state!r})")

    def job_record(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (the first record: the leader of a heterogeneous job)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        first = res.stdout.splitlines()[0] if res.stdout.strip() else ""
        return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)

    # ------------------------------------------------------------------ diagnostics
    @staticmethod
    def _tail(path: Path, n: int = 3000) -> str:
        try:
            return f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def logs_tail(self) -> str:
        if self.base is None:
            return ""
        return "".join(self._tail(p, 1500) for p in sorted((self.base / "log").glob("*")))


# --------------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node local Slurm cluster shared by the session's `slurm` tests (skips with the reason if impossible)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(f"local Slurm cluster did not start: {exc}")
    # SIGTERM (e.g. `timeout pytest ...`) would end the session without teardown: turn it into an
    # interrupt so the finalizer below cancels the jobs and stops the daemons (SIGKILL is covered by
    # the daemons' parent-death signal, but then running jobs are left to finish on their own).
    prev = signal.getsignal(signal.SIGTERM)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    is_main = threading.current_thread() is threading.main_thread()
    if is_main:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield cluster
    finally:
        cluster.stop()
        if is_main:
            signal.signal(signal.SIGTERM, prev)


if __name__ == "__main__":  # manual use: start a cluster, print how to reach it, stop it on Enter
    c = SlurmCluster(nodes=int(os.environ.get("SLURM_CI_NODES", "2"))).start()
    print(f"export SLURM_CONF={c.conf_path}    # daemons: {[p.pid for p in c.procs.values()]}")
    try:
        input("press Enter to stop the cluster\n")
    finally:
        c.stop()
