"""Arm tables (megatron_amir.eval.arms): estimates, CIs, paired differences and slopes against float64 references
computed here by plain loops over the same bootstrap draws."""

import json
import math

import numpy as np
import pytest

from megatron_amir.eval.arms import (
    Arm,
    eval_metrics_table,
    standard_eval_metrics,
    t_quantile,
    tail_mean,
    train_metrics_table,
)
from megatron_amir.eval.compare import paired_bootstrap, resample_indices
from megatron_amir.eval.passk import pass_at_k
from megatron_amir.eval.results import ProblemResult, write_results

N, P = 4, 12
DOSES = {"A": 0.0, "B": 0.5, "C": 1.0, "D": None}


def _runs(tmp_path):
    """Arms A..D x 2 seeds on P problems with random correct counts, lengths and log-probs; metrics.jsonl per run."""
    rng = np.random.default_rng(3)
    groups, raw = {}, {}
    for ai, arm in enumerate(DOSES):
        dirs = []
        for s in range(2):
            d = tmp_path / f"{arm}_{s}"
            rs = []
            for i in range(P):
                c = int(rng.integers(0, N + 1))
                corr = [j < c for j in range(N)]
                rs.append(ProblemResult(id=f"p{i}", texts=["t"] * N, correct=corr,
                                        lengths=[int(x) for x in rng.integers(5, 30, N)],
                                        mean_logprobs=[float(x) for x in -rng.random(N) + 0.1 * ai * np.array(corr)]))
            write_results(d / "results.jsonl", rs)
            vals = 0.5 + 0.1 * ai + 0.01 * s + 0.001 * np.arange(30)
            (d / "metrics.jsonl").write_text("".join(json.dumps({"step": t + 1, "m": float(vals[t])}) + "\n"
                                                     for t in range(30)))
            raw[(arm, s)] = (rs, vals)
            dirs.append(str(d))
        groups[arm] = dirs
    return groups, raw


