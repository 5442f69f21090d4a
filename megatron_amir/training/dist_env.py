"""The torch.distributed environment of this process, from Slurm or torchrun.

Every launcher describes "who am I among how many, and where is rank 0" in its own variables:

- **torchrun** (also torchrun started per node by ``srun``): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. Taken as they are; they win over Slurm's.
- **Slurm** (a task of ``srun``, i.e. a job *step*): ``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), ``SLURM_NODEID``, the step's node list
  (``SLURM_STEP_NODELIST`` else ``SLURM_JOB_NODELIST``) expanded with ``scontrol show hostnames``; rank 0
  runs on the first host (Slurm's default block distribution), whose address becomes ``MASTER_ADDR``;
  ``MASTER_PORT`` is derived from the job id so every task computes the same port without talking.
  The batch script itself (``SLURM_JOB_ID`` set but no ``SLURM_STEP_ID``) is *not* a launcher: there
  ``SLURM_NTASKS`` counts tasks that only ``srun`` would start.
- **nothing**: one process (rank 0 of 1) on 127.0.0.1 -- fine unless the config needs more ranks, then
  :class:`DistEnvError` says how to launch.

``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment override the derived ones (multi-homed nodes).

``export()`` writes the torchrun variables, so any code that reads them (``init_process_group("env://")``,
Megatron, our trainer) works unchanged under ``srun``. From a shell, ``launch/dist_env.py`` does it::

    srun python -m launch.dist_env exec -- python -m launch.cli train cfg.yaml

The backend (gloo on CPU, nccl on GPU) is ``resolve_backend(parallel.backend)``: the environment variable
``MEGATRON_AMIR_BACKEND`` wins over the config so one sbatch script serves both kinds of cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping, MutableMapping, Optional

BACKEND_ENV = "MEGATRON_AMIR_BACKEND"
LAUNCHER_ENV = "MEGATRON_AMIR_LAUNCHER"  # set by export(): who described this process originally
BACKENDS = ("auto", "gloo", "nccl")
PORT_BASE, PORT_SPAN = 20000, 12000  # derived MASTER_PORT in [20000, 32000): below Linux's ephemeral range (32768+)

Launcher = Literal["torchrun", "slurm", "single"]
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistEnvError(RuntimeError):
    """The launch environment is missing, inconsistent, or too small for the config."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: Launcher

    def as_environ(self) -> dict[str, str]:
        """The torchrun variables (plus NODE_RANK / GROUP_RANK) describing this process."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            LAUNCHER_ENV: self.launcher,
        }


# --------------------------------------------------------------------------------------------- hostlists
_BRACKET = re.compile(r"^(.*?)\[([^\]]+)\](.*)$")


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list syntax without Slurm: ``n[1-3,7],gpu-[01-02]x`` ->
    ``[n1, n2, n3, n7, gpu-01x, gpu-02x]``. Zero padding of range bounds is kept (``[08-10]`` -> 08, 09, 10);
    several bracket groups in one name expand as a product (``r[1-2]n[1-2]``)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"unbalanced ']' in Slurm node list {s!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise DistEnvError(f"unbalanced '[' in Slurm node list {s!r}")
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = _BRACKET.match(item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    heads = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise DistEnvError(f"bad range {r!r} in Slurm node list item {item!r}")
            width = len(lo)
            nums = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not r.isdigit():
                raise DistEnvError(f"bad index {r!r} in Slurm node list item {item!r}")
            nums = [r]
        heads.extend(prefix + n for n in nums)
    tails = _expand_one(rest) if rest else [""]
    return [head + tail for head in heads for tail in tails]


def slurm_hostnames(nodelist: str, scontrol: Optional[str] = None) -> list[str]:
    """Host names of a Slurm node list, by ``scontrol show hostnames`` (the reference) when available."""
    scontrol = scontrol or shutil.which("scontrol")
    if scontrol:
        res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()
    return expand_hostlist(nodelist)


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_TASKS_PER_NODE`` / ``SLURM_STEP_TASKS_PER_NODE``: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistEnvError(f"cannot parse Slurm tasks-per-node spec {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def node_address(host: str, environ: Mapping[str, str]) -> str:
    """An address for ``host`` that other nodes can connect to.

    A resolvable host name is returned as it is. Otherwise ask Slurm for the node's ``NodeAddr`` (clusters
    whose node names are not DNS names, and the emulated nodes of the local test cluster)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    scontrol = shutil.which("scontrol")
    if scontrol:
        res = subprocess.run([scontrol, "show", "node", "-o", host], capture_output=True, text=True, timeout=60,
                             env=dict(environ))
        m = re.search(r"\bNodeAddr=(\S+)", res.stdout)
        if res.returncode == 0 and m:
            return m.group(1)
    raise DistEnvError(f"cannot resolve the address of node {host!r} (rank 0's host); set MASTER_ADDR")


