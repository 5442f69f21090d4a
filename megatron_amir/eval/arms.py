"""Arms of a multi-seed study side by side: per-arm metrics with CIs, paired differences from a reference arm, and
the effect per unit dose (λ) over the arms that have one.

An arm is a label, its run directories (one per seed, read as ``megatron_amir.eval.study`` reads them) and an
optional dose (a number; None for an arm without one, such as an adaptive λ schedule). Two kinds of metric:

- eval metrics, from every run's final held-out results on the problems all runs share. ``mean`` metrics: a
  problem's value is averaged over the arm's seeds, the arm's statistic is the mean over problems (pass@k, length,
  ...). ``median`` metrics: the median of the pooled per-(seed, problem) values (the log-prob margin, as the study
  report pools it). Every CI comes from one set of bootstrap resamples of problems (``compare.resample_indices``,
  the draws of ``bootstrap_ci``): each resample recomputes every arm, so differences from the reference and the
  slope over doses are paired, and a drawn problem brings the values of all its seeds (a cluster bootstrap).
  Coverage beyond the reference at pass@k: Σ_p q_a(p)·(1 − q_ref(p)), q = the problem's seed-averaged pass@k,
  the expected number of problems the arm solves and the reference does not (a random seed of each); the
  reference-only count likewise.
- train metrics, from every run's ``metrics.jsonl``: per seed the mean over its last ``tail`` logged steps; an
  arm's value is the mean over seeds with a Student-t interval (seeds − 1 df), a difference from the reference a
  Welch interval, the slope the least-squares slope over the per-seed points with its t interval (n − 2 df).

Slope (the effect per unit dose): b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)² over the arms with a dose: one point per arm
(its statistic) for eval metrics, one per seed for train metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from megatron_amir.eval.compare import Run, load_run, resample_indices, weighted_median
from megatron_amir.eval.passk import pass_at_k
from megatron_amir.eval.results import ProblemResult, logprob_margin

__all__ = ["EvalMetric", "Arm", "eval_metrics_table", "train_metrics_table", "t_quantile", "standard_eval_metrics",
           "tail_mean"]


@dataclass(frozen=True)
class EvalMetric:
    """``value(result)``: a problem's value in one run (None: the problem has none, e.g. no margin)."""

    value: Callable[[ProblemResult], Optional[float]]
    agg: Literal["mean", "median"] = "mean"


@dataclass(frozen=True)
class Arm:
    runs: Sequence[str]
    dose: Optional[float] = None


def standard_eval_metrics(ks: Sequence[int]) -> dict[str, EvalMetric]:
    """pass@k for each k, the mean response length and the pooled median log-prob margin (paper Fig. 4)."""
    out = {f"pass@{k}": EvalMetric(lambda r, k=k: pass_at_k(r.n, r.num_correct, k)) for k in ks}
    out["length"] = EvalMetric(lambda r: float(np.mean(r.lengths)))
    out["margin"] = EvalMetric(logprob_margin, agg="median")
    return out


# --------------------------------------------------------------------------------------------- statistics
def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF; the CDF by Simpson's rule
    on the density, accurate to ~1e-9 for the quantiles used here)."""
    if df < 1:
        raise ValueError(f"t_quantile: df={df} must be >= 1")
    if not 0 < q < 1:
        raise ValueError(f"t_quantile: q={q} must be in (0, 1)")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = c * (1 + t * t / df) ** (-(df + 1) / 2)
        return 0.5 + (x / 4000 / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def _interval(est: float, draws: np.ndarray, alpha: float) -> dict[str, float]:
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0 or not math.isfinite(est):
        return {"estimate": est, "lo": math.nan, "hi": math.nan}
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return {"estimate": float(est), "lo": float(lo), "hi": float(hi)}


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of y [..., A] on x [A], along the last axis."""
    xc = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)


def _t_interval(est: float, se: float, df: int, alpha: float) -> dict[str, float]:
    if df < 1 or not math.isfinite(se):
        return {"estimate": est, "lo": math.nan, "hi": math.nan}
    h = t_quantile(1 - alpha / 2, df) * se
    return {"estimate": est, "lo": est - h, "hi": est + h}


