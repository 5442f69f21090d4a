"""Coverage, margins and bootstrap CIs on fixture run directories with known answers; compare CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_amir.eval import compare
from megatron_amir.eval.results import ProblemResult, ResultsError, read_results, summarize, write_results

N = 4  # samples per problem in the fixtures
# correct-sample counts per problem, per run
COUNTS = {
    "base": {"p0": 1, "p1": 0, "p2": 0, "p3": 0, "p4": 0, "p5": 0},
    "grpo": {"p0": 4, "p1": 0, "p2": 2, "p3": 0, "p4": 1, "p5": 0},
    "amir": {"p0": 4, "p1": 3, "p2": 0, "p3": 0, "p4": 1, "p5": 2},
}
# length-normalized log-prob of correct / incorrect samples (every correct sample of a problem gets the
# first value, every incorrect one the second), for the problems that have both kinds
LOGPROBS = {
    "grpo": {"p2": (-0.50, -0.52), "p4": (-0.40, -0.41)},                   # margins 0.02, 0.01
    "amir": {"p1": (-0.30, -0.35), "p4": (-0.20, -0.30), "p5": (-0.6, -0.58)},  # 0.05, 0.10, -0.02
    "base": {"p0": (-1.0, -1.004)},                                          # 0.004
}


def _write_run(root: Path, name: str, extra_problem: bool = False) -> Path:
    results = []
    for pid, c in COUNTS[name].items():
        correct = [i < c for i in range(N)]
        good, bad = LOGPROBS[name].get(pid, (-0.5, -0.5))
        results.append(ProblemResult(
            id=pid, texts=[f"{pid} sample {i}" for i in range(N)], correct=correct,
            lengths=[10 + 5 * i if correct[i] else 40 for i in range(N)],
            answers=["42" if ok else "7" for ok in correct],
            mean_logprobs=[good if ok else bad for ok in correct], prompt=f"question {pid}", gold="42"))
    if extra_problem:
        results.append(ProblemResult(id="only_here", texts=["t"] * N, correct=[True] * N, lengths=[1] * N))
    d = root / name
    write_results(d / "results.jsonl", results)
    return d


@pytest.fixture()
def runs(tmp_path):
    return {name: _write_run(tmp_path, name, extra_problem=(name == "amir")) for name in COUNTS}


def test_read_results_roundtrip(runs):
    rs = read_results(runs["grpo"])
    assert [r.id for r in rs] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert [r.num_correct for r in rs] == [4, 0, 2, 0, 1, 0]
    s = summarize(rs)
    assert s.pass_at_k[1] == pytest.approx((4 + 0 + 2 + 0 + 1 + 0) / (6 * N))
    assert s.pass_at_k[4] == pytest.approx(3 / 6)
    # lengths: correct samples are 10, 15, 20, 25 by position, incorrect 40
    ok = [10, 15, 20, 25] + [10, 15] + [10]
    assert s.mean_length_correct == pytest.approx(np.mean(ok))
    assert s.mean_length_incorrect == 40
    assert s.median_logprob_margin == pytest.approx(0.015)


def test_coverage_counts_at_k_equals_n(runs):
    loaded = {n: compare.load_run(p, n) for n, p in runs.items()}
    data = compare.compare_runs(loaded["grpo"], loaded["amir"], loaded["base"], n_boot=200)
    assert data["k"] == N and data["num_common_problems"] == 6
    assert data["dropped"] == {"base": 0, "grpo": 0, "amir": 1}
    cells = {tuple(row["pattern"][lab] for lab in ("base", "grpo", "amir")): row["expected_problems"]
             for row in data["coverage"]}
    # solved at pass@4: base {p0}, grpo {p0, p2, p4}, amir {p0, p1, p4, p5}
    want = {(True, True, True): 1, (False, True, True): 1, (False, True, False): 1,
            (False, False, True): 2, (False, False, False): 1}
    for pattern, count in cells.items():
        assert count == pytest.approx(want.get(pattern, 0), abs=1e-12), pattern
    h = data["coverage_highlights"]
    assert h["solved by amir, not grpo"] == pytest.approx(2)
    assert h["solved by grpo, not amir"] == pytest.approx(1)
    assert h["solved by amir, by neither base nor grpo"] == pytest.approx(2)
    assert h["solved by base, not grpo (lost)"] == pytest.approx(0)


def test_coverage_expected_counts_at_k1(runs):
    loaded = {n: compare.load_run(p, n) for n, p in runs.items()}
    data = compare.compare_runs(loaded["grpo"], loaded["amir"], None, k=1, n_boot=200)
    # independent reference: pass@1 = c/n, runs independent, pattern probability is a product
    for row in data["coverage"]:
        want = 0.0
        for pid in COUNTS["grpo"]:
            p = 1.0
            for lab in ("grpo", "amir"):
                q = COUNTS[lab][pid] / N
                p *= q if row["pattern"][lab] else 1 - q
            want += p
        assert row["expected_problems"] == pytest.approx(want, abs=1e-12)
    assert sum(r["expected_problems"] for r in data["coverage"]) == pytest.approx(6)


def test_margins_and_medians(runs):
    loaded = {n: compare.load_run(p, n) for n, p in runs.items()}
    data = compare.compare_runs(loaded["grpo"], loaded["amir"], loaded["base"], n_boot=200)
    m = {lab: data["runs"][lab]["_margins"] for lab in COUNTS}
    assert m["grpo"] == pytest.approx({"p2": 0.02, "p4": 0.01})
    assert m["amir"] == pytest.approx({"p1": 0.05, "p4": 0.10, "p5": -0.02})
    assert m["base"] == pytest.approx({"p0": 0.004})
    assert data["runs"]["amir"]["margin"]["median"] == pytest.approx(0.05)
    assert data["runs"]["grpo"]["margin"]["median"] == pytest.approx(0.015)
    assert data["runs"]["amir"]["margin"]["fraction_positive"] == pytest.approx(2 / 3)
    assert data["runs"]["base"]["margin"]["median_ci"] is None  # one problem: no interval


def test_pass_at_k_differences_are_paired_means(runs):
    loaded = {n: compare.load_run(p, n) for n, p in runs.items()}
    data = compare.compare_runs(loaded["grpo"], loaded["amir"], None, n_boot=300, seed=3)
    d1 = data["pass_at_k_differences"]["amir - grpo"][1]
    want = np.mean([(COUNTS["amir"][p] - COUNTS["grpo"][p]) / N for p in COUNTS["grpo"]])
    assert d1["estimate"] == pytest.approx(want)
    assert d1["lo"] <= d1["estimate"] <= d1["hi"]


def test_bootstrap_contains_true_difference_and_is_deterministic():
    rng = np.random.default_rng(11)
    P, n = 500, 8
    q = rng.uniform(0.2, 0.8, size=P)
    a = rng.binomial(n, q) / n           # pass@1 per problem of run A
    b = rng.binomial(n, q + 0.1) / n     # run B is better by exactly 0.1 in expectation
    ci = compare.paired_bootstrap(a, b, n_boot=2000, seed=5)
    assert ci.lo < 0.1 < ci.hi
    assert ci.lo > 0  # and resolves that B is better
    again = compare.paired_bootstrap(a, b, n_boot=2000, seed=5)
    assert (again.lo, again.hi, again.estimate) == (ci.lo, ci.hi, ci.estimate)
    other = compare.paired_bootstrap(a, b, n_boot=2000, seed=6)
    assert (other.lo, other.hi) != (ci.lo, ci.hi)
    assert other.estimate == ci.estimate == pytest.approx(np.mean(b - a))


def test_bootstrap_coverage_is_near_nominal():
    # repeated synthetic experiments: the 90% interval should hold the true difference ~90% of the time
    rng = np.random.default_rng(0)
    hits, reps = 0, 150
    for r in range(reps):
        q = rng.uniform(0.1, 0.7, size=120)
        a = rng.binomial(4, q) / 4
        b = rng.binomial(4, q + 0.2) / 4
        ci = compare.paired_bootstrap(a, b, n_boot=400, seed=r, alpha=0.10)
        hits += ci.lo <= 0.2 <= ci.hi
    assert 0.80 <= hits / reps <= 0.97


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        compare.bootstrap_ci([])
    with pytest.raises(ValueError):
        compare.paired_bootstrap([1.0, 2.0], [1.0])


def test_weighted_statistics_equal_the_expanded_sample():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=9), 2)  # rounding makes ties
    w = rng.integers(0, 4, size=(50, 9)).astype(np.float64)
    w[:, 0] += 1  # every resample non-empty
    for row, med, mean in zip(w, compare.weighted_median(x, w), compare.weighted_mean(x, w)):
        expanded = np.repeat(x, row.astype(int))
        assert med == np.median(expanded)
        assert mean == pytest.approx(expanded.mean())


def test_cluster_bootstrap_with_one_value_per_cluster_is_the_plain_bootstrap():
    x = np.random.default_rng(4).normal(size=60)
    ids = [f"p{i}" for i in range(60)]
    for plain, wstat in ((None, compare.weighted_mean), (compare._median_rows, compare.weighted_median)):
        a = compare.bootstrap_ci(x, plain, n_boot=500, seed=9)
        c = compare.cluster_bootstrap_ci(x, ids, wstat, n_boot=500, seed=9)
        assert (c.estimate, c.lo, c.hi) == pytest.approx((a.estimate, a.lo, a.hi), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("wstat", [compare.weighted_mean, compare.weighted_median])
def test_cluster_bootstrap_does_not_count_correlated_seeds_as_independent(wstat):
    """S seeds with identical values per problem carry the information of one seed: the pooled CI must be the
    single-seed CI, not ~1/sqrt(S) as wide (what resampling (seed, problem) pairs independently gives)."""
    P, S = 80, 4
    x = np.random.default_rng(5).normal(size=P)
    ids = [f"p{i}" for i in range(P)]
    one = compare.cluster_bootstrap_ci(x, ids, wstat, n_boot=1000, seed=2)
    # pooled seed-major, like the study: seed 0's problems, then seed 1's, ...
    pooled = compare.cluster_bootstrap_ci(np.tile(x, S), ids * S, wstat, n_boot=1000, seed=2)
    assert (pooled.estimate, pooled.lo, pooled.hi) == pytest.approx((one.estimate, one.lo, one.hi))
    plain = None if wstat is compare.weighted_mean else compare._median_rows
    naive = compare.bootstrap_ci(np.tile(x, S), plain, n_boot=1000, seed=2)  # the old unit: (seed, problem) pairs
    assert (naive.hi - naive.lo) < 0.7 * (one.hi - one.lo)  # ~1/sqrt(4) = 0.5: the per-pair resampling is too narrow
    again = compare.cluster_bootstrap_ci(np.tile(x, S), ids * S, wstat, n_boot=1000, seed=2)
    assert (again.lo, again.hi) == (pooled.lo, pooled.hi)
    assert (compare.cluster_bootstrap_ci(np.tile(x, S), ids * S, wstat, n_boot=1000, seed=3).lo) != pooled.lo


def test_cluster_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        compare.cluster_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="cluster labels"):
        compare.cluster_bootstrap_ci([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="alpha"):
        compare.cluster_bootstrap_ci([1.0, 2.0], ["a", "b"], alpha=1.0)


def _is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = compare.main([str(runs["grpo"]), str(runs["amir"]), str(runs["base"]), "--out", str(out), "--n-boot", "300"])
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    for section in ("pass@k", "Coverage at pass@4", "paired bootstrap", "Separation of correct and incorrect"):
        assert section in report
    for png in ("pass_at_k.png", "coverage.png", "margin.png"):
        assert _is_png(out / png), png
        assert f"]({png})" in report
    data = json.loads((out / "compare.json").read_text())
    assert data["runs"]["amir"]["pass_at_k"]["4"] == pytest.approx(4 / 6)
    assert data["runs"]["grpo"]["margins"] == pytest.approx({"p2": 0.02, "p4": 0.01})
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.png"))  # no temp files left behind


def test_compare_cli_labels_and_run_given_as_file(runs, tmp_path):
    out = tmp_path / "r2"
    rc = compare.main([str(runs["grpo"] / "results.jsonl"), str(runs["amir"]), "--out", str(out),
                       "--labels", "GRPO,AMIR", "--k", "2", "--n-boot", "100"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "Coverage at pass@2" in report and "AMIR - GRPO" in report


def test_missing_run_dir_names_the_path(runs, tmp_path, capsys):
    missing = tmp_path / "nope"
    rc = compare.main([str(runs["grpo"]), str(missing), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ResultsError, match="holds no results.jsonl"):
        read_results(empty)


@pytest.mark.parametrize("bad_line,why", [
    ("{not json", "malformed"),
    ('{"id": "x", "correct": [true, "yes"], "lengths": [1, 2]}', "booleans"),
    ('{"id": "x", "correct": [true], "lengths": [1, 2]}', "has 2 entries"),
    ('{"correct": [true], "lengths": [1]}', "missing field"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_results_line_names_file_and_line(runs, tmp_path, capsys, bad_line, why):
    path = runs["grpo"] / "results.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match=f"results.jsonl:3: .*{why}"):
        read_results(runs["grpo"])
    rc = compare.main([str(runs["grpo"]), str(runs["amir"]), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert f"{path}:3" in capsys.readouterr().err


def test_duplicate_ids_and_disjoint_runs_are_errors(runs, tmp_path):
    path = runs["base"] / "results.jsonl"
    first = path.read_text().splitlines()[0]
    path.write_text(path.read_text() + first + "\n")
    with pytest.raises(ResultsError, match="duplicate problem id 'p0'"):
        read_results(path)
    other = tmp_path / "other"
    write_results(other / "results.jsonl", [ProblemResult(id="zzz", texts=["t"], correct=[True], lengths=[1])])
    with pytest.raises(ValueError, match="share no problem ids"):
        compare.compare_runs(compare.load_run(runs["grpo"], "a"), compare.load_run(other, "b"))


def test_report_shows_settings_and_warns_on_mismatch(runs, tmp_path):
    for name, temp in (("grpo", 0.6), ("amir", 1.0)):
        (runs[name] / "summary.json").write_text(json.dumps(
            {"extra": {"sampling_params": {"temperature": temp, "max_new_tokens": 64, "seed": 3}, "bench": "b.jsonl",
                       "seed": 1 if name == "grpo" else 2, "elapsed_s": 9}}))
    out = tmp_path / "warn"
    assert compare.main([str(runs["grpo"]), str(runs["amir"]), "--out", str(out), "--n-boot", "50"]) == 0
    report = (out / "report.md").read_text()
    assert "| run | bench | max_new_tokens | seed | temperature |" in report
    assert "different temperature" in report and "seed" not in report.split("Warning")[1].split("\n")[0]
    (runs["amir"] / "summary.json").write_text((runs["grpo"] / "summary.json").read_text())
    compare.main([str(runs["grpo"]), str(runs["amir"]), "--out", str(out), "--n-boot", "50"])
    assert "Warning" not in (out / "report.md").read_text()
