"""Plotting helpers shared by ``megatron-amir compare`` and the demo / reproduction reports.

Everything renders with matplotlib's Agg backend (no display needed) and every PNG appears
atomically (temp file + os.replace), so a report never links a half-written image.

Training curves read the trainer's ``metrics.jsonl`` (one ``{"step": s, ...}`` object per line).
Runs given under one label (e.g. three seeds of one algorithm) are drawn as their mean with a
min-max band over the runs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from megatron_amir.fileio import publish_mode


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import to take effect everywhere
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    publish_mode(tmp, directory=False)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------------------------- metrics
def load_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL; a bad line raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' field")
            rows.append(row)
    return rows


def _as_float(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)  # the metrics logger writes nan/inf as strings
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def metric_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over the rows that have a finite value for it, sorted by step."""
    pts = sorted((int(r["step"]), x) for r in rows if (x := _as_float(r.get(key))) is not None)
    return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)


def first_key(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> Optional[str]:
    """The first candidate key that any row holds a number for (metric names differ between trainers)."""
    for k in candidates:
        if any(_as_float(r.get(k)) is not None for r in rows):
            return k
    return None


def aggregate_runs(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs at the steps every run logged (steps, mean, lo, hi)."""
    if not series:
        raise ValueError("aggregate_runs: no series")
    common = set(series[0][0].tolist())
    for s, _ in series[1:]:
        common &= set(s.tolist())
    steps = np.array(sorted(common), dtype=np.int64)
    stack = np.stack([v[np.searchsorted(s, steps)] for s, v in series]) if len(steps) else np.zeros((len(series), 0))
    return steps, stack.mean(0), stack.min(0), stack.max(0)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start), window <= 1: unchanged."""
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


# One panel per paper claim; each line lists candidate metric keys, the first present is drawn (the trainer's
# names first: response/* from the rollout batch, amir/* from algorithms.prepare_batch, eval/* from evaluate).
DEFAULT_PANELS: dict[str, dict[str, Any]] = {
    "accuracy": {"title": "Training accuracy (fraction of correct rollouts)", "ylabel": "accuracy",
                 "lines": {"": ["reward/accuracy", "train/accuracy", "accuracy", "reward/mean"]}},
    "response_length": {"title": "Response length: correct vs incorrect", "ylabel": "tokens",
                        "lines": {"correct": ["response/length_correct", "amir/response_len_above", "length/correct"],
                                  "incorrect": ["response/length_incorrect", "amir/response_len_below",
                                                "length/incorrect"]}},
    "pair_accuracy": {"title": "Pair accuracy (fraction of pairs with s_w > s_l)", "ylabel": "pair accuracy",
                      "lines": {"": ["amir/pair_accuracy", "pairs/accuracy"]}},
    "logprob_separation": {"title": "Length-normalized log-prob gap, correct - incorrect", "ylabel": "nats/token",
                           "lines": {"": ["amir/logprob_gap_correct_incorrect", "amir/logprob_gap", "logprob/gap_correct_incorrect",
                                          "amir/logprob_separation", "logprob/separation"]}},
    "eval_pass1": {"title": "Held-out accuracy (periodic eval)", "ylabel": "accuracy",
                   "lines": {"pass@1": ["eval/pass@1", "eval/pass_at_1"], "greedy": ["eval/greedy_accuracy"]}},
    "eval_margin": {"title": "Held-out log-prob margin, correct - incorrect (median)", "ylabel": "nats/token",
                    "lines": {"": ["eval/logprob_margin_median"]}},
}


def plot_training_curves(
    runs: Mapping[str, Sequence[str | os.PathLike] | str | os.PathLike],
    out_dir: str | os.PathLike,
    panels: Optional[Mapping[str, Mapping[str, Any]]] = None,
    smooth_window: int = 1,
    prefix: str = "train_",
) -> dict[str, Path]:
    """One PNG per panel that has data: ``{out_dir}/{prefix}{panel}.png``; returns {panel: path}.

    runs: label -> metrics.jsonl path (or a list of them: seeds, drawn as mean and min-max band).
    Panels whose keys no run logged are skipped (the returned dict says which were drawn).
    """
    plt = _pyplot()
    panels = panels or DEFAULT_PANELS
    loaded = {label: [load_metrics(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
              for label, paths in runs.items()}
    written: dict[str, Path] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, spec in panels.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for ci, (label, run_rows) in enumerate(loaded.items()):
            color = colors[ci % len(colors)]
            for li, (line_name, candidates) in enumerate(spec["lines"].items()):
                series = []
                for rows in run_rows:
                    key = first_key(rows, candidates)
                    if key is not None:
                        series.append(metric_series(rows, key))
                if not series:
                    continue
                steps, mean, lo, hi = aggregate_runs(series)
                if len(steps) == 0:
                    continue
                tag = f"{label} {line_name}".strip()
                if len(series) > 1:
                    tag += f" (n={len(series)})"
                    ax.fill_between(steps, smooth(lo, smooth_window), smooth(hi, smooth_window), color=color, alpha=0.15)
                ax.plot(steps, smooth(mean, smooth_window), color=color, linestyle=["-", "--", ":"][li % 3], label=tag)
                drawn += 1
        if drawn == 0:
            plt.close(fig)
            continue
        ax.set_title(spec["title"])
        ax.set_xlabel("step")
        ax.set_ylabel(spec["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written[name] = save_figure(fig, Path(out_dir) / f"{prefix}{name}.png")
    return written


# --------------------------------------------------------------------------------------------- eval plots
def plot_pass_at_k(curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike,
                   intervals: Optional[Mapping[str, Mapping[int, tuple[float, float]]]] = None,
                   title: str = "pass@k") -> Path:
    """pass@k against k (log2 axis) per run, with optional (lo, hi) error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, curve in curves.items():
        ks = sorted(curve)
        ys = [curve[k] for k in ks]
        if intervals and label in intervals:
            lo = [ys[i] - intervals[label][k][0] for i, k in enumerate(ks)]
            hi = [intervals[label][k][1] - ys[i] for i, k in enumerate(ks)]
            ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        else:
            ax.plot(ks, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_margin_distribution(margins: Mapping[str, Sequence[float]], path: str | os.PathLike,
                             title: str = "Log-prob margin, correct - incorrect (per problem)") -> Path:
    """Overlaid histograms of per-problem margins with each run's median as a dashed line (Figure 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in margins.values() if len(v)]) \
        if any(len(v) for v in margins.values()) else np.zeros(0)
    # 30 bins need a range: margins equal up to rounding (np.ptp ~ 1e-17) would make numpy refuse
    spread = float(np.ptp(allv)) if len(allv) > 1 else 0.0
    if spread > 1e-9 * max(1.0, float(np.abs(allv).max())):
        bins = np.histogram_bin_edges(allv, bins=30)
    else:  # a narrow explicit range around the common value (an integer count would hit the same refusal)
        mid = float(allv.mean()) if len(allv) else 0.0
        half = max(1e-6, 1e-3 * abs(mid))
        bins = np.linspace(mid - half, mid + half, 11)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, vals) in enumerate(margins.items()):
        vals = np.asarray(vals, dtype=np.float64)
        if len(vals) == 0:
            continue
        c = colors[i % len(colors)]
        med = float(np.median(vals))
        ax.hist(vals, bins=bins, alpha=0.45, color=c, label=f"{label} (median {med:.4f}, n={len(vals)})")
        ax.axvline(med, color=c, linestyle="--")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("mean log-prob of correct - incorrect samples (nats/token)")
    ax.set_ylabel("problems")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_coverage(patterns: Sequence[tuple[str, float]], path: str | os.PathLike,
                  title: str = "Coverage: who solves which problems") -> Path:
    """Horizontal bars, one per solve pattern (label, expected problem count)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(patterns) + 1.2))
    labels = [p[0] for p in patterns]
    vals = [p[1] for p in patterns]
    ax.barh(range(len(vals)), vals, color="tab:blue")
    ax.set_yticks(range(len(vals)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("problems")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_dose_response(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str, ylabel: str,
                       xlabel: str = "λ (fixed)", reference: Optional[float] = None) -> Path:
    """A metric against the dose: points {x, estimate, lo, hi, label, fixed} with CI bars; fixed doses joined by a
    line on a symlog axis (0 is a dose), the others (an adaptive schedule, drawn at the mean dose it used) as
    separate markers; ``reference``: a dashed horizontal line (the λ = 0 value)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    fixed = sorted((p for p in points if p["fixed"]), key=lambda p: p["x"])

    def bars(ps):
        return [[p["estimate"] - p["lo"] for p in ps], [p["hi"] - p["estimate"] for p in ps]]

    if fixed:
        ax.errorbar([p["x"] for p in fixed], [p["estimate"] for p in fixed], yerr=bars(fixed), marker="o", capsize=3,
                    color="tab:blue", label="fixed λ")
        for p in fixed:
            ax.annotate(p["label"], (p["x"], p["estimate"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p in (p for p in points if not p["fixed"]):
        ax.errorbar([p["x"]], [p["estimate"]], yerr=bars([p]), marker="s", capsize=3, color="tab:orange",
                    linestyle="none", label=p["label"])
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