# --------------------------------------------------------------------------------------------- eval metrics
def _shared_ids(runs: Mapping[str, list[Run]]) -> list[str]:
    every = [r for rs in runs.values() for r in rs]
    ids = set(every[0].results)
    for r in every[1:]:
        ids &= set(r.results)
    if not ids:
        raise ValueError("the arms' runs share no problem ids")
    return sorted(ids)


def eval_metrics_table(arms: Mapping[str, Arm], reference: str, metrics: Mapping[str, EvalMetric], *,
                       coverage_k: Optional[int] = None, n_boot: int = 2000, seed: int = 0,
                       alpha: float = 0.05, chunk: int = 256) -> dict[str, Any]:
    """Per arm and eval metric: estimate and CI; per non-reference arm: the difference from ``reference``; per
    metric: the slope over the arms with a dose (when at least two doses differ). With ``coverage_k`` (needs the
    metric ``pass@<coverage_k>``): ``beyond_reference`` and ``reference_only`` per arm."""
    if reference not in arms:
        raise ValueError(f"reference {reference!r} is not one of the arms {list(arms)}")
    runs = {lab: [load_run(p, f"{lab}#{i}") for i, p in enumerate(a.runs)] for lab, a in arms.items()}
    ids = _shared_ids(runs)
    n = len(ids)
    labels = list(arms)
    names = list(metrics)
    mean_vals: dict[tuple[str, str], np.ndarray] = {}  # (metric, arm) -> [P] seed-averaged, NaN = no value
    median_vals: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # -> (pooled values, problem index)
    for name, m in metrics.items():
        for lab in labels:
            per = np.array([[np.nan if (v := m.value(r.results[i])) is None else float(v) for i in ids]
                            for r in runs[lab]])
            if m.agg == "mean":
                c = np.isfinite(per).sum(axis=0)
                mean_vals[(name, lab)] = np.where(c > 0, np.nansum(per, axis=0) / np.maximum(c, 1), np.nan)
            else:
                s_idx, p_idx = np.nonzero(np.isfinite(per))
                median_vals[(name, lab)] = (per[s_idx, p_idx], p_idx)
    extra: list[str] = []
    if coverage_k is not None:
        key = f"pass@{coverage_k}"
        if key not in metrics or metrics[key].agg != "mean":
            raise ValueError(f"coverage_k={coverage_k} needs the mean metric {key!r}")
        qr = mean_vals[(key, reference)]
        for lab in labels:
            q = mean_vals[(key, lab)]
            mean_vals[("beyond_reference", lab)] = q * (1 - qr) * n  # sums: the mean times n
            mean_vals[("reference_only", lab)] = qr * (1 - q) * n
        extra = ["beyond_reference", "reference_only"]

    def stats(counts: np.ndarray) -> dict[str, np.ndarray]:
        """counts [B, P]: how often each problem is in each resample -> metric -> [B, A]."""
        out = {}
        for name in names + extra:
            cols = []
            for lab in labels:
                if (name, lab) in median_vals:
                    vals, pidx = median_vals[(name, lab)]
                    w = counts[:, pidx]
                    col = weighted_median(vals, w) if len(vals) else np.full(len(counts), np.nan)
                    col = np.where(w.sum(axis=1) > 0, col, np.nan)
                else:
                    v = mean_vals[(name, lab)]
                    ok = np.isfinite(v)
                    with np.errstate(all="ignore"):
                        col = (counts[:, ok] @ v[ok]) / counts[:, ok].sum(axis=1)
                cols.append(col)
            out[name] = np.stack(cols, axis=1)
        return out

    est = stats(np.ones((1, n)))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in est}
    for idx in resample_indices(n, n_boot, seed, chunk):
        b = len(idx)
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        for name, v in stats(counts.astype(np.float64)).items():
            draws[name].append(v)
    boot = {name: np.concatenate(v) for name, v in draws.items()}
    ref = labels.index(reference)
    dosed = [i for i, lab in enumerate(labels) if arms[lab].dose is not None]
    x = np.array([arms[labels[i]].dose for i in dosed], dtype=np.float64)
    out: dict[str, Any] = {"problems": n, "reference": reference, "alpha": alpha, "n_boot": n_boot, "seed": seed,
                           "files": {lab: [str(r.path) for r in runs[lab]] for lab in labels},
                           "arms": {lab: {"dose": arms[lab].dose} for lab in labels}, "differences": {}, "slopes": {}}
    for name in est:
        for j, lab in enumerate(labels):
            e = est[name][0, j]
            out["arms"][lab][name] = _interval(float(e), boot[name][:, j], alpha)
            if j != ref and name not in extra:
                out["differences"].setdefault(lab, {})[name] = _interval(
                    float(e - est[name][0, ref]), boot[name][:, j] - boot[name][:, ref], alpha)
        if len(set(x.tolist())) > 1 and name not in extra:
            out["slopes"][name] = _interval(float(_slopes(x, est[name][0, dosed])), _slopes(x, boot[name][:, dosed]),
                                            alpha)
    return out


