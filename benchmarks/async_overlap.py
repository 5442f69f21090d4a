"""Asynchronous rollouts: trainer step wall time with ``rollout.async_off_policy`` (k = 1) over the synchronous
loop, the fleet in separate processes.

Embedded rollout servers (``python -m megatron_amir.rollout.server``, one CPU thread each) serve the remote fleet; the
trainer (``megatron-amir train``, engine=remote, no router) runs ``--steps`` steps synchronously, then the same run with
async k = 1, each against freshly started servers; ``--rounds`` times, alternating, so both modes see the same
machine load. Rollout time ≈ train time: a short synchronous calibration run first picks ``algorithm.ppo_epochs`` (the
optimizer passes over each batch) so that log-probs + training take about as long as the rollout (``--ppo-epochs``
fixes it instead); the synchronous rows print both. Then the ideal async step is half the synchronous one. Step time =
mean of ``time/step_s`` after the first ``--skip`` steps (start-up, first weight push): the throughput (an async
step alternates between waiting and not, so a median or minimum would flatter it); the ratio compares the best
round of each mode (the round least disturbed by other jobs).

Placement. On a cluster the fleet and the trainer run on different devices, so generation and training do not
compete. The benchmark models that by pinning the trainer process (its producer thread included) to
``--trainer-cpus`` and every server to ``--fleet-cpus`` (``os.sched_setaffinity``; default: the first CPU this
process may use for the trainer, the others for the fleet), each with one intra-op thread (``OMP_NUM_THREADS=1``).
``--no-pin`` lets them share every CPU: then generation and training compete and the ratio stays nearer 1. Other
jobs on the machine still share those cores, so the load at the time is part of the setting.
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
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"
TOKEN = "async-overlap-bench"


def overrides(args, steps: int, ppo_epochs: int) -> list[str]:
    return [f"train.steps={steps}", f"algorithm.ppo_epochs={ppo_epochs}", f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={3 * args.hidden}",
            f"model.num_layers={args.layers}", f"data.prompts_per_step={args.prompts}", "rollout.group_size=8",
            f"rollout.max_new_tokens={args.tokens}", f"train.micro_batch_size={args.prompts * 8}",
            "checkpoint.save_interval=100000", "logging.progress=false",
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


def pinned(cpus: Optional[set[int]]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that restricts the child process (and every thread it starts) to ``cpus``; None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def placement(args) -> tuple[Optional[set[int]], Optional[set[int]]]:
    """(trainer CPUs, fleet CPUs) from the arguments; (None, None) with ``--no-pin``."""
    if args.no_pin:
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    trainer = parse_cpus(args.trainer_cpus) if args.trainer_cpus else {allowed[0]}
    fleet = parse_cpus(args.fleet_cpus) if args.fleet_cpus else set(allowed) - trainer
    if not fleet or trainer & fleet:
        raise SystemExit(f"async_overlap: trainer CPUs {sorted(trainer)} and fleet CPUs {sorted(fleet)} must be "
                         f"disjoint and non-empty (this process may use {allowed}; --no-pin to share them)")
    return trainer, fleet


def parse_cpus(text: str) -> set[int]:
    """'0' / '1,3' / '2-5' -> a set of CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def start_servers(snapshot: Path, weights_root: Path, work: Path, n: int,
                  cpus: Optional[set[int]] = None) -> tuple[list, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MEGATRON_AMIR_TOKEN": TOKEN}
    procs, urls = [], []
    for i in range(n):
        port_file = work / f"port{i}"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "megatron_amir.rollout.server", "--snapshot", str(snapshot), "--port", "0",
               "--port-file", str(port_file), "--weights-root", str(weights_root), "--threads", "1"]
        procs.append(subprocess.Popen(cmd, stdout=open(work / f"server{i}.log", "ab"), stderr=subprocess.STDOUT,
                                      env=env, cwd=ROOT, preexec_fn=pinned(cpus)))
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
    trainer_cpus, fleet_cpus = placement(args)
    procs, urls = start_servers(snapshot, weights_root, work, args.servers, fleet_cpus)
    try:
        run_dir = work / name
        cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *base, *extra, "rollout.engine=remote",
               f"rollout.servers=[{','.join(urls)}]", "rollout.use_router=false",
               f"rollout.weight_sync_dir={weights_root / name}", f"logging.dir={run_dir}",
               f"checkpoint.dir={run_dir / 'ckpt'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_AMIR_TOKEN": TOKEN}
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                             preexec_fn=pinned(trainer_cpus))
        if out.returncode != 0:
            raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        stop(procs)


def mean(rows: list[dict], key: str, skip: int) -> float:
    return statistics.fmean(r[key] for r in rows[skip:] if key in r)


