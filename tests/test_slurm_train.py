"""Slurm launch with the real trainer on the local Slurm cluster (tests/slurm_harness.py):

- `sbatch --wait slurm/train.sbatch` with 2 tasks on 2 nodes trains a few steps of the tiny model (gloo) and
  writes a checkpoint; exit code 0; logs in the per-job directory;
- slurm/amir_hetjob.sbatch runs the trainer + 1 embedded rollout server and completes a few AMIR-GRPO steps;
- preemption: SIGUSR1 to the running job -> checkpoint -> requeue -> the second start resumes from that step.

The CPU/gloo choice comes from MEGATRON_AMIR_BACKEND, the same scripts as on GPU clusters.
(tests/test_slurm_launch.py covers the same scripts with stand-ins, fast.)
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_harness import slurm_cluster  # noqa: E402,F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = "configs/demo_tiny.yaml"

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

# A smaller cut of the demo: 2 prompts x G=4, 8 new tokens, 2 layers: a step is a few seconds on CPU.
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "data.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8", "train.micro_batch_size=4",
    "data.synthetic.num_train=64", "data.synthetic.num_test=8", "eval.max_problems=4",
    "logging.tensorboard=false", "logging.progress=false",
]


def env(tmp: Path, **extra: str) -> dict[str, str]:
    return {"MEGATRON_AMIR_PYTHON": PY, "MEGATRON_AMIR_LOG_ROOT": str(tmp / "logs"),
            "MEGATRON_AMIR_BACKEND": "gloo", "OMP_NUM_THREADS": "1", **extra}


def run_args(tmp: Path, steps: int, save_interval: int) -> list[str]:
    return [CONFIG, *TINY, f"train.steps={steps}", f"checkpoint.save_interval={save_interval}",
            f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/run"]


def metrics(tmp: Path) -> list[dict]:
    p = tmp / "run" / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def checkpoint_steps(tmp: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (tmp / "ckpt").glob("step_*") if p.is_dir())


def test_train_sbatch_two_tasks_trains_and_checkpoints(slurm_cluster, tmp_path):
    res = slurm_cluster.sbatch_wait(
        ["-N", "2", "-n", "2", "-t", "20", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
         *run_args(tmp_path, steps=2, save_interval=1)], timeout=600, env=env(tmp_path), cwd=str(ROOT))
    job = int(res.stdout.strip().split(";")[0])
    d = tmp_path / "logs" / f"amir-train-{job}"
    assert res.returncode == 0, "\n".join(p.read_text()[-3000:] for p in sorted(d.glob("*.log")))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]
    assert checkpoint_steps(tmp_path)[-1] == 2
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith("step_00000002")
    assert {"batch.log", "rank-0.log", "rank-1.log", "job.env", "config.yaml"} <= {p.name for p in d.iterdir()}
    assert "steps: 2" in (d / "config.yaml").read_text()  # the resolved config, overrides applied


def test_hetjob_trainer_with_embedded_rollout_server(slurm_cluster, tmp_path):
    e = env(tmp_path, MEGATRON_AMIR_FLEET_ENGINE="embedded", MEGATRON_AMIR_FLEET_READY_TIMEOUT="300")
    job = slurm_cluster.sbatch(["-t", "20", f"--output={tmp_path}/slurm-%j.out", "slurm/amir_hetjob.sbatch",
                                *run_args(tmp_path, steps=3, save_interval=100), "algorithm.amir.enabled=true"],
                               env=e, cwd=str(ROOT))
    res = slurm_cluster.wait_done(job, timeout=600)
    d = tmp_path / "logs" / f"amir-hetjob-{job}"
    assert (res.state, res.exit_code) == ("COMPLETED", 0), \
        "\n".join(p.read_text()[-3000:] for p in sorted(d.glob("*.log")))
    rows = metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(any(k.startswith("amir") for k in m) for m in rows)  # AMIR-GRPO ran (pair metrics logged)
    assert all(m["weight_version"] == m["step"] for m in rows)  # weights pushed to the server every step
    fleet_log = (d / "fleet-0.log").read_text()
    assert "registered" in fleet_log and "removed" in fleet_log
    assert "MEGATRON_AMIR_TOKEN" not in (d / "job.env").read_text()


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    steps = 60  # a step of this tiny model takes ~0.1 s: enough of them that the signal lands mid-run
    job = slurm_cluster.sbatch(["-N", "2", "-n", "2", "-t", "20", f"--output={tmp_path}/slurm-%j.out",
                                "slurm/train.sbatch", *run_args(tmp_path, steps=steps, save_interval=100)],
                               env=env(tmp_path), cwd=str(ROOT))
    deadline = time.time() + 400
    while not metrics(tmp_path):  # the first step is done: the trainer is in its loop
        assert time.time() < deadline, slurm_cluster.logs_tail()
        time.sleep(0.5)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    res = slurm_cluster.wait_done(job, timeout=600)
    d = tmp_path / "logs" / f"amir-train-{job}"
    rank0 = (d / "rank-0.log").read_text()
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), rank0[-4000:]
    m = re.search(r"checkpointed step (\d+), exiting with 75", rank0)
    assert m, rank0[-4000:]
    k = int(m.group(1))
    assert 1 <= k < steps
    assert re.search(rf"resumed from \S+ at step {k}\b", rank0), rank0[-4000:]
    assert k in checkpoint_steps(tmp_path) and checkpoint_steps(tmp_path)[-1] == steps
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, steps + 1))  # no step lost or repeated
    batch = (d / "batch.log").read_text()
    assert "scontrol requeue" in batch and "restart 1" in batch
