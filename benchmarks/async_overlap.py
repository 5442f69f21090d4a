"""Asynchronous rollouts: trainer step wall time with ``rollout.async_off_policy`` (k = 1) over the synchronous
loop, the fleet in separate processes.

Two embedded rollout servers (``python -m megatron_amir.rollout.server``, one CPU thread each) serve the remote
fleet; the trainer (``megatron-amir train``, engine=remote, no router) runs ``--steps`` steps synchronously, then the
same run with async k = 1, each against freshly started servers; ``--rounds`` times, alternating, so both modes
see the same machine load. The model and batch are sized so that generation and the train step take about the
same time (the synchronous rows print both): then the ideal async step is half the synchronous one. Step time =
mean of ``time/step_s`` after the first ``--skip`` steps (start-up, first weight push): the throughput (an async
step alternates between waiting and not, so a median or minimum would flatter it); the ratio compares the best
round of each mode (the round least disturbed by other jobs). On a machine with fewer free cores than the trainer and the servers need, generation and training
compete for CPU and the ratio stays nearer 1: the overlap needs the fleet on its own hardware, as on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"
TOKEN = "async-overlap-bench"


def overrides(args) -> list[str]:
    return [f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={3 * args.hidden}",
            f"model.num_layers={args.layers}", f"data.prompts_per_step={args.prompts}", "rollout.group_size=8",
            f"rollout.max_new_tokens={args.tokens}", f"train.micro_batch_size={args.prompts * 8}",
            f"train.steps={args.steps}", "checkpoint.save_interval=100000", "logging.progress=false",
            "logging.tensorboard=false", "algorithm.tis_cap=2.0", "train.lr=1e-4"]


def write_start_snapshot(cfg_overrides: list[str], root: Path) -> Path:
    """A snapshot with the architecture the trainer will push (random weights: the trainer replaces them at
    start), so the servers start with the right model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_amir.config import load_config
    from megatron_amir.rollout.weight_sync import write_snapshot
    from megatron_amir.training.data_setup import bind_vocab, build_data, rollout_hf_config

    cfg = load_config(str(CONFIG), cfg_overrides)
    tokenizer, _, _ = build_data(cfg)
    bind_vocab(cfg, tokenizer)
    hf = rollout_hf_config(cfg, tokenizer)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    return write_snapshot({k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}, root, 0,
                          hf_config=hf)


def start_servers(snapshot: Path, weights_root: Path, work: Path, n: int) -> tuple[list, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MEGATRON_AMIR_TOKEN": TOKEN}
    procs, urls = [], []
    for i in range(n):
        port_file = work / f"port{i}"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "megatron_amir.rollout.server", "--snapshot", str(snapshot), "--port", "0",
               "--port-file", str(port_file), "--weights-root", str(weights_root), "--threads", "1"]
        procs.append(subprocess.Popen(cmd, stdout=open(work / f"server{i}.log", "ab"), stderr=subprocess.STDOUT,
                                      env=env, cwd=ROOT))
    deadline = time.monotonic() + 300
    for i, p in enumerate(procs):
        while not (work / f"port{i}").exists():
            if p.poll() is not None or time.monotonic() > deadline:
                stop(procs)
                raise RuntimeError(f"server {i} did not start: {(work / f'server{i}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        urls.append((work / f"port{i}").read_text().strip())
    return procs, urls


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def run(name: str, args, base: list[str], extra: list[str], work: Path, snapshot: Path) -> list[dict]:
    weights_root = work / "weights"
    procs, urls = start_servers(snapshot, weights_root, work, args.servers)
    try:
        run_dir = work / name
        cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *base, *extra, "rollout.engine=remote",
               f"rollout.servers=[{','.join(urls)}]", "rollout.use_router=false",
               f"rollout.weight_sync_dir={weights_root / name}", f"logging.dir={run_dir}",
               f"checkpoint.dir={run_dir / 'ckpt'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_AMIR_TOKEN": TOKEN}
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        stop(procs)


def mean(rows: list[dict], key: str, skip: int) -> float:
    return statistics.fmean(r[key] for r in rows[skip:] if key in r)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (8 samples each)")
    ap.add_argument("--tokens", type=int, default=48, help="rollout.max_new_tokens")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="sync, async, sync, async, ...")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)
    base = overrides(args)
    work = Path(args.dir or tempfile.mkdtemp(prefix="async-overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    snapshot = write_start_snapshot(base, work / "weights" / "start")
    step = lambda rows: mean(rows, "time/step_s", args.skip)  # noqa: E731
    syncs, asyncs = [], []
    for i in range(args.rounds):
        syncs.append(run(f"sync{i}", args, base, [], work, snapshot))
        asyncs.append(run(f"async{i}", args, base, ["rollout.async_off_policy=true", "rollout.max_staleness=1"],
                          work, snapshot))
        print(f"round {i}: sync step {step(syncs[-1]):.3f} s, async step {step(asyncs[-1]):.3f} s", flush=True)
    sync, asyn = min(syncs, key=step), min(asyncs, key=step)
    s_step, a_step = step(sync), step(asyn)
    print(f"sync : step {s_step:.3f} s (rollout {mean(sync, 'time/rollout_s', args.skip):.3f} s, "
          f"train {mean(sync, 'time/train_s', args.skip) + mean(sync, 'time/logprob_s', args.skip):.3f} s, "
          f"weight sync {mean(sync, 'time/weight_sync_s', args.skip):.3f} s)")
    print(f"async: step {a_step:.3f} s (trainer idle {mean(asyn, 'time/trainer_idle_s', args.skip):.3f} s, "
          f"fleet idle {mean(asyn, 'time/fleet_idle_s', args.skip):.3f} s, "
          f"generate {mean(asyn, 'time/generate_s', args.skip):.3f} s; staleness max "
          f"{max(r['staleness/max'] for r in asyn):.0f})")
    ratio = a_step / s_step
    print(f"async_overlap: ratio={ratio:.3f} (goal 0.65)")
    return ratio


if __name__ == "__main__":
    main()
