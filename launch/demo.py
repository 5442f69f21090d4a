"""The embedded CPU demo: warm-up -> GRPO and AMIR-GRPO from the same checkpoint -> held-out eval -> report.

    python -m launch.demo [--quick] [--out runs/demo] [--seed 1234]

Each phase is a `megatron-amir` command run as a subprocess (exactly what a user would type; the commands are
printed and logged), so every phase has its own run directory with config.yaml, metrics.jsonl, TensorBoard
events, checkpoints and eval results. A phase whose outputs already exist is skipped, so an interrupted demo
resumes where it stopped. The report (report.md + PNGs) is built only from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from megatron_amir.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"

# (full, quick) settings of each phase. The full warm-up stops once greedy accuracy on 256 validation problems
# (disjoint from the training and the held-out test problems) reaches warmup_target, or after warmup_steps: greedy
# accuracy is a function of the weights alone (no sampling noise: on 256 problems a sampled estimate near 0.3 has
# a standard deviation of 0.03, as large as the effect of a few hundred steps), and the budget is several times
# what a fast machine needs, so a slow learner (another CPU's float kernels) still reaches the target. The LR is
# constant, so a larger budget does not change the steps before the stop. --quick is a fast end-to-end check of
# the pipeline: a fixed short warm-up with no target; its numbers are not the demo's.
PLAN = {
    "warmup_steps": (6000, 250),
    "warmup_target": (0.3, None),  # greedy accuracy on warmup_eval_problems validation problems
    "warmup_eval_problems": (256, 32),
    "warmup_eval_every": (100, 125),
    "rl_steps": (120, 8),
    "eval_problems": (200, 48),
    "eval_samples": (4, 2),
}


def _phase_cmd(sub: str, overrides: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", sub, str(CONFIG), *overrides, *extra]


def _run(cmd: list[str], log_path: Path, env: Optional[dict] = None) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd[2:]).replace("launch.cli", "megatron-amir", 1),
          flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if _interesting(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"demo: phase failed with exit code {code}; full log: {log_path}")


def _interesting(line: str) -> bool:
    return any(s in line for s in (" INFO megatron_amir", "ERROR", "Error", "error:", "warm-up step", "Traceback"))


def _latest_step_dir(ckpt_root: Path) -> Optional[Path]:
    from megatron_amir.training.checkpoint import CheckpointManager

    return CheckpointManager(ckpt_root).latest_good()


def claim_out_dir(recorded: Path, settings: dict[str, Any], prog: str, what: str) -> bool:
    """Record ``settings`` in ``recorded`` (in the output directory), or refuse (False, with a message) when it holds
    other ones: finished phases are reused on a re-run, so only if they were made with these settings."""
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        print(f"{prog}: {recorded.parent} holds {what} with other settings ({recorded.read_text().strip()}); "
              "use another --out or delete it", file=sys.stderr)
        return False
    atomic_write_text(recorded, json.dumps(settings, sort_keys=True) + "\n")
    return True


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="launch/demo.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a ~3 minute end-to-end check (fewer steps and problems); its numbers are not the demo's")
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the warm-up (initialization, batch order) and of both RL runs")
    p.add_argument("--async-rollouts", type=int, default=None, metavar="K",
                   help="RL runs with asynchronous rollouts, at most K weight versions stale (default: synchronous)")
    a = p.parse_args(argv)
    q = 1 if a.quick else 0
    plan = {k: v[q] for k, v in PLAN.items()}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # finished phases are reused on a re-run: only if they were made with these settings
    settings = {"quick": bool(q), "seed": a.seed, "plan": plan}
    if a.async_rollouts is not None:
        settings["async_rollouts"] = a.async_rollouts
    if not claim_out_dir(out / "demo_settings.json", settings, "launch/demo.sh", "a demo run"):
        return 2
    from launch.demo_report import environment_record

    env_path = out / "environment.json"  # of the first attempt: a resumed run keeps the phases it made
    if not env_path.is_file():
        atomic_write_text(env_path, json.dumps(environment_record(ROOT, a.seed), indent=1) + "\n")
    t0 = time.time()
    print(f"megatron-amir demo ({'quick' if q else 'full'}) -> {out}", flush=True)
    common = [f"train.seed={a.seed}", f"eval.max_problems={plan['eval_problems']}",
              f"eval.samples={plan['eval_samples']}"]
    async_rl = [] if a.async_rollouts is None else [  # the off-policy correction async needs (docs/algorithms.md)
        "rollout.async_off_policy=true", f"rollout.max_staleness={a.async_rollouts}", "algorithm.tis_cap=2.0"]
    timings_path = out / "timings.json"  # phases finished by an earlier, interrupted attempt keep their times
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(phase: str, since: float) -> None:
        timings[phase] = time.time() - since
        atomic_write_text(timings_path, json.dumps(timings, indent=1) + "\n")

    # 1) supervised warm-up from random init until the model solves part of the problems
    warm = out / "warmup"
    warm_ckpt = _latest_step_dir(warm / "checkpoints")
    if warm_ckpt is None:
        t = time.time()
        target = [] if plan["warmup_target"] is None else [
            "--target-accuracy", str(plan["warmup_target"]), "--target-metric", "greedy"]
        _run(_phase_cmd("sft", [*common, f"logging.dir={warm}", f"checkpoint.dir={warm / 'checkpoints'}",
                                "train.lr=3e-3", "train.adam_beta2=0.98", "train.weight_decay=0.01",
                                f"train.steps={plan['warmup_steps']}", "train.micro_batch_size=64"],
                        ["--steps", str(plan["warmup_steps"]), "--batch-size", "64",
                         "--eval-every", str(plan["warmup_eval_every"]),
                         "--eval-problems", str(plan["warmup_eval_problems"]), *target]),
             out / "logs" / "warmup.log")
        timed("warm-up", t)
        warm_ckpt = _latest_step_dir(warm / "checkpoints")
    assert warm_ckpt is not None, "warm-up wrote no checkpoint"

    # 2) GRPO and AMIR-GRPO from the same checkpoint with the same seeds
    runs = {"GRPO": ["algorithm.amir.enabled=false"], "AMIR-GRPO": ["algorithm.amir.enabled=true"]}
    for label, extra in runs.items():
        run_dir = out / label.lower()
        if (run_dir / "eval" / "DONE").exists():
            continue
        t = time.time()
        _run(_phase_cmd("train", [*common, *async_rl, *extra, f"name={label}", f"logging.dir={run_dir}",
                                  f"checkpoint.dir={run_dir / 'checkpoints'}", f"train.steps={plan['rl_steps']}",
                                  f"checkpoint.save_interval={max(1, plan['rl_steps'] // 4)}"],
                        ["--init-from", str(warm_ckpt), "--eval-at-start", "--eval-at-end"]),
             out / "logs" / f"{label.lower()}.log")
        (run_dir / "eval" / "DONE").write_text("ok\n")
        timed(label, t)

    # 3) report
    from launch.demo_report import write_demo_report

    if len(timings) > 0 and "total" not in timings and all(k in timings for k in ("warm-up", *runs)):
        timings["total"] = sum(timings[k] for k in ("warm-up", *runs))  # phase times: resumes don't count idle gaps
        atomic_write_text(timings_path, json.dumps(timings, indent=1) + "\n")
    report = write_demo_report(out, labels=list(runs), timings=timings, seed=a.seed, quick=bool(q), plan=plan)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
