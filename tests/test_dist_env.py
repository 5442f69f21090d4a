"""megatron_amir/training/dist_env.py: Slurm / torchrun / single-process detection, host lists, backend choice;
its command line launch/dist_env.py (show / exec / tasks); a real 2-process gloo rendezvous from Slurm-style
variables (no Slurm needed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_amir.training.dist_env import (
    BACKEND_ENV,
    PORT_SPAN,
    DistEnvError,
    default_master_port,
    detect,
    expand_hostlist,
    export,
    parse_tasks_per_node,
    resolve_backend,
    setup,
)

ROOT = Path(__file__).resolve().parents[1]


def slurm_step_env(procid: int, ntasks: int = 2, nodelist: str = "localhost", localid: int | None = None,
                   nodeid: int = 0, tasks_per_node: str | None = None, job_id: int = 4242) -> dict[str, str]:
    """What srun puts in a task's environment (the subset dist_env reads)."""
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid if localid is None else localid), "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node or str(ntasks),
    }


# --------------------------------------------------------------------------------------------- host lists
@pytest.mark.parametrize("spec, expected", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2,5],login", ["n1", "n2", "n5", "login"]),
    ("gpu-[08-11]", ["gpu-08", "gpu-09", "gpu-10", "gpu-11"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
    ("a[1-2]-ib,b7", ["a1-ib", "a2-ib", "b7"]),
    ("node[009-010]", ["node009", "node010"]),
])
def test_expand_hostlist(spec, expected):
    assert expand_hostlist(spec) == expected


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(DistEnvError, match="node list"):
        expand_hostlist(bad)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(DistEnvError, match="tasks-per-node"):
        parse_tasks_per_node("2(y3)")


# --------------------------------------------------------------------------------------------- detection
def test_slurm_step_two_nodes():
    env = slurm_step_env(procid=3, ntasks=4, nodelist="localhost,127.0.0.1", localid=1, nodeid=1,
                         tasks_per_node="2(x2)", job_id=12345)
    d = detect(env, min_world_size=2)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size) == (3, 1, 4, 2)
    assert (d.node_rank, d.num_nodes, d.launcher) == (1, 2, "slurm")
    assert d.master_addr == "localhost"  # first host of the step: rank 0 runs there
    assert d.master_port == 20000 + 12345 % PORT_SPAN < 32768  # below the ephemeral range
    out: dict[str, str] = {}
    export(d, out)
    assert out["RANK"] == "3" and out["WORLD_SIZE"] == "4" and out["LOCAL_RANK"] == "1"
    assert out["LOCAL_WORLD_SIZE"] == "2" and out["MASTER_ADDR"] == "localhost" and out["NODE_RANK"] == "1"


def test_master_overrides_and_port_is_shared_by_all_tasks():
    ports = {detect(slurm_step_env(procid=r, job_id=777)).master_port for r in range(2)}
    assert ports == {default_master_port(777)}
    env = {**slurm_step_env(procid=1), "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555"}
    d = detect(env)
    assert (d.master_addr, d.master_port) == ("10.0.0.7", 29555)


def test_unresolvable_first_node_without_slurm_is_a_clear_error():
    env = slurm_step_env(procid=0, nodelist="no-such-node-zz[1-2]")
    with pytest.raises(DistEnvError, match="MASTER_ADDR"):
        detect(env)


def test_batch_script_is_not_a_launcher():
    # the batch shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: it must not pose as rank 0 of 2
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    d = detect(env)
    assert (d.world_size, d.launcher) == (1, "single")
    with pytest.raises(DistEnvError, match="inside the Slurm batch script but outside srun"):
        detect(env, min_world_size=2)


def test_torchrun_wins_over_slurm():
    env = {**slurm_step_env(procid=0, ntasks=2), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "host-a", "MASTER_PORT": "29500", "GROUP_RANK": "1"}
    d = detect(env, min_world_size=4)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 4, 1)
    assert (d.master_addr, d.master_port, d.launcher) == ("host-a", 29500, "torchrun")


def test_incomplete_torchrun_env_names_missing_variables():
    with pytest.raises(DistEnvError, match="MASTER_ADDR, MASTER_PORT"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_no_launcher_but_config_needs_ranks():
    with pytest.raises(DistEnvError) as e:
        detect({}, min_world_size=2)
    msg = str(e.value)
    for needle in ("at least 2 ranks", "parallel.tensor_model_parallel_size", "srun", "torchrun", "SLURM_PROCID"):
        assert needle in msg
    d = detect({})
    assert (d.rank, d.world_size, d.launcher, d.master_addr) == (0, 1, "single", "127.0.0.1")


def test_world_size_must_be_a_multiple_of_tp_pp():
    with pytest.raises(DistEnvError, match="multiple of 4"):
        detect(slurm_step_env(procid=0, ntasks=6), min_world_size=4)


def test_setup_takes_min_world_size_from_parallel_config():
    from megatron_amir.config import ParallelConfig

    with pytest.raises(DistEnvError, match="at least 2 ranks"):
        setup(ParallelConfig(tensor_model_parallel_size=2), environ={})
    env = slurm_step_env(procid=1, ntasks=2)
    d = setup(ParallelConfig(tensor_model_parallel_size=2), environ=env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and d.launcher == "slurm"
    # a second detect on the exported variables describes the same process, still as launched by Slurm
    assert detect(env) == d


# --------------------------------------------------------------------------------------------- backend
def test_backend_env_overrides_config():
    assert resolve_backend("auto", {}, cuda_available=False) == "gloo"
    assert resolve_backend("auto", {}, cuda_available=True) == "nccl"
    assert resolve_backend("nccl", {BACKEND_ENV: "gloo"}, cuda_available=True) == "gloo"
    assert resolve_backend("gloo", {BACKEND_ENV: "AUTO"}, cuda_available=True) == "nccl"
    with pytest.raises(DistEnvError, match=BACKEND_ENV):
        resolve_backend("auto", {BACKEND_ENV: "mpi"}, cuda_available=False)
    with pytest.raises(DistEnvError, match="parallel.backend=nccl needs CUDA"):
        resolve_backend("nccl", {}, cuda_available=False)


# --------------------------------------------------------------------------------------------- CLI
def _run(args, env, timeout=60):
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "launch.dist_env", *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_exec_exports_torchrun_variables():
    code = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])"
    res = _run(["exec", "--", sys.executable, "-c", code], slurm_step_env(procid=1, job_id=31))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "2", "localhost", str(default_master_port(31))]