def default_master_port(job_id: str | int) -> int:
    """Same port on every task of a job, different for jobs sharing a node."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _int(environ: Mapping[str, str], key: str) -> int:
    val = environ.get(key)
    if val is None or not val.strip().lstrip("-").isdigit():
        raise DistEnvError(f"environment variable {key}={val!r} is not an integer")
    return int(val)


# --------------------------------------------------------------------------------------------- detection
def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True inside a task that srun started (not in the batch script, not on a login node)."""
    return "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)


def detect(environ: Optional[Mapping[str, str]] = None, *, min_world_size: int = 1) -> DistEnv:
    """Describe this process from the environment (see module docstring for the precedence).

    ``min_world_size``: ranks the config cannot do without (TP * PP); more than 1 with no launcher, or a
    launcher with fewer ranks, raises :class:`DistEnvError` naming what to do.
    """
    env = os.environ if environ is None else environ
    present = [k for k in _TORCHRUN_VARS if k in env]
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in _TORCHRUN_VARS if k not in env]
        if missing:
            raise DistEnvError(f"torchrun-style environment is incomplete: {', '.join(present)} set but "
                               f"{', '.join(missing)} missing")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        node_rank = _int(env, "GROUP_RANK") if "GROUP_RANK" in env else (
            _int(env, "NODE_RANK") if "NODE_RANK" in env else rank // max(local_world, 1))
        num_nodes = max(1, -(-world // max(local_world, 1)))
        launcher = env.get(LAUNCHER_ENV, "torchrun")
        out = DistEnv(rank, local_rank, world, local_world, node_rank, num_nodes, env["MASTER_ADDR"],
                      _int(env, "MASTER_PORT"), launcher if launcher in ("torchrun", "slurm", "single") else "torchrun")
    elif in_slurm_step(env):
        out = _from_slurm(env)
    else:
        if min_world_size > 1:
            where = ("inside the Slurm batch script but outside srun" if "SLURM_JOB_ID" in env
                     else "outside any launcher")
            raise DistEnvError(
                f"the config needs at least {min_world_size} ranks (parallel.tensor_model_parallel_size * "
                f"parallel.pipeline_model_parallel_size) but this process runs {where}: neither Slurm task "
                f"variables (SLURM_PROCID + SLURM_STEP_ID, set by srun) nor torchrun's (RANK, WORLD_SIZE, "
                f"LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set. Launch with `srun -n N ...`, `torchrun "
                f"--nproc-per-node N ...` or `sbatch slurm/train.sbatch CONFIG`."
            )
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else _free_port()
        out = DistEnv(0, 0, 1, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
    _check(out, min_world_size)
    return out


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID")
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    tpn_key = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
    per_node = parse_tasks_per_node(env[tpn_key]) if tpn_key in env else [world]
    local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistEnvError("inside a Slurm step but SLURM_STEP_NODELIST / SLURM_JOB_NODELIST are unset")
    hosts = slurm_hostnames(nodelist)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        addr = node_address(hosts[0], env)
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    else:
        port = default_master_port(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or 0)
    return DistEnv(rank, local_rank, world, local_world, node_rank, len(hosts), addr, port, "slurm")


def _check(d: DistEnv, min_world_size: int) -> None:
    if not 0 <= d.rank < d.world_size:
        raise DistEnvError(f"rank {d.rank} is outside world size {d.world_size}")
    if not 0 <= d.local_rank < max(d.local_world_size, 1):
        raise DistEnvError(f"local rank {d.local_rank} is outside local world size {d.local_world_size}")
    if d.world_size < min_world_size or d.world_size % min_world_size:
        raise DistEnvError(
            f"{d.launcher} gives {d.world_size} ranks, but the config needs a multiple of {min_world_size} "
            "(parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)")
    if not 0 < d.master_port < 65536:
        raise DistEnvError(f"MASTER_PORT={d.master_port} is not a TCP port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- backend
def resolve_backend(config_backend: str = "auto", environ: Optional[Mapping[str, str]] = None,
                    cuda_available: Optional[bool] = None) -> str:
    """``MEGATRON_AMIR_BACKEND`` (if set) else ``parallel.backend``; ``auto`` = nccl with CUDA, gloo without."""
    env = os.environ if environ is None else environ
    src, value = ("parallel.backend", config_backend)
    if env.get(BACKEND_ENV):
        src, value = (BACKEND_ENV, env[BACKEND_ENV].strip().lower())
    if value not in BACKENDS:
        raise DistEnvError(f"{src}={value!r} is not one of {', '.join(BACKENDS)}")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if value == "auto":
        return "nccl" if cuda_available else "gloo"
    if value == "nccl" and not cuda_available:
        raise DistEnvError(f"{src}=nccl needs CUDA, and this process sees no GPU; use gloo (or auto) on CPU")
    return value


# --------------------------------------------------------------------------------------------- export / init
def export(d: DistEnv, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Write the torchrun variables describing ``d`` into ``environ`` (default os.environ)."""
    (os.environ if environ is None else environ).update(d.as_environ())


def min_world_size_of(parallel_cfg) -> int:
    """TP * PP of a ParallelConfig (or 1 for None)."""
    if parallel_cfg is None:
        return 1
    return int(parallel_cfg.tensor_model_parallel_size) * int(parallel_cfg.pipeline_model_parallel_size)


def setup(parallel_cfg=None, environ: Optional[MutableMapping[str, str]] = None) -> DistEnv:
    """detect() with the config's minimum world size, then export(): call before init_process_group."""
    d = detect(environ, min_world_size=min_world_size_of(parallel_cfg))
    export(d, environ)
    return d


def init_process_group(parallel_cfg=None, timeout_s: Optional[float] = None):
    """setup() + resolve_backend() + torch.distributed.init_process_group(env://). Returns the DistEnv.
    ``timeout_s``: the process groups' collective timeout (default ``parallel_cfg.timeout_s``, else 1800)."""
    import datetime

    import torch
    import torch.distributed as dist

    d = detect(min_world_size=min_world_size_of(parallel_cfg))
    if d.world_size > 1:
        export(d)  # a lone process exports nothing: its children (sbatch, servers) must not inherit RANK=0
    backend = resolve_backend(getattr(parallel_cfg, "backend", "auto"))
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank % torch.cuda.device_count())  # --gpus-per-task: one visible
        if timeout_s is None:
            timeout_s = float(getattr(parallel_cfg, "timeout_s", 1800.0))
        timeout = datetime.timedelta(seconds=timeout_s)
        if d.world_size == 1:
            # an in-memory store: a lone process needs no TCP port (a picked free port can be taken by another
            # process before it is bound, on a busy machine)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", rank=d.rank, world_size=d.world_size,
                                    timeout=timeout)
    return d