def test_t_quantile_matches_the_table():
    # float64 reference values of Student's t (two-sided 95% and 99%)
    for q, df, ref in [(0.975, 1, 12.706204736174707), (0.975, 2, 4.302652729911275), (0.975, 10, 2.228138851964939),
                       (0.995, 5, 4.032142983557536), (0.975, 200, 1.971896224747), (0.025, 3, -3.182446305284263)]:
        assert t_quantile(q, df) == pytest.approx(ref, abs=1e-8)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_eval_table_against_loop_references(tmp_path):
    groups, raw = _runs(tmp_path)
    arms = {lab: Arm(ds, DOSES[lab]) for lab, ds in groups.items()}
    t = eval_metrics_table(arms, "A", standard_eval_metrics([1, 2]), coverage_k=2, n_boot=300, seed=5)
    # the table orders problems by id (p0, p1, p10, p11, p2, ...): the references use that order, so the
    # bootstrap draws pick the same problems
    order = sorted(range(P), key=lambda i: f"p{i}")

    def per_problem(arm, f):
        return np.array([[f(raw[(arm, s)][0][i]) for i in order] for s in range(2)]).mean(axis=0)

    q = {a: per_problem(a, lambda r: pass_at_k(r.n, r.num_correct, 2)) for a in DOSES}
    p1 = {a: per_problem(a, lambda r: pass_at_k(r.n, r.num_correct, 1)) for a in DOSES}
    assert t["problems"] == P and sorted(t["files"]) == sorted(DOSES)
    for a in DOSES:
        assert t["arms"][a]["pass@2"]["estimate"] == pytest.approx(q[a].mean(), abs=1e-12)
        assert t["arms"][a]["length"]["estimate"] == pytest.approx(
            per_problem(a, lambda r: np.mean(r.lengths)).mean(), abs=1e-12)
        # coverage beyond the reference: sum over problems of q_a (1 - q_ref)
        assert t["arms"][a]["beyond_reference"]["estimate"] == pytest.approx(float((q[a] * (1 - q["A"])).sum()))
        assert t["arms"][a]["reference_only"]["estimate"] == pytest.approx(float((q["A"] * (1 - q[a])).sum()))
    # a difference is the paired bootstrap of the seed-averaged per-problem values (the same draws)
    for a in "BCD":
        ref = paired_bootstrap(p1["A"], p1[a], n_boot=300, seed=5)
        d = t["differences"][a]["pass@1"]
        assert (d["estimate"], d["lo"], d["hi"]) == pytest.approx((ref.estimate, ref.lo, ref.hi), abs=1e-12)
    # the slope over the dosed arms A, B, C (D has none): polyfit on the estimates, and per resample
    x = np.array([0.0, 0.5, 1.0])
    est = [p1[a].mean() for a in "ABC"]
    assert t["slopes"]["pass@1"]["estimate"] == pytest.approx(np.polyfit(x, est, 1)[0], abs=1e-12)
    slopes = [np.polyfit(x, [p1[a][idx].mean() for a in "ABC"], 1)[0]
              for chunk in resample_indices(P, 300, 5, 256) for idx in chunk]
    lo, hi = np.quantile(slopes, [0.025, 0.975])
    assert (t["slopes"]["pass@1"]["lo"], t["slopes"]["pass@1"]["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    # the margin: median of the pooled per-(seed, problem) margins; a resample repeats each problem's margins
    def margins(a):
        out = []
        for s in range(2):
            for i, r in enumerate(raw[(a, s)][0][k] for k in order):
                good = [lp for lp, ok in zip(r.mean_logprobs, r.correct) if ok]
                bad = [lp for lp, ok in zip(r.mean_logprobs, r.correct) if not ok]
                if good and bad:
                    out.append((i, np.mean(good) - np.mean(bad)))
        return out

    for a in "AC":
        m = margins(a)
        assert t["arms"][a]["margin"]["estimate"] == pytest.approx(np.median([v for _, v in m]), abs=1e-12)
        meds = [np.median([v for j in idx for (i, v) in m if i == j]) for chunk in resample_indices(P, 300, 5, 256)
                for idx in chunk]
        lo, hi = np.quantile(meds, [0.025, 0.975])
        assert (t["arms"][a]["margin"]["lo"], t["arms"][a]["margin"]["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    with pytest.raises(ValueError, match="reference"):
        eval_metrics_table(arms, "Z", standard_eval_metrics([1]))


def test_train_table_t_intervals_and_slope(tmp_path):
    groups, raw = _runs(tmp_path)
    arms = {lab: Arm(ds, DOSES[lab]) for lab, ds in groups.items()}
    t = train_metrics_table(arms, "A", {"m": "m"}, tail=10)
    seeds = {a: [float(raw[(a, s)][1][20:].mean()) for s in range(2)] for a in DOSES}
    for a in DOSES:
        v = np.array(seeds[a])
        h = 12.706204736174707 * v.std(ddof=1) / math.sqrt(2)
        got = t["arms"][a]["m"]
        assert got["seeds"] == pytest.approx(seeds[a], abs=1e-12)
        assert (got["estimate"], got["lo"], got["hi"]) == pytest.approx((v.mean(), v.mean() - h, v.mean() + h))
    # OLS slope over the six dosed seed points, its standard error from numpy's least-squares covariance
    x = np.repeat([0.0, 0.5, 1.0], 2)
    y = np.concatenate([seeds[a] for a in "ABC"])
    coef, cov = np.polyfit(x, y, 1, cov="unscaled")
    resid = y - np.polyval(coef, x)
    se = math.sqrt(cov[0, 0] * float(resid @ resid) / (len(x) - 2))
    s = t["slopes"]["m"]
    assert s["estimate"] == pytest.approx(coef[0], abs=1e-12)
    assert s["hi"] - s["estimate"] == pytest.approx(2.7764451051977987 * se, rel=1e-7)
    assert t["differences"]["C"]["m"]["estimate"] == pytest.approx(np.mean(seeds["C"]) - np.mean(seeds["A"]))
    assert tail_mean([{"step": 1, "m": 1.0}, {"step": 2, "m": "nan"}, {"step": 3, "m": 3.0}], "m", 2) == 3.0
    assert tail_mean([{"step": 1}], "m", 2) is None