def test_cli_show_and_error_exit_code():
    res = _run(["show"], slurm_step_env(procid=0))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["world_size"] == 2
    res = _run(["exec", "--min-world-size", "2", "--", "true"], {})
    assert res.returncode == 2 and "at least 2 ranks" in res.stderr


# --------------------------------------------------------------------------------------------- real rendezvous
def _job_id_with_free_port() -> int:
    """A fake job id whose derived MASTER_PORT is free right now."""
    for job in range(os.getpid() % 20000, 20000 + os.getpid() % 20000):
        port = default_master_port(job)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port in the derived range")


@pytest.mark.dist
def test_gloo_allreduce_from_slurm_variables():
    """Two processes that only see srun-style variables meet through init_process_group and all-reduce."""
    job = _job_id_with_free_port()
    code = (
        "import torch, torch.distributed as dist\n"
        "torch.set_num_threads(1)\n"
        "from megatron_amir.training.dist_env import init_process_group\n"
        "d = init_process_group(timeout_s=60)\n"
        "t = torch.tensor([float(d.rank + 1)]); dist.all_reduce(t)\n"
        "print(d.rank, d.world_size, dist.get_backend(), t.item(), flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    procs = []
    for r in range(2):
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               BACKEND_ENV: "gloo", **slurm_step_env(procid=r, job_id=job)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sorted(o.split() for o, _ in outs) == [["0", "2", "gloo", "3.0"], ["1", "2", "gloo", "3.0"]]


@pytest.mark.dist
def test_collective_timeout_comes_from_parallel_timeout_s():
    """Rank 1 waits in a broadcast while rank 0 alone works for 4 s (as the other ranks wait for rank 0's
    rollouts): with parallel.timeout_s=1 the wait fails with gloo's timeout, with 30 it completes. The timeout
    used to be a fixed 600 s, shorter than a long rollout + weight sync + evaluation on rank 0."""
    code = (
        "import os, sys, time, torch, torch.distributed as dist\n"
        "torch.set_num_threads(1)\n"
        "from megatron_amir.config import ParallelConfig\n"
        "from megatron_amir.training.dist_env import init_process_group\n"
        "d = init_process_group(ParallelConfig(backend='gloo', timeout_s=float(sys.argv[1])))\n"
        "dist.barrier()\n"
        "if d.rank == 0: time.sleep(4)\n"
        "t = torch.tensor([float(d.rank)])\n"
        "try:\n"
        "    dist.broadcast(t, 0); print(d.rank, 'ok', t.item(), flush=True)\n"
        "except RuntimeError as e:\n"
        "    print(d.rank, 'timeout' if 'imeout' in str(e) or 'imed out' in str(e) else repr(e), flush=True)\n"
        "os._exit(0)\n"
    )
    seen = {}
    for timeout_s in ("1", "30"):
        job = _job_id_with_free_port()
        procs = []
        for r in range(2):
            env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                   **slurm_step_env(procid=r, job_id=job)}
            procs.append(subprocess.Popen([sys.executable, "-c", code, timeout_s], env=env, cwd=ROOT, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=120) for p in procs]
        seen[timeout_s] = outs[1][0].split()
    assert seen["1"] == ["1", "timeout"], seen
    assert seen["30"] == ["1", "ok", "0.0"], seen


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (nccl backend)")
def test_auto_backend_is_nccl_on_gpu_and_binds_local_rank():
    code = (
        "import torch, torch.distributed as dist\n"
        "from megatron_amir.training.dist_env import init_process_group\n"
        "from megatron_amir.config import ParallelConfig\n"
        "d = init_process_group(ParallelConfig(backend='auto'), timeout_s=60)\n"
        "t = torch.ones(1, device='cuda'); dist.all_reduce(t)\n"
        "print(dist.get_backend(), torch.cuda.current_device(), t.item())\n"
        "dist.destroy_process_group()\n"
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **slurm_step_env(procid=0, ntasks=1,
                                                                                  job_id=_job_id_with_free_port())}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["nccl", "0", "1.0"]


def test_tasks_subcommand(capsys):
    from launch.dist_env import main

    assert main(["tasks", "8(x2),4"]) == 0 and capsys.readouterr().out.strip() == "20"
    assert main(["tasks", "nonsense"]) == 2
