"""The reproduction study report: several algorithms x several seeds, one markdown file with tables and plots.

    python -m megatron_amir.eval.study --run GRPO=runs/grpo_s1,runs/grpo_s2,runs/grpo_s3 \\
        --run AMIR-GRPO=runs/amir_s1,runs/amir_s2,runs/amir_s3 --base runs/warmup \\
        --reference GRPO --out docs/results_assets --report docs/results.md

Each run directory holds the evaluation results (``results.jsonl``, ``eval/results.jsonl`` or the
trainer's ``eval/*_stepN.jsonl``, highest step) and optionally the trainer's ``metrics.jsonl``.

For every algorithm: pass@k / maj@k / lengths / log-prob margin per seed and their mean and spread
over seeds. Every other algorithm is compared with the reference one on the problems all runs share:
per problem, pass@k is averaged over seeds, then a paired bootstrap over problems gives the CI of
the difference; coverage uses the seed-averaged solve probabilities (expected counts for a randomly
chosen seed and k samples). The log-prob margins of all seeds are pooled; the CI of their median is a
cluster bootstrap over problems (a drawn problem brings the margins of all its seeds, which are
correlated, so they are never resampled as independent values). The report ends with the path of every
file it read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_amir.eval.compare import (
    Run,
    cluster_bootstrap_ci,
    coverage_table,
    load_run,
    paired_bootstrap,
    run_margins,
    weighted_median,
)
from megatron_amir.eval.passk import default_ks, maj_at_k, pass_at_k
from megatron_amir.eval.results import ResultsError, atomic_write_text, eval_settings, settings_mismatch


def _parse_run_arg(s: str) -> tuple[str, list[str]]:
    if "=" not in s:
        raise ValueError(f"--run {s!r}: expected LABEL=DIR[,DIR...]")
    # the last '=' separates: labels may hold one ("AMIR-GRPO async k=1", "λ=0.2"), directories rarely do
    label, dirs = s.rsplit("=", 1)
    paths = [d for d in dirs.split(",") if d]
    if not label or not paths:
        raise ValueError(f"--run {s!r}: expected LABEL=DIR[,DIR...]")
    return label, paths


def _mean_sd(xs: list[Optional[float]], digits: int = 4) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}"


def build_study(groups: dict[str, list[str]], reference: str, base: Optional[str] = None, *, k: Optional[int] = None,
                n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    if reference not in groups:
        raise ValueError(f"--reference {reference!r} is not one of the run labels {list(groups)}")
    if base and "base" in groups:
        raise ValueError("a run label 'base' clashes with --base; rename it")
    runs = {lab: [load_run(p, f"{lab}#{i}") for i, p in enumerate(paths)] for lab, paths in groups.items()}
    base_run = load_run(base, "base") if base else None
    every = [r for rs in runs.values() for r in rs] + ([base_run] if base_run else [])
    ids = set(every[0].results)
    for r in every[1:]:
        ids &= set(r.results)
    if not ids:
        raise ValueError("the runs share no problem ids")
    ids = sorted(ids)
    n_min = min(r.results[i].n for r in every for i in ids)
    k = k or n_min
    if not 1 <= k <= n_min:
        raise ValueError(f"k={k} must be in [1, {n_min}]")
    ks = sorted(set([x for x in default_ks(n_min) if x <= k] + [k]))

    def per_problem(run: Run, kk: int) -> np.ndarray:
        return np.array([pass_at_k(run.results[i].n, run.results[i].num_correct, kk) for i in ids])

    out: dict[str, Any] = {"num_problems": len(ids), "samples_min": n_min, "k": k, "ks": ks, "reference": reference,
                           "files": {r.label: str(r.path) for r in every}, "algorithms": {},
                           "settings": {r.label: eval_settings(r.path) for r in every},
                           "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha}}
    avg: dict[str, dict[int, np.ndarray]] = {}
    for lab, rs in list(runs.items()) + ([("base", [base_run])] if base_run else []):
        seeds = []
        pooled: list[float] = []
        pooled_ids: list[str] = []  # the problem of each pooled margin: the bootstrap's cluster
        for r in rs:
            by_id = run_margins(r, ids)
            margins = list(by_id.values())
            pooled += margins
            pooled_ids += list(by_id)
            seeds.append({
                "run": r.label, "file": str(r.path),
                "pass_at_k": {kk: float(per_problem(r, kk).mean()) for kk in ks},
                "maj_at_k": {kk: float(np.mean([maj_at_k(r.results[i].answers, r.results[i].correct, kk)
                                                for i in ids])) for kk in ks},
                "len_correct": _mean_len(r, ids, True), "len_incorrect": _mean_len(r, ids, False),
                "margin_median": float(np.median(margins)) if margins else None,
                "margin_problems": len(margins), "_margins": margins,
            })
        avg[lab] = {kk: np.mean([per_problem(r, kk) for r in rs], axis=0) for kk in ks}
        # the seeds' margins of one problem are correlated: the CI resamples problems, each with all its seeds' margins
        out["algorithms"][lab] = {
            "seeds": seeds,
            "margin_pooled_median": float(np.median(pooled)) if pooled else None,
            "margin_pooled_median_ci": cluster_bootstrap_ci(pooled, pooled_ids, weighted_median, n_boot=n_boot,
                                                            seed=seed, alpha=alpha).to_json()
            if len(set(pooled_ids)) > 1 else None,
        }
    comps = {}
    for lab in runs:
        if lab == reference:
            continue
        comps[f"{lab} - {reference}"] = {kk: paired_bootstrap(avg[reference][kk], avg[lab][kk], n_boot=n_boot,
                                                               seed=seed, alpha=alpha).to_json() for kk in ks}
    out["differences"] = comps
    cov_labels = (["base"] if base_run else []) + list(runs)
    out["coverage"] = [{"pattern": pat, "expected_problems": c}
                       for pat, c in coverage_table({lab: avg[lab][k] for lab in cov_labels})]
    out["_avg"] = avg
    return out


def _mean_len(run: Run, ids: list[str], correct: bool) -> Optional[float]:
    ls = [ln for i in ids for ln, ok in zip(run.results[i].lengths, run.results[i].correct) if ok == correct]
    return float(np.mean(ls)) if ls else None


def verdict(ci: dict[str, float]) -> str:
    if ci["lo"] > 0:
        return "higher (CI excludes 0)"
    if ci["hi"] < 0:
        return "lower (CI excludes 0)"
    return "not resolved (CI covers 0)"


def render_study(data: dict[str, Any], plots: dict[str, str], title: str) -> str:
    ks, k = data["ks"], data["k"]
    L = [f"# {title}", "",
         f"{data['num_problems']} held-out problems shared by every run, at least {data['samples_min']} samples each; "
         f"pass@k is the unbiased estimator; ± is the standard deviation over seeds; CIs are "
         f"{100 * (1 - data['bootstrap']['alpha']):.0f}% bootstrap over problems "
         f"({data['bootstrap']['n_boot']} resamples, seed {data['bootstrap']['seed']}): paired, of seed-averaged "
         f"per-problem values, for differences; a cluster bootstrap (all seeds of a drawn problem together) for "
         f"the pooled margin median.",
         "", "## Accuracy", "",
         "| algorithm | seeds | " + " | ".join(f"pass@{x}" for x in ks) + " | " + " | ".join(f"maj@{x}" for x in ks)
         + " | len. correct | len. incorrect |", "|---" * (4 + 2 * len(ks)) + "|"]
    for lab, a in data["algorithms"].items():
        s = a["seeds"]
        L.append(f"| {lab} | {len(s)} | " + " | ".join(_mean_sd([x["pass_at_k"][kk] for x in s]) for kk in ks)
                 + " | " + " | ".join(_mean_sd([x["maj_at_k"][kk] for x in s]) for kk in ks)
                 + f" | {_mean_sd([x['len_correct'] for x in s], 1)} | {_mean_sd([x['len_incorrect'] for x in s], 1)} |")
    if data["differences"]:
        L += ["", f"## Differences from {data['reference']}", "",
              "| difference | " + " | ".join(f"pass@{x}" for x in ks) + " |", "|---" * (1 + len(ks)) + "|"]
        for name, d in data["differences"].items():
            L.append(f"| {name} | " + " | ".join(
                f"{d[x]['estimate']:+.4f} [{d[x]['lo']:+.4f}, {d[x]['hi']:+.4f}]" for x in ks) + " |")
        L.append("")
        for name, d in data["differences"].items():
            L.append(f"- {name}: pass@1 {verdict(d[ks[0]])}; pass@{ks[-1]} {verdict(d[ks[-1]])}.")
    if "pass_at_k" in plots:
        L += ["", f"![pass@k]({plots['pass_at_k']})"]
    labels = list(data["coverage"][0]["pattern"])
    L += ["", f"## Coverage at pass@{k}", "",
          "Expected number of problems per solve pattern for a randomly chosen seed of each algorithm.", "",
          "| " + " | ".join(labels) + " | problems |", "|---" * (len(labels) + 1) + "|"]
    for row in data["coverage"]:
        L.append("| " + " | ".join("solved" if row["pattern"][x] else "-" for x in labels)
                 + f" | {row['expected_problems']:.1f} |")
    L += ["", "## Separation of correct and incorrect chains", "",
          "Per problem with both correct and incorrect samples: mean length-normalized log-prob of correct minus "
          "incorrect samples (nats/token). The paper reports medians 0.016 (AMIR-GRPO) vs 0.006 (GRPO). "
          "The pooled median is over every seed's margins; its CI is a cluster bootstrap over problems: a resample "
          "draws problems and takes the margins of all seeds of each drawn problem together.", "",
          "| algorithm | median per seed | pooled median [CI] | problems per seed |", "|---|---|---|---|"]
    for lab, a in data["algorithms"].items():
        s = a["seeds"]
        ci = a["margin_pooled_median_ci"]
        pooled = "n/a" if a["margin_pooled_median"] is None else f"{a['margin_pooled_median']:.4f}" + (
            f" [{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci else "")
        L.append(f"| {lab} | " + ", ".join("n/a" if x["margin_median"] is None else f"{x['margin_median']:.4f}"
                                           for x in s)
                 + f" | {pooled} | " + ", ".join(str(x["margin_problems"]) for x in s) + " |")
    if "margin" in plots:
        L += ["", f"![margin]({plots['margin']})"]
    train = [p for n, p in plots.items() if n.startswith("train_")]
    if train:
        L += ["", "## Training curves", "", "Mean over seeds, band = min..max over seeds.", ""]
        L += [f"![{Path(p).stem}]({p})" for p in train]
    diff = settings_mismatch(data.get("settings", {}), ignore=("seed",))
    if diff:
        L += ["", f"**Warning: the runs were evaluated with different {', '.join(diff)}.**"]
    note = data.get("paths_note", "relative to this report")
    L += ["", "## Files", "", f"Every number above comes from these results files (paths {note}):", ""]
    for lab, path in data["files"].items():
        st = data.get("settings", {}).get(lab) or {}
        L.append(f"- {lab}: `{path}`" + (" (" + ", ".join(f"{k}={v}" for k, v in st.items()) + ")" if st else ""))
    return "\n".join(L) + "\n"


def write_study(data: dict[str, Any], groups: dict[str, list[str]], out_dir: Path, report: Path, title: str,
                paths_from: Optional[Path] = None) -> Path:
    """Plots and study.json into ``out_dir``, the markdown into ``report``. File paths in the report are relative to
    ``paths_from`` (the repository root the runs live in) or, by default, to the report's folder."""
    from megatron_amir.eval import plots as P

    out_dir.mkdir(parents=True, exist_ok=True)
    # relative, even for runs outside the report's folder: a report must not carry this machine's paths
    rel = lambda p: os.path.relpath(Path(p).resolve(), report.parent.resolve())  # noqa: E731
    src = rel if paths_from is None else (lambda p: os.path.relpath(Path(p).resolve(), Path(paths_from).resolve()))
    data = {**data, "files": {lab: src(path) for lab, path in data["files"].items()},
            "paths_note": "relative to this report" if paths_from is None else "relative to the repository root",
            "algorithms": {lab: {**a, "seeds": [{**sd, "file": src(sd["file"])} for sd in a["seeds"]]}
                           for lab, a in data["algorithms"].items()}}
    pl: dict[str, str] = {}
    curves = {lab: {kk: float(np.mean([s["pass_at_k"][kk] for s in a["seeds"]])) for kk in data["ks"]}
              for lab, a in data["algorithms"].items()}
    pl["pass_at_k"] = rel(P.plot_pass_at_k(curves, out_dir / "study_pass_at_k.png", title="pass@k (mean over seeds)"))
    margins = {lab: [m for s in a["seeds"] for m in s["_margins"]] for lab, a in data["algorithms"].items()}
    if any(margins.values()):
        pl["margin"] = rel(P.plot_margin_distribution(margins, out_dir / "study_margin.png"))
    metrics = {lab: [Path(d) / "metrics.jsonl" for d in dirs if (Path(d) / "metrics.jsonl").is_file()]
               for lab, dirs in groups.items()}
    metrics = {lab: ps for lab, ps in metrics.items() if ps}
    if metrics:
        for name, path in P.plot_training_curves(metrics, out_dir, prefix="study_train_").items():
            pl[f"train_{name}"] = rel(path)
    clean = json.loads(json.dumps({k: v for k, v in data.items() if k != "_avg"}, default=str))
    for a in clean["algorithms"].values():
        for s in a["seeds"]:
            s["margins"] = s.pop("_margins")
    atomic_write_text(out_dir / "study.json", json.dumps(clean, indent=2) + "\n")
    atomic_write_text(report, render_study(data, pl, title))
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-amir study", description="Multi-seed reproduction report")
    p.add_argument("--run", action="append", required=True,
                   help="LABEL=DIR[,DIR...] (one directory per seed; the last '=' ends the label)")
    p.add_argument("--base", default=None, help="evaluation of the starting checkpoint (optional)")
    p.add_argument("--reference", default=None, help="label the others are compared with (default: the first)")
    p.add_argument("--out", required=True, help="directory for PNGs and study.json")
    p.add_argument("--report", default=None, help="markdown file (default: OUT/results.md)")
    p.add_argument("--title", default="Reproduction study")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths-relative-to", default=None,
                   help="write the results files' paths relative to this directory (the repository root the runs "
                        "are in; default: relative to the report)")
    args = p.parse_args(argv)
    try:
        groups: dict[str, list] = {}
        for label, paths in (_parse_run_arg(s) for s in args.run):  # a repeated LABEL= adds its seeds
            groups.setdefault(label, []).extend(paths)
        data = build_study(groups, args.reference or next(iter(groups)), args.base, k=args.k, n_boot=args.n_boot,
                           seed=args.seed)
    except (ResultsError, ValueError) as exc:
        print(f"megatron-amir study: {exc}", file=sys.stderr)
        return 2
    report = Path(args.report) if args.report else Path(args.out) / "results.md"
    write_study(data, groups, Path(args.out), report, args.title,
                Path(args.paths_relative_to) if args.paths_relative_to else None)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