# --------------------------------------------------------------------------------------------- train metrics
def tail_mean(rows: Sequence[Mapping[str, Any]], key: str, tail: int) -> Optional[float]:
    """Mean of ``key`` over the rows of the last ``tail`` steps (steps > last step − tail) that hold a number."""
    from megatron_amir.eval.plots import metric_series

    steps, vals = metric_series(rows, key)
    if len(steps) == 0:
        return None
    keep = steps > steps.max() - tail
    return float(vals[keep].mean())


def train_metrics_table(arms: Mapping[str, Arm], reference: str, keys: Mapping[str, str], *, tail: int = 20,
                        alpha: float = 0.05) -> dict[str, Any]:
    """Per arm and train metric (name -> metrics.jsonl key): per-seed tail means, their mean with a t interval;
    the Welch difference from ``reference``; the slope of the per-seed values over the arms with a dose."""
    from pathlib import Path

    from megatron_amir.eval.plots import load_metrics

    if reference not in arms:
        raise ValueError(f"reference {reference!r} is not one of the arms {list(arms)}")
    rows = {lab: [load_metrics(Path(d) / "metrics.jsonl") for d in a.runs] for lab, a in arms.items()}
    out: dict[str, Any] = {"tail": tail, "alpha": alpha, "reference": reference, "arms": {}, "differences": {},
                           "slopes": {}}
    for name, key in keys.items():
        seeds = {lab: [v for rs in rows[lab] if (v := tail_mean(rs, key, tail)) is not None] for lab in arms}
        for lab, vals in seeds.items():
            v = np.array(vals)
            e = float(v.mean()) if len(v) else math.nan
            se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
            out["arms"].setdefault(lab, {"dose": arms[lab].dose})[name] = {**_t_interval(e, se, len(v) - 1, alpha),
                                                                          "seeds": vals}
        r = np.array(seeds[reference])
        for lab, vals in seeds.items():
            if lab == reference:
                continue
            a = np.array(vals)
            if len(a) > 1 and len(r) > 1:
                va, vr = a.var(ddof=1) / len(a), r.var(ddof=1) / len(r)
                se = math.sqrt(va + vr)
                # Welch-Satterthwaite degrees of freedom (rounded down; at least 1)
                df = max(1, int((va + vr) ** 2 / (va ** 2 / (len(a) - 1) + vr ** 2 / (len(r) - 1)))) if se > 0 else 1
                d = _t_interval(float(a.mean() - r.mean()), se, df, alpha)
            else:
                d = {"estimate": float(a.mean() - r.mean()) if len(a) and len(r) else math.nan, "lo": math.nan,
                     "hi": math.nan}
            out["differences"].setdefault(lab, {})[name] = d
        pts = [(arms[lab].dose, v) for lab, vals in seeds.items() if arms[lab].dose is not None for v in vals]
        if len({p[0] for p in pts}) > 1 and len(pts) > 2:
            x, y = np.array(pts, dtype=np.float64).T
            b = float(_slopes(x, y))
            resid = y - y.mean() - b * (x - x.mean())
            se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
            out["slopes"][name] = _t_interval(b, se, len(x) - 2, alpha)
    return out
