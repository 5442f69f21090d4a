"""Build ``<out>/report.md`` of the embedded demo from its run directories (nothing is typed in by hand).

Reads: warmup/metrics.jsonl, the warm-up checkpoint's meta.json (where and why it stopped), <run>/metrics.jsonl,
<run>/eval.jsonl, <run>/eval/{initial,final}_stepN.jsonl, <run>/eval/greedy/*.jsonl, environment.json and the
expected ranges (launch/demo_expected.json). Writes: plots/*.png, compare/ (coverage, margins, bootstrap CIs;
report.md of its own), report.md (atomically, last).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_amir.fileio import atomic_write_text
from megatron_amir.training.metrics import read_metrics


EXPECTED = Path(__file__).with_name("demo_expected.json")
MODELS = ("warm-up", "GRPO", "AMIR-GRPO")
METRICS = ("greedy_accuracy", "pass@1", "pass@4")


def environment_record(root: Path, seed: int) -> dict[str, Any]:
    """What shapes the demo's numbers besides the code: float kernels (torch build, CPU capability, MKL), thread
    count (the reduction order of matmuls), the commit and the seed."""
    mkl = re.search(r"Math Kernel Library Version ([0-9.]+)", torch.__config__.show())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "mkl": mkl.group(1) if mkl else None, "cpus": os.cpu_count(), "commit": commit,
            "uncommitted_changes": dirty, "seed": seed}


def load_expected(path: Path = EXPECTED) -> dict[str, Any]:
    """The checked-in expected ranges: {"plan": {...}, "ranges": {model: {metric: [lo, hi]}}, "runs": [...]}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the expected ranges: {e}") from e
    for key in ("plan", "ranges", "runs"):
        if key not in data:
            raise ValueError(f"{path}: missing field '{key}'")
    for model, metrics in data["ranges"].items():
        for metric, r in metrics.items():
            ok = isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and r[0] <= r[1]
            if not ok:
                raise ValueError(f"{path}: ranges.{model}.{metric} must be [lo, hi] with lo <= hi, got {r!r}")
    return data


def range_rows(numbers: dict[str, dict[str, Any]], ranges: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """One row per (model, metric) with a range: this run's value, the range and whether the value lies in it
    (None when this run has no such number). Values are compared as the report prints them (3 decimals)."""
    rows = []
    for model, metrics in ranges.items():
        for metric, (lo, hi) in metrics.items():
            v = numbers.get(model, {}).get(metric)
            inside = None if not isinstance(v, (int, float)) else lo <= round(v, 3) <= hi
            rows.append({"model": model, "metric": metric, "value": v, "lo": lo, "hi": hi, "inside": inside})
    return rows


def warmup_stop(out: Path) -> Optional[dict[str, Any]]:
    """Where the warm-up stopped and why, from its checkpoint's meta.json (None without one)."""
    from megatron_amir.training.checkpoint import CheckpointManager

    ckpt = CheckpointManager(out / "warmup" / "checkpoints").latest_good()
    if ckpt is None:
        return None
    meta = CheckpointManager.read_meta(ckpt)
    final, stop = meta.get("final", {}), meta.get("stop", {})
    metric = stop.get("target_metric", "sampled")
    return {"step": int(meta["step"]), "reached": bool(final.get("sft/target_reached")), "target": stop.get(
        "target_accuracy"), "metric": metric, "budget": stop.get("step_budget"), "problems": stop.get("eval_problems"),
        "accuracy": final.get(f"eval/{metric}_accuracy")}


def _stop_sentence(w: dict[str, Any]) -> str:
    acc = _fmt(w["accuracy"])
    if w["target"] is None:
        return f"Ran its fixed {w['step']} steps (no accuracy target); {w['metric']} accuracy {acc}"
    where = f"{w['metric']} accuracy on {w['problems']} validation problems"
    if w["reached"]:
        return f"**Target reached at step {w['step']}** of {w['budget']}: {where} {acc} >= {w['target']}"
    return f"**Step budget exhausted at step {w['step']}**: {where} {acc} < target {w['target']}"



def _eval_file(run_dir: Path, tag: str, greedy: bool = False) -> Optional[Path]:
    d = run_dir / "eval" / ("greedy" if greedy else "")
    files = sorted(d.glob(f"{tag}_step*.jsonl"))
    return files[-1] if files else None


def _evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{'initial': {...}, 'final': {...}} from the run's eval.jsonl (keys without the tag prefix)."""
    out: dict[str, dict[str, Any]] = {}
    path = run_dir / "eval.jsonl"
    if path.exists():
        for row in read_metrics(path):
            for k, v in row.items():
                if "/" in k:
                    tag, name = k.split("/", 1)
                    out.setdefault(tag, {})[name] = v
    return out


def _fmt(v: Any, d: int = 3) -> str:
    return f"{v:.{d}f}" if isinstance(v, (int, float)) else "–"


def _mean_last(rows: list[dict[str, Any]], key: str, n: int = 5) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals[-n:]) / len(vals[-n:]) if vals else None


