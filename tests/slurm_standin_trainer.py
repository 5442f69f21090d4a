"""A stand-in for ``megatron-amir train`` that exercises the launch plumbing without a model.

Run as ``python -m slurm_standin_trainer train CONFIG [overrides]`` (tests put tests/ on PYTHONPATH and set
``MEGATRON_AMIR_ENTRY=slurm_standin_trainer`` for slurm/train.sbatch). It follows the trainer's launch
contract: torch.distributed from megatron_amir.training.dist_env (gloo), preemption handlers from megatron_amir.training.preemption,
``cfg.train.steps`` steps, resume from ``cfg.checkpoint.dir``, checkpoint + exit 75 on a signal.

Each "step" is a real gloo all-reduce whose result every rank checks, so a wrong rank/world/rendezvous
fails loudly. Between steps it sleeps ``STANDIN_STEP_S`` seconds (default 0.2) so a test can signal it
mid-run; it writes ``STANDIN_RUNNING`` (a file path, if set) once the first step is done.
Rank 0 appends one JSON line per step to ``<logging.dir>/metrics.jsonl`` with the step, world size, the
step it resumed from and, with ``rollout.engine=remote``, the servers of ``rollout.discovery_file`` it
reached (``GET /whoami`` of tests/slurm_standin_server.py), or with ``STANDIN_FLEET_ENGINE=1`` the trainer's
own FleetEngine against real embedded servers: every step pushes new weights and samples from them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "train" or len(argv) < 2:
        print("usage: slurm_standin_trainer train CONFIG [overrides]", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megatron_amir.training import dist_env, preemption
    from megatron_amir.config import load_config

    cfg = load_config(argv[1], argv[2:])
    d = dist_env.init_process_group(cfg.parallel, timeout_s=120)
    handler = preemption.install_handlers()
    rank, world = d.rank, d.world_size
    ckpt = Path(cfg.checkpoint.dir) / "latest.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.is_file() else 0
    logdir = Path(cfg.logging.dir)
    if rank == 0:
        logdir.mkdir(parents=True, exist_ok=True)
    print(f"rank {rank}/{world} local {d.local_rank} node {d.node_rank} launcher {d.launcher} "
          f"master {d.master_addr}:{d.master_port} host {os.environ.get('SLURMD_NODENAME', '?')} "
          f"backend {dist.get_backend()} resume_from {start}", flush=True)

    def save(step: int) -> None:
        dist.barrier()
        if rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, ckpt)
        dist.barrier()

    servers = []
    fleet = None
    if cfg.rollout.engine == "remote" and rank == 0 and os.environ.get("STANDIN_FLEET_ENGINE") == "1":
        # the trainer's own remote path against real embedded servers: FleetEngine (router + discovery
        # watcher + file weight sync with the job's token), weights pushed and sampled every step
        from launch.fleet_seed import rollout_hf_config_of
        from megatron_amir.rollout.client import FleetEngine

        hf_config = rollout_hf_config_of(cfg)
        fleet = FleetEngine.from_config(cfg.rollout, hf_config=hf_config)
        servers = [{"url": u, "vllm_version": _vllm_version(u)} for u in fleet.client.servers]
        print(f"fleet engine over {servers}", flush=True)
    elif cfg.rollout.engine == "remote" and rank == 0:  # the hetjob wiring: reach every registered server
        import urllib.request

        from launch.fleet_member import read_discovery_file

        for url in read_discovery_file(cfg.rollout.discovery_file):
            with urllib.request.urlopen(url + "/whoami", timeout=10) as r:
                servers.append({"url": url, **json.loads(r.read())})
        if not servers:
            raise RuntimeError(f"no servers in {cfg.rollout.discovery_file}")
        print(f"rollout servers: {servers}", flush=True)

    step = start
    running_flag = os.environ.get("STANDIN_RUNNING")
    while step < cfg.train.steps:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        expect = world * (world + 1) / 2
        if t.item() != expect:
            raise RuntimeError(f"all_reduce gave {t.item()}, expected {expect}")
        time.sleep(float(os.environ.get("STANDIN_STEP_S", "0.2")))
        step += 1
        fleet_info = {}
        if fleet is not None:
            fleet_info = _fleet_step(fleet, hf_config, step)
        if rank == 0:
            with open(logdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world_size": world, "resumed_from": start,
                                    "allreduce": t.item(), "servers": servers, **fleet_info}) + "\n")
            if running_flag and step == start + 1:
                Path(running_flag).write_text(str(step))
        if handler.should_stop():
            save(step)
            print(f"rank {rank}: preempted, checkpointed step {step}", flush=True)
            preemption.exit_for_requeue()
    save(step)
    if fleet is not None:
        fleet.close()
    print(f"rank {rank}: done at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


def _vllm_version(url: str):
    """What stock vLLM answers on GET /version; None from a server without that route (our embedded one)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/version", timeout=30) as r:
            return json.loads(r.read()).get("version")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _fleet_step(fleet, hf_config, step: int) -> dict:
    """Push fresh random weights as version ``step`` (what the trainer does after each update), then sample
    a group and check every sample was generated by that version."""
    import torch

    from megatron_amir.rollout.engine import SamplingParams
    from megatron_amir.rollout.hf_model import CausalLM

    torch.manual_seed(step)
    model = CausalLM(hf_config)
    names = model.expected_names()
    fleet.load_weights({k: v for k, v in model.state_dict().items() if k in names}, step)
    groups = fleet.generate([[1, 2, 3, 4]], SamplingParams(temperature=1.0, max_new_tokens=4, seed=step), n=2)
    versions = sorted({s.weight_version for g in groups for s in g.samples})
    if versions != [step]:
        raise RuntimeError(f"samples came from weight versions {versions}, expected [{step}]")
    return {"sample_versions": versions, "sample_lengths": [len(s.token_ids) for s in groups[0].samples]}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
