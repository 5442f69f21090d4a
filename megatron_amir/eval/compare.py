"""``megatron-amir compare RUN_A RUN_B [RUN_BASE]``: the paper's three claims, measured on two runs.

1. pass@k of each run and paired bootstrap confidence intervals for the differences (B - A, and
   A - base, B - base when a base run is given), resampling *problems* with a fixed seed.
2. Coverage (the paper's Table 2): how many problems each solve pattern holds (solved by both, only
   A, only B, neither; with a base run, the 8 patterns over base / A / B). "Solved at pass@k" is
   random when k < n, so every cell is the *expected* count, sum over problems of
   prod_run (p_run if the run solves else 1 - p_run) with p_run = the problem's unbiased pass@k;
   at k = n the p's are 0 or 1 and the cells are plain counts.
3. Separation of correct and incorrect chains (the paper's Figure 4): per problem with at least one
   correct and one incorrect sample, the mean length-normalized log-prob of its correct samples minus
   that of its incorrect samples; the distribution and its median (with a bootstrap CI).

Runs are aligned by problem id; only problems present in every run count (the report says how many
were dropped). Output: ``report.md``, ``compare.json`` (every number in the report) and PNG plots,
each written atomically.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from megatron_amir.eval.passk import default_ks, maj_at_k, pass_at_k
from megatron_amir.eval.results import (
    ProblemResult,
    ResultsError,
    atomic_write_text,
    eval_settings,
    logprob_margin,
    read_results,
    resolve_results_path,
    settings_mismatch,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class Interval:
    estimate: float
    lo: float
    hi: float

    def fmt(self, digits: int = 4) -> str:
        return f"{self.estimate:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi}


def resample_indices(n: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """The bootstrap draws: [b, n] indices into range(n), with replacement, chunk rows at a time (memory stays at
    chunk * n). Every bootstrap here uses these draws, so equal (n, n_boot, seed) give equal resamples."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _percentile_interval(estimate: float, stats: list[np.ndarray], alpha: float) -> Interval:
    lo, hi = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return Interval(float(estimate), float(lo), float(hi))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                 *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05, chunk: int = 256) -> Interval:
    """Percentile bootstrap CI of ``statistic`` (default: mean) over ``values`` resampled with replacement.

    Each value is one independent unit (one problem). statistic maps a [B, P] array of resampled rows to [B]
    statistics. Deterministic given ``seed``. For several correlated values per unit (one per seed of a problem)
    use cluster_bootstrap_ci."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sample, got shape {x.shape}")
    _check_alpha(alpha)
    stat = statistic or (lambda a: a.mean(axis=1))
    stats = [stat(x[idx]) for idx in resample_indices(len(x), n_boot, seed, chunk)]
    return _percentile_interval(stat(x[None, :])[0], stats, alpha)


def weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean of the values x [R] repeated w [B, R] times each, per row of w: [B]."""
    return (w @ x) / w.sum(axis=1)


def weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """np.median of the values x [R] repeated w [B, R] (non-negative integer) times each, per row of w: [B]."""
    order = np.argsort(x, kind="stable")
    xs, cw = x[order], np.cumsum(w[:, order], axis=1)
    total = cw[:, -1]
    # 0-based positions (N-1)//2 and N//2 of the expanded sorted sample: the first column whose cumulative
    # weight exceeds the position
    lo = np.argmax(cw > ((total - 1) // 2)[:, None], axis=1)
    hi = np.argmax(cw > (total // 2)[:, None], axis=1)
    return (xs[lo] + xs[hi]) / 2


def cluster_bootstrap_ci(values: Sequence[float] | np.ndarray, clusters: Sequence[Any] | np.ndarray,
                         statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, *,
                         n_boot: int = 2000, seed: int = 0, alpha: float = 0.05, chunk: int = 256) -> Interval:
    """Percentile cluster-bootstrap CI of a statistic of pooled ``values`` (default: their mean).

    ``clusters[i]`` is the unit value i belongs to (a problem id); the values of one cluster are correlated (the
    same problem under several seeds), so a resample draws *clusters* with replacement and takes all values of
    every drawn cluster (a cluster drawn twice counts twice), then recomputes the statistic on the pooled rows.
    Resampling the values one by one would treat correlated values as independent and give too narrow an interval.
    statistic maps (values [R], integer weights [B, R] = how often each value is in each resample) to [B]:
    weighted_mean or weighted_median. Clusters are numbered by first appearance and drawn with the same draws as
    bootstrap_ci, so with one value per cluster the result is bootstrap_ci's. Deterministic given ``seed``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"cluster_bootstrap_ci needs a non-empty 1-D sample, got shape {x.shape}")
    if len(clusters) != len(x):
        raise ValueError(f"cluster_bootstrap_ci: {len(clusters)} cluster labels for {len(x)} values")
    _check_alpha(alpha)
    first: dict[Any, int] = {}
    codes = np.array([first.setdefault(c, len(first)) for c in clusters], dtype=np.int64)
    n_clusters = len(first)
    stat = statistic or weighted_mean
    stats = []
    for idx in resample_indices(n_clusters, n_boot, seed, chunk):
        b = len(idx)
        counts = np.bincount((idx + n_clusters * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_clusters).reshape(b, n_clusters)
        stats.append(stat(x, counts[:, codes].astype(np.float64)))
    return _percentile_interval(stat(x, np.ones((1, len(x))))[0], stats, alpha)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> Interval:
    """CI of mean(b - a) over problems, resampling problems (the pair (a_p, b_p) stays together)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: shapes differ {a.shape} vs {b.shape}")
    return bootstrap_ci(b - a, n_boot=n_boot, seed=seed, alpha=alpha)


def _median_rows(a: np.ndarray) -> np.ndarray:
    return np.median(a, axis=1)


# --------------------------------------------------------------------------------------------- pieces
@dataclass
class Run:
    label: str
    path: Path  # the results file
    results: dict[str, ProblemResult]


def load_run(path: str | os.PathLike, label: str) -> Run:
    file = resolve_results_path(path)
    return Run(label=label, path=file, results={r.id: r for r in read_results(file)})


def solve_probabilities(run: Run, ids: Sequence[str], k: int) -> np.ndarray:
    """Per-problem unbiased pass@k (the probability that k of the run's samples contain a correct one)."""
    return np.array([pass_at_k(run.results[i].n, run.results[i].num_correct, k) for i in ids], dtype=np.float64)


def coverage_table(probs: dict[str, np.ndarray]) -> list[tuple[dict[str, bool], float]]:
    """Expected number of problems in each solve pattern over the runs (independent draws per run).

    probs: label -> per-problem solve probability (same problem order for every label).
    Returns [(pattern {label: solved}, expected count)], patterns with all-solved first."""
    labels = list(probs)
    table = []
    for pattern in itertools.product([True, False], repeat=len(labels)):
        p = np.ones_like(next(iter(probs.values())))
        for lab, solved in zip(labels, pattern):
            p = p * (probs[lab] if solved else 1.0 - probs[lab])
        table.append((dict(zip(labels, pattern)), float(p.sum())))
    return table


def run_margins(run: Run, ids: Sequence[str]) -> dict[str, float]:
    out = {}
    for i in ids:
        m = logprob_margin(run.results[i])
        if m is not None:
            out[i] = m
    return out


def _lengths(run: Run, ids: Sequence[str], correct: bool) -> Optional[float]:
    ls = [ln for i in ids for ln, ok in zip(run.results[i].lengths, run.results[i].correct) if ok == correct]
    return float(np.mean(ls)) if ls else None


# --------------------------------------------------------------------------------------------- comparison
def compare_runs(run_a: Run, run_b: Run, run_base: Optional[Run] = None, *, k: Optional[int] = None,
                 n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """All numbers of the comparison as one JSON-able dict (what report.md shows)."""
    runs = [r for r in (run_base, run_a, run_b) if r is not None]
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must differ, got {labels}")
    common = set(runs[0].results)
    for r in runs[1:]:
        common &= set(r.results)
    if not common:
        raise ValueError("the runs share no problem ids: " + ", ".join(f"{r.path}" for r in runs))
    ids = sorted(common)
    n_min = min(r.results[i].n for r in runs for i in ids)
    k = k or n_min
    if not 1 <= k <= n_min:
        raise ValueError(f"k={k} must be in [1, {n_min}] (the fewest samples any run has for a shared problem)")
    ks = [x for x in default_ks(n_min) if x <= k] + ([k] if k not in default_ks(n_min) else [])
    ks = sorted(set(ks))

    out: dict[str, Any] = {"labels": {"A": run_a.label, "B": run_b.label,
                                      "base": run_base.label if run_base else None},
                           "paths": {r.label: str(r.path) for r in runs},
                           "num_common_problems": len(ids),
                           "dropped": {r.label: len(r.results) - len(ids) for r in runs},
                           "samples_min": n_min, "k": k, "ks": ks,
                           # every run has exactly k samples of every shared problem: the coverage cells are counts
                           "coverage_counts": all(r.results[i].n == k for r in runs for i in ids),
                           "settings": {r.label: eval_settings(r.path) for r in runs},
                           "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha}}

    per_run: dict[str, Any] = {}
    pk_arrays: dict[str, dict[int, np.ndarray]] = {}
    for r in runs:
        pk_arrays[r.label] = {kk: solve_probabilities(r, ids, kk) for kk in ks}
        margins = run_margins(r, ids)
        mvals = np.array(list(margins.values()), dtype=np.float64)
        per_run[r.label] = {
            "pass_at_k": {kk: float(pk_arrays[r.label][kk].mean()) for kk in ks},
            "pass_at_k_ci": {kk: bootstrap_ci(pk_arrays[r.label][kk], n_boot=n_boot, seed=seed, alpha=alpha).to_json()
                             for kk in ks},
            "maj_at_k": {kk: float(np.mean([maj_at_k(r.results[i].answers, r.results[i].correct, kk) for i in ids]))
                         for kk in ks},
            "mean_length_correct": _lengths(r, ids, True),
            "mean_length_incorrect": _lengths(r, ids, False),
            "sample_accuracy": float(sum(r.results[i].num_correct for i in ids) / sum(r.results[i].n for i in ids)),
            "margin": {"problems": len(margins),
                       "median": float(np.median(mvals)) if len(mvals) else None,
                       "mean": float(mvals.mean()) if len(mvals) else None,
                       "fraction_positive": float((mvals > 0).mean()) if len(mvals) else None,
                       "median_ci": bootstrap_ci(mvals, _median_rows, n_boot=n_boot, seed=seed, alpha=alpha).to_json()
                       if len(mvals) > 1 else None},
            "_margins": margins,
        }
    out["runs"] = per_run

    diffs: dict[str, Any] = {}
    pairs = [(run_a, run_b)] + ([(run_base, run_a), (run_base, run_b)] if run_base else [])
    for x, y in pairs:
        diffs[f"{y.label} - {x.label}"] = {
            kk: paired_bootstrap(pk_arrays[x.label][kk], pk_arrays[y.label][kk], n_boot=n_boot, seed=seed,
                                 alpha=alpha).to_json() for kk in ks}
    out["pass_at_k_differences"] = diffs

    probs = {lab: pk_arrays[lab][k] for lab in labels}
    table = coverage_table(probs)
    out["coverage"] = [{"pattern": pat, "expected_problems": cnt} for pat, cnt in table]
    a, b = probs[run_a.label], probs[run_b.label]
    highlights = {f"solved by {run_b.label}, not {run_a.label}": float((b * (1 - a)).sum()),
                  f"solved by {run_a.label}, not {run_b.label}": float((a * (1 - b)).sum())}
    if run_base is not None:
        base = probs[run_base.label]
        for lab, p in ((run_a.label, a), (run_b.label, b)):
            highlights[f"solved by {lab}, not {run_base.label} (gained)"] = float((p * (1 - base)).sum())
            highlights[f"solved by {run_base.label}, not {lab} (lost)"] = float((base * (1 - p)).sum())
        highlights[f"solved by {run_b.label}, by neither {run_base.label} nor {run_a.label}"] = \
            float((b * (1 - a) * (1 - base)).sum())
    out["coverage_highlights"] = highlights
    return out


# --------------------------------------------------------------------------------------------- report
def _f(x: Optional[float], d: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def render_report(data: dict[str, Any], plots: dict[str, str]) -> str:
    labels = list(data["runs"])
    ks = data["ks"]
    k = data["k"]
    L: list[str] = [f"# Comparison: {data['labels']['B']} vs {data['labels']['A']}"
                    + (f" (base: {data['labels']['base']})" if data["labels"]["base"] else ""), ""]
    L.append("Runs (results files):")
    for lab in labels:
        L.append(f"- **{lab}**: `{data['paths'][lab]}` ({data['dropped'][lab]} problems not shared, dropped)")
    diff = settings_mismatch(data.get("settings", {}), ignore=("seed",))
    if any(data.get("settings", {}).values()):
        keys = sorted({k for s in data["settings"].values() for k in s})
        L += ["", "Evaluation settings (from each run's summary):", "",
              "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        L += [f"| {lab} | " + " | ".join(str(data["settings"][lab].get(x, "?")) for x in keys) + " |" for lab in labels]
    if diff:
        L += ["", f"**Warning: the runs were evaluated with different {', '.join(diff)}; differences below mix "
                  "the models with the evaluation settings.**"]
    L += ["", f"{data['num_common_problems']} problems shared by every run; at least {data['samples_min']} samples "
              f"per problem. Confidence intervals: {100 * (1 - data['bootstrap']['alpha']):.0f}% percentile "
              f"bootstrap over problems, {data['bootstrap']['n_boot']} resamples, seed {data['bootstrap']['seed']}.", ""]

    L += ["## pass@k (unbiased estimator) and maj@k", ""]
    L.append("| run | " + " | ".join(f"pass@{x}" for x in ks) + " | " + " | ".join(f"maj@{x}" for x in ks)
             + " | sample acc. | len. correct | len. incorrect |")
    L.append("|---" * (1 + 2 * len(ks) + 3) + "|")
    for lab in labels:
        r = data["runs"][lab]
        L.append(f"| {lab} | " + " | ".join(
            f"{r['pass_at_k'][x]:.4f} [{r['pass_at_k_ci'][x]['lo']:.3f}, {r['pass_at_k_ci'][x]['hi']:.3f}]" for x in ks)
            + " | " + " | ".join(f"{r['maj_at_k'][x]:.4f}" for x in ks)
            + f" | {r['sample_accuracy']:.4f} | {_f(r['mean_length_correct'], 1)} | {_f(r['mean_length_incorrect'], 1)} |")
    if "pass_at_k" in plots:
        L += ["", f"![pass@k]({plots['pass_at_k']})"]

    L += ["", "## pass@k differences (paired bootstrap over problems)", "",
          "| difference | " + " | ".join(f"pass@{x}" for x in ks) + " |", "|---" * (1 + len(ks)) + "|"]
    for name, d in data["pass_at_k_differences"].items():
        L.append(f"| {name} | " + " | ".join(
            f"{d[x]['estimate']:+.4f} [{d[x]['lo']:+.4f}, {d[x]['hi']:+.4f}]" for x in ks) + " |")
    L += ["", "An interval that excludes 0 is a difference this evaluation resolves at that level; one that "
              "covers 0 is not evidence either way."]

    L += ["", f"## Coverage at pass@{k} (paper Table 2)", "",
          "Expected number of problems in each solve pattern"
          + (" (plain counts: k equals every run's sample count)." if data.get("coverage_counts") else
             f" (k={k} < n: each cell sums, over problems, the probability of that pattern)."), "",
          "| " + " | ".join(labels) + " | problems |", "|---" * (len(labels) + 1) + "|"]
    for row in data["coverage"]:
        L.append("| " + " | ".join("solved" if row["pattern"][lab] else "-" for lab in labels)
                 + f" | {row['expected_problems']:.1f} |")
    L.append("")
    for name, v in data["coverage_highlights"].items():
        L.append(f"- {name}: {v:.1f}")
    if "coverage" in plots:
        L += ["", f"![coverage]({plots['coverage']})"]

    L += ["", "## Separation of correct and incorrect chains (paper Figure 4)", "",
          "Per problem with both correct and incorrect samples: mean length-normalized log-prob of the correct "
          "samples minus that of the incorrect ones (nats/token). Larger = the model prefers its correct chains "
          "more clearly. (The paper reports medians 0.016 for AMIR-GRPO vs 0.006 for GRPO.)", "",
          "| run | problems | median [CI] | mean | fraction > 0 |", "|---|---|---|---|---|"]
    for lab in labels:
        m = data["runs"][lab]["margin"]
        ci = m["median_ci"]
        med = _f(m["median"]) + (f" [{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci else "")
        L.append(f"| {lab} | {m['problems']} | {med} | {_f(m['mean'])} | {_f(m['fraction_positive'], 3)} |")
    if "margin" in plots:
        L += ["", f"![margin]({plots['margin']})"]
    return "\n".join(L) + "\n"


def write_report(data: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the PNGs, compare.json and report.md (last, so a report never names a missing plot)."""
    from megatron_amir.eval import plots as P

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(data["runs"])
    files: dict[str, Path] = {}
    files["pass_at_k"] = P.plot_pass_at_k(
        {lab: data["runs"][lab]["pass_at_k"] for lab in labels}, out / "pass_at_k.png",
        intervals={lab: {x: (v["lo"], v["hi"]) for x, v in data["runs"][lab]["pass_at_k_ci"].items()} for lab in labels})
    files["coverage"] = P.plot_coverage(
        [(" / ".join(f"{lab}:{'Y' if row['pattern'][lab] else 'N'}" for lab in labels), row["expected_problems"])
         for row in data["coverage"]], out / "coverage.png", title=f"Coverage at pass@{data['k']}")
    margins = {lab: list(data["runs"][lab]["_margins"].values()) for lab in labels}
    if any(margins.values()):
        files["margin"] = P.plot_margin_distribution(margins, out / "margin.png")
    else:
        log.warning("no run has log-probs for both correct and incorrect samples: margin plot skipped")
    clean = json.loads(json.dumps(data, default=str))
    for lab in clean["runs"]:
        clean["runs"][lab]["margins"] = clean["runs"][lab].pop("_margins")
    atomic_write_text(out / "compare.json", json.dumps(clean, indent=2) + "\n")
    files["json"] = out / "compare.json"
    atomic_write_text(out / "report.md", render_report(data, {k: v.name for k, v in files.items()}))
    files["report"] = out / "report.md"
    return files


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-amir compare",
                                description="Compare two evaluation runs (and optionally a base run): pass@k with "
                                            "bootstrap CIs, coverage, correct/incorrect log-prob separation")
    p.add_argument("run_a", help="run A (e.g. GRPO): a directory with results.jsonl (or eval/results.jsonl) or the file")
    p.add_argument("run_b", help="run B (e.g. AMIR-GRPO)")
    p.add_argument("run_base", nargs="?", default=None, help="optional base model run")
    p.add_argument("--out", required=True, help="output directory for report.md, compare.json, PNGs")
    p.add_argument("--labels", default=None, help="comma-separated labels A,B[,BASE] (default: directory names)")
    p.add_argument("--k", type=int, default=None, help="k for the coverage table (default: the sample count n)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    return p


def _default_labels(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        q = Path(p)
        q = q.parent if q.is_file() else q
        names.append(q.parent.name if q.name == "eval" else q.name or str(q))
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def main(argv: Optional[list[str]] = None) -> int:
    """``megatron-amir compare``. Returns 0 on success, 2 on bad input (message on stderr)."""
    args = build_parser().parse_args(argv)
    paths = [args.run_a, args.run_b] + ([args.run_base] if args.run_base else [])
    labels = args.labels.split(",") if args.labels else _default_labels(paths)
    if len(labels) != len(paths):
        print(f"megatron-amir compare: --labels has {len(labels)} names for {len(paths)} runs", file=sys.stderr)
        return 2
    try:
        runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
        data = compare_runs(runs[0], runs[1], runs[2] if len(runs) > 2 else None, k=args.k, n_boot=args.n_boot,
                            seed=args.seed, alpha=args.alpha)
    except (ResultsError, ValueError) as exc:
        print(f"megatron-amir compare: {exc}", file=sys.stderr)
        return 2
    files = write_report(data, args.out)
    print(f"wrote {files['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