def write_demo_report(out: Path, labels: list[str], timings: dict[str, float], seed: int, quick: bool,
                      plan: Optional[dict[str, Any]] = None, expected_path: Path = EXPECTED) -> Path:
    from megatron_amir.eval import plots as P
    from megatron_amir.eval.compare import compare_runs, load_run, write_report

    out = Path(out)
    runs = {lab: out / lab.lower() for lab in labels}
    evals = {lab: _evals(d) for lab, d in runs.items()}
    metrics = {lab: read_metrics(d / "metrics.jsonl") for lab, d in runs.items()}
    warm_rows = read_metrics(out / "warmup" / "metrics.jsonl") if (out / "warmup" / "metrics.jsonl").exists() else []

    # plots from the metrics files
    plot_dir = out / "plots"
    curves = {f"RL: {k}": v for k, v in P.plot_training_curves(
        {lab: d / "metrics.jsonl" for lab, d in runs.items()}, plot_dir, smooth_window=3).items()}
    if warm_rows:
        curves.update({f"warm-up: {k}": v for k, v in P.plot_training_curves(
            {"warm-up": out / "warmup" / "metrics.jsonl"}, plot_dir, prefix="warmup_",
            panels={"loss": {"title": "Supervised warm-up loss", "ylabel": "NLL / token", "lines": {"": ["sft/loss"]}},
                    "accuracy": {"title": "Warm-up held-out accuracy", "ylabel": "accuracy",
                                 "lines": {"greedy": ["eval/greedy_accuracy"], "sampled": ["eval/sampled_accuracy"]}}}).items()})

    # coverage / margins / CIs: base = the shared starting checkpoint (identical in both runs), A = GRPO, B = AMIR
    base_file = _eval_file(runs[labels[0]], "initial")
    compare_data = None
    if base_file and all(_eval_file(d, "final") for d in runs.values()):
        compare_data = compare_runs(load_run(_eval_file(runs[labels[0]], "final"), labels[0]),
                                    load_run(_eval_file(runs[labels[1]], "final"), labels[1]),
                                    load_run(base_file, "warm-up"), seed=seed)
        write_report(compare_data, out / "compare")

    L = [f"# megatron-amir embedded demo ({'quick' if quick else 'full'} run)", ""]
    if quick:
        L += ["**Quick run: a fast end-to-end check of the pipeline (short warm-up, 8 RL steps, 48 problems). Its "
              "numbers are not the demo's and are not compared with the README's ranges.**", ""]
    L += [
         "A tiny Llama-style Megatron-Core model, trained from scratch on the synthetic scratchpad-arithmetic task "
         "(supervised warm-up), then **GRPO** and **AMIR-GRPO** from that same checkpoint with the same seed "
         f"({seed}), evaluated on the same held-out problems. Every number below is read from the run directories "
         f"under `{out}`.", ""]
    init = evals[labels[0]].get("initial", {})
    L += ["## Held-out results", "",
          "| model | greedy acc. | pass@1 | " + " | ".join(
              f"pass@{k}" for k in _ks(init)) + " | len. correct | len. incorrect | log-prob margin (median) |",
          "|---" * (6 + len(_ks(init))) + "|"]

    def row(name: str, e: dict[str, Any]) -> str:
        return (f"| {name} | {_fmt(e.get('greedy_accuracy'))} | {_fmt(e.get('pass@1'))} | "
                + " | ".join(_fmt(e.get(f"pass@{k}")) for k in _ks(init))
                + f" | {_fmt(e.get('length_correct'), 1)} | {_fmt(e.get('length_incorrect'), 1)} | "
                  f"{_fmt(e.get('logprob_margin_median'), 4)} |")

    L.append(row("warm-up (start of RL)", init))
    for lab in labels:
        L.append(row(lab, evals[lab].get("final", {})))
    L.append("")
    for lab in labels:
        i, f = evals[lab].get("initial", {}), evals[lab].get("final", {})
        if "pass@1" in i and "pass@1" in f:
            L.append(f"- {lab}: held-out pass@1 {i['pass@1']:.3f} → {f['pass@1']:.3f} "
                     f"({f['pass@1'] - i['pass@1']:+.3f}); greedy {_fmt(i.get('greedy_accuracy'))} → "
                     f"{_fmt(f.get('greedy_accuracy'))}")
    numbers = {"warm-up": init, **{lab: evals[lab].get("final", {}) for lab in labels}}
    L += _expected_section(numbers, quick, plan, expected_path)
    if compare_data is not None:
        L += ["", "## RL gain over the warm-up (paired bootstrap over problems)", "",
              "| run | pass@1 − warm-up | 95% CI | CI excludes zero |", "|---|---|---|---|"]
        for lab in labels:
            ci = compare_data["pass_at_k_differences"].get(f"{lab} - warm-up", {}).get(1)
            if ci:
                L.append(f"| {lab} | {ci['estimate']:+.3f} | [{ci['lo']:+.3f}, {ci['hi']:+.3f}] | "
                         f"{'yes' if ci['lo'] > 0 or ci['hi'] < 0 else 'no'} |")
    w = warmup_stop(out)
    if w is not None:
        L += ["", "## Warm-up: where it stopped and why", "", f"{_stop_sentence(w)}.", ""]
    L += ["", "## Training (last 5 steps, mean)", "",
          "| run | train accuracy | pair count | pair accuracy | λ | log-prob gap correct−incorrect | step time (s) |",
          "|---|---|---|---|---|---|---|"]
    for lab in labels:
        m = metrics[lab]
        L.append(f"| {lab} | {_fmt(_mean_last(m, 'reward/accuracy'))} | {_fmt(_mean_last(m, 'amir/pair_count'), 1)} | "
                 f"{_fmt(_mean_last(m, 'amir/pair_accuracy'))} | {_fmt(_mean_last(m, 'amir/lambda'), 4)} | "
                 f"{_fmt(_mean_last(m, 'amir/logprob_gap_correct_incorrect'), 4)} | {_fmt(_mean_last(m, 'time/step_s'), 2)} |")
    L += ["", "For GRPO the pair statistics are measured but not trained on (λ is 0 in its loss).", ""]
    if curves:
        L += ["## Plots", ""]
        for name, path in curves.items():
            L.append(f"![{name}]({Path(path).relative_to(out)})")
        L.append("")
    if compare_data is not None:
        L += ["## Coverage, separation and confidence intervals", "",
              f"Full comparison (coverage table as in the paper's Table 2, margin distribution as its Figure 4, "
              f"paired bootstrap CIs): [compare/report.md](compare/report.md).", ""]
        L += ["| " + " | ".join(compare_data["runs"]) + " | problems |", "|---" * (len(compare_data["runs"]) + 1) + "|"]
        for r in compare_data["coverage"]:
            L.append("| " + " | ".join("solved" if r["pattern"][lab] else "-" for lab in compare_data["runs"])
                     + f" | {r['expected_problems']:.1f} |")
        L.append("")
    if timings:
        L += ["## Wall time", "", "| phase | seconds |", "|---|---|"]
        L += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        L.append("")
    env_path = out / "environment.json"
    if env_path.is_file():
        env = json.loads(env_path.read_text())
        L += ["## Environment (what shapes the numbers besides the code)", "", "| | |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in env.items()]
        L.append("")
    L += ["## Reading it honestly", "",
          "This is a ~1M-parameter model on 2 CPU cores, one seed. Float kernels differ across CPUs, instruction "
          "sets and thread counts, and training amplifies the last-bit differences: compare this run with the "
          "ranges above, not with one run's digits. Differences between GRPO and AMIR-GRPO of a "
          "few points are within seed noise (see the bootstrap intervals in compare/report.md and the multi-seed "
          "study in docs/results.md). What the demo does show is the full pipeline: Megatron-Core policy, embedded "
          "rollouts, verifiable rewards, the AMIR pair term, checkpoints, evaluation and this report.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L))
    (out / "summary.json").write_text(json.dumps({lab: evals[lab] for lab in labels}, indent=1))
    return path


def _ks(e: dict[str, Any]) -> list[int]:
    return sorted(int(k.split("@")[1]) for k in e if k.startswith("pass@") and k != "pass@1")


def _expected_section(numbers: dict[str, dict[str, Any]], quick: bool, plan: Optional[dict[str, Any]],
                      expected_path: Path) -> list[str]:
    L = ["", "## This run against the README's expected ranges", ""]
    if quick:
        return L + ["Not compared: a quick run's numbers are not the demo's."]
    try:
        exp = load_expected(expected_path)
    except ValueError as e:
        return L + [f"Not compared: {e}"]
    if plan is not None and exp["plan"] != plan:
        return L + [f"Not compared: this run's settings differ from those the ranges were measured with "
                    f"({expected_path.name}: {json.dumps(exp['plan'], sort_keys=True)})."]
    rows = range_rows(numbers, exp["ranges"])
    if not rows:
        return L + [f"Not compared: {expected_path.name} holds no ranges yet."]
    envs = sorted({f"{r.get('cpu_capability')}, {r.get('threads')} thread(s)" for r in exp["runs"]})
    L += [f"Ranges: min–max over {len(exp['runs'])} full runs (seeds "
          f"{', '.join(str(r.get('seed')) for r in exp['runs'])}; {'; '.join(envs)}), widened by "
          f"{exp.get('margin', 0)} on each side, from `launch/{expected_path.name}`.",
          "", "| model | metric | this run | expected range | |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = {True: "inside", False: "**outside**", None: "–"}[r["inside"]]
        L.append(f"| {r['model']} | {r['metric']} | {_fmt(r['value'])} | {r['lo']:.3f}–{r['hi']:.3f} | {verdict} |")
    outside = [f"{r['model']} {r['metric']}" for r in rows if r["inside"] is False]
    missing = [f"{r['model']} {r['metric']}" for r in rows if r["inside"] is None]
    L.append("")
    if outside:
        L.append(f"**This run falls OUTSIDE the expected ranges** ({', '.join(outside)}).")
    elif missing:
        L.append(f"This run lacks some numbers ({', '.join(missing)}); the others are inside the ranges.")
    else:
        L.append("**This run falls inside the expected ranges** (every number above).")
    return L


def run_record(out: Path) -> dict[str, Any]:
    """One finished full demo run as demo_expected.json lists it: environment, wall time, where the warm-up
    stopped, the held-out numbers of each model and the paired-bootstrap pass@1 gain of each RL run."""
    out = Path(out)
    env = json.loads((out / "environment.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    diffs = json.loads((out / "compare" / "compare.json").read_text())["pass_at_k_differences"]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    evals = {"warm-up": summary["GRPO"]["initial"], "GRPO": summary["GRPO"]["final"],
             "AMIR-GRPO": summary["AMIR-GRPO"]["final"]}
    missing = [f"{m} {k}" for m in MODELS for k in METRICS if not isinstance(evals[m].get(k), (int, float))]
    if missing:
        raise ValueError(f"{out}/summary.json: no {', '.join(missing)}")
    w = warmup_stop(out)
    return {**{k: env.get(k) for k in ("seed", "threads", "OMP_NUM_THREADS", "cpu_capability", "torch", "mkl",
                                       "commit")},
            "wall_s": round(timings["total"]) if "total" in timings else None,
            "warmup": None if w is None else {"step": w["step"], "target_reached": w["reached"],
                                              "accuracy": w["accuracy"]},
            "numbers": {m: {k: evals[m][k] for k in METRICS} for m in MODELS},
            "pass@1_gain_ci": {lab: diffs[f"{lab} - warm-up"]["1"] for lab in ("GRPO", "AMIR-GRPO")}}


def expected_from_runs(outs: list[Path], plan: dict[str, Any], margin: float) -> dict[str, Any]:
    """demo_expected.json from finished full runs: each range is the runs' min-max widened by ``margin``."""
    runs = [run_record(o) for o in outs]
    ranges = {}
    for m in MODELS:
        ranges[m] = {}
        for k in METRICS:
            vals = [round(r["numbers"][m][k], 3) for r in runs]
            ranges[m][k] = [round(max(0.0, min(vals) - margin), 3), round(min(1.0, max(vals) + margin), 3)]
    about = json.loads(EXPECTED.read_text())["about"] if EXPECTED.is_file() else ""
    return {"about": about, "plan": plan, "margin": margin, "ranges": ranges, "runs": runs}


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launch.demo_report record OUT [OUT ...] [--margin M]``: rewrite launch/demo_expected.json from
    finished full demo runs (their run directories)."""
    import argparse

    from launch.demo import PLAN

    p = argparse.ArgumentParser(prog="python -m launch.demo_report", description=main.__doc__)
    p.add_argument("command", choices=["record"])
    p.add_argument("outs", nargs="+", type=Path)
    p.add_argument("--margin", type=float, default=0.03)
    a = p.parse_args(argv)
    plan = {k: v[0] for k, v in PLAN.items()}
    for o in a.outs:
        settings = json.loads((o / "demo_settings.json").read_text())
        if settings.get("quick") or settings.get("plan") != plan:
            print(f"{o}: not a full demo run with the current PLAN", file=sys.stderr)
            return 2
    data = expected_from_runs(a.outs, plan, a.margin)
    atomic_write_text(EXPECTED, json.dumps(data, indent=1) + "\n")
    print(f"wrote {EXPECTED} from {len(a.outs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