MAX_CALIBRATED_EPOCHS = 16


def calibrate(args, work: Path, snapshot: Path, steps: int = 5) -> int:
    """``algorithm.ppo_epochs`` that makes a synchronous step's training (log-probs + e optimizer passes) take about
    as long as its rollout, from a short synchronous run in the same placement: e = round((rollout - logprob) /
    train per epoch) from the medians over the steps after the first, in [1, MAX_CALIBRATED_EPOCHS] (medians: one
    step slowed by a burst of other jobs must not set the size). Generation and training scale differently with the
    load on the machine (and the hardware), so a fixed size is balanced on one machine state only."""
    rows = run("calibrate", args, overrides(args, steps, 1), [], work, snapshot)
    rollout, logprob, train = (statistics.median(r[f"time/{k}_s"] for r in rows[1:])
                               for k in ("rollout", "logprob", "train"))
    epochs = min(MAX_CALIBRATED_EPOCHS, max(1, round((rollout - logprob) / max(train, 1e-6))))
    print(f"calibration (synchronous, {steps} steps, first left out, medians): rollout {rollout:.3f} s, log-probs "
          f"{logprob:.3f} s, train {train:.3f} s per PPO epoch -> algorithm.ppo_epochs={epochs}", flush=True)
    return epochs


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (8 samples each)")
    ap.add_argument("--tokens", type=int, default=48, help="rollout.max_new_tokens")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--servers", type=int, default=None,
                    help="rollout servers (default: one per fleet CPU; 2 with --no-pin)")
    ap.add_argument("--ppo-epochs", type=int, default=0,
                    help="algorithm.ppo_epochs (train time per step); 0: calibrated so that train ≈ rollout")
    ap.add_argument("--rounds", type=int, default=2, help="sync, async, sync, async, ...")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--trainer-cpus", default=None, help="CPUs of the trainer, e.g. '0' (default: the first allowed)")
    ap.add_argument("--fleet-cpus", default=None, help="CPUs of the servers, e.g. '1' or '1-3' (default: the rest)")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning: trainer and fleet share every CPU")
    args = ap.parse_args(argv)
    trainer_cpus, fleet_cpus = placement(args)
    if args.servers is None:
        args.servers = 2 if fleet_cpus is None else len(fleet_cpus)
    where = ("unpinned (trainer and fleet share every CPU)" if trainer_cpus is None else
             f"trainer on CPU {sorted(trainer_cpus)}, {args.servers} servers on CPU {sorted(fleet_cpus)}")
    print(f"setting: {where}, 1 intra-op thread each; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    work = Path(args.dir or tempfile.mkdtemp(prefix="async-overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    snapshot = write_start_snapshot(overrides(args, 1, 1), work / "weights" / "start")
    epochs = args.ppo_epochs or calibrate(args, work, snapshot)
    base = overrides(args, args.steps, epochs)
    step = lambda rows: mean(rows, "time/step_s", args.skip)  # noqa: E731
    syncs, asyncs = [], []
    for i in range(args.rounds):
        syncs.append(run(f"sync{i}", args, base, [], work, snapshot))
        asyncs.append(run(f"async{i}", args, base, ["rollout.async_off_policy=true", "rollout.max_staleness=1"],
                          work, snapshot))
        print(f"round {i}: sync step {step(syncs[-1]):.3f} s, async step {step(asyncs[-1]):.3f} s", flush=True)
    sync, asyn = min(syncs, key=step), min(asyncs, key=step)
    s_step, a_step = step(sync), step(asyn)
    print(f"algorithm.ppo_epochs={epochs}; {args.prompts} prompts x 8 samples, {args.tokens} new tokens")
    print(f"sync : step {s_step:.3f} s (rollout {mean(sync, 'time/rollout_s', args.skip):.3f} s, "
          f"train {mean(sync, 'time/train_s', args.skip) + mean(sync, 'time/logprob_s', args.skip):.3f} s, "
          f"weight sync {mean(sync, 'time/weight_sync_s', args.skip):.3f} s)")
    print(f"async: step {a_step:.3f} s (trainer idle {mean(asyn, 'time/trainer_idle_s', args.skip):.3f} s, "
          f"fleet idle {mean(asyn, 'time/fleet_idle_s', args.skip):.3f} s, "
          f"generate {mean(asyn, 'time/generate_s', args.skip):.3f} s; staleness max "
          f"{max(r['staleness/max'] for r in asyn):.0f})")
    ratio = a_step / s_step
    print("per-round async/sync: " + ", ".join(f"{step(a) / step(b):.3f}" for a, b in zip(asyncs, syncs)))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"async_overlap: ratio={ratio:.3f} (goal 0.65)")
    return ratio


if __name__ == "__main__":
    main()
