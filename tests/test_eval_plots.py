"""Training-curve helpers: metrics parsing, seed aggregation, smoothing, PNG output."""

import json

import numpy as np
import pytest

from megatron_amir.eval import plots


def _write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _is_png(p):
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metric_series_skips_missing_and_nonfinite(tmp_path):
    rows = [{"step": 2, "a": 0.5}, {"step": 1, "a": 0.25}, {"step": 3}, {"step": 4, "a": "nan"},
            {"step": 5, "a": True}, {"step": 6, "a": 1}]
    steps, vals = plots.metric_series(rows, "a")
    assert steps.tolist() == [1, 2, 6] and vals.tolist() == [0.25, 0.5, 1.0]
    assert plots.first_key(rows, ["missing", "a"]) == "a"
    assert plots.first_key(rows, ["missing"]) is None


def test_aggregate_runs_mean_min_max_on_common_steps():
    s1 = (np.array([0, 1, 2, 3]), np.array([1.0, 2.0, 3.0, 4.0]))
    s2 = (np.array([1, 2, 3, 4]), np.array([10.0, 20.0, 30.0, 40.0]))
    steps, mean, lo, hi = plots.aggregate_runs([s1, s2])
    assert steps.tolist() == [1, 2, 3]
    assert mean.tolist() == [6.0, 11.5, 17.0]  # (2+10)/2, (3+20)/2, (4+30)/2
    assert lo.tolist() == [2.0, 3.0, 4.0] and hi.tolist() == [10.0, 20.0, 30.0]


def test_smooth_is_a_trailing_mean():
    x = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    got = plots.smooth(x, 3)
    want = [1.0, 2.0, 3.0, 5.0, 7.0]
    assert got.tolist() == pytest.approx(want)
    assert plots.smooth(x, 1) is x


def test_training_curves_write_pngs_for_panels_with_data(tmp_path):
    rng = np.random.default_rng(0)
    runs = {}
    for algo in ("grpo", "amir"):
        paths = []
        for seed in range(2):
            rows = [{"step": s, "reward/accuracy": float(rng.random()), "response/length_correct": 20 + s,
                     "response/length_incorrect": 30 + s, "amir/pair_accuracy": 0.5 + 0.01 * s}
                    for s in range(1, 11)]
            paths.append(_write_metrics(tmp_path / f"{algo}_{seed}" / "metrics.jsonl", rows))
        runs[algo] = paths
    written = plots.plot_training_curves(runs, tmp_path / "plots", smooth_window=3)
    assert set(written) == {"accuracy", "response_length", "pair_accuracy"}  # no log-prob gap / eval logged
    for p in written.values():
        assert _is_png(p)
    # a single path per label works too
    w2 = plots.plot_training_curves({"one": runs["grpo"][0]}, tmp_path / "p2", prefix="x_")
    assert (tmp_path / "p2" / "x_accuracy.png").is_file() and "accuracy" in w2


def test_load_metrics_errors_name_file_and_line(tmp_path):
    p = _write_metrics(tmp_path / "m.jsonl", [{"step": 1}])
    with open(p, "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        plots.load_metrics(p)
    p.write_text('{"no_step": 1}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: .*'step'"):
        plots.load_metrics(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        plots.load_metrics(tmp_path / "missing.jsonl")


def test_eval_plots(tmp_path):
    p1 = plots.plot_pass_at_k({"a": {1: 0.2, 2: 0.3, 4: 0.4}}, tmp_path / "pk.png",
                              intervals={"a": {1: (0.1, 0.3), 2: (0.2, 0.4), 4: (0.3, 0.5)}})
    p2 = plots.plot_margin_distribution({"a": [0.01, 0.02, -0.01], "b": []}, tmp_path / "m.png")
    p3 = plots.plot_coverage([("both", 3.0), ("neither", 1.5)], tmp_path / "c.png")
    assert all(_is_png(p) for p in (p1, p2, p3))


def test_margin_histogram_of_values_equal_up_to_rounding(tmp_path):
    """np.histogram_bin_edges(bins=30) refuses a range of 1e-17; the plot falls back to fewer bins."""
    assert _is_png(plots.plot_margin_distribution({"a": [0.19999999999999998, 0.2, 0.2]}, tmp_path / "m.png"))
