"""Multi-seed study report on fixture runs with known answers."""

import json

import numpy as np
import pytest

from megatron_amir.eval import study
from megatron_amir.eval.results import ProblemResult, write_results

N = 4
# algorithm -> seed -> correct counts for problems p0..p3
COUNTS = {"GRPO": [[0, 1, 2, 4], [0, 0, 2, 4]], "AMIR": [[1, 2, 2, 4], [0, 3, 2, 4]]}


def _make(tmp_path, periodic=False):
    groups = {}
    for algo, seeds in COUNTS.items():
        dirs = []
        for s, counts in enumerate(seeds):
            d = tmp_path / f"{algo}_{s}"
            rs = [ProblemResult(id=f"p{i}", texts=["t"] * N, correct=[j < c for j in range(N)],
                                lengths=[10 if j < c else 20 for j in range(N)],
                                mean_logprobs=[-0.1 if j < c else -0.2 - 0.01 * s for j in range(N)])
                  for i, c in enumerate(counts)]
            if periodic:  # the trainer's periodic eval files: the highest step must be used
                write_results(d / "eval" / "eval_step000010.jsonl", [ProblemResult(id=f"p{i}", texts=["t"] * N,
                              correct=[False] * N, lengths=[1] * N) for i in range(4)])
                write_results(d / "eval" / "eval_step000040.jsonl", rs)
            else:
                write_results(d / "results.jsonl", rs)
            (d / "metrics.jsonl").write_text("".join(json.dumps({"step": t, "reward/accuracy": 0.1 * t}) + "\n"
                                                     for t in range(1, 6)))
            dirs.append(str(d))
        groups[algo] = dirs
    return groups


@pytest.mark.parametrize("periodic", [False, True])
def test_study_numbers(tmp_path, periodic):
    groups = _make(tmp_path, periodic)
    data = study.build_study(groups, "GRPO", n_boot=200)
    g = data["algorithms"]["GRPO"]["seeds"]
    assert g[0]["pass_at_k"][1] == pytest.approx((0 + 1 + 2 + 4) / 16)
    assert g[1]["pass_at_k"][4] == pytest.approx(2 / 4)
    # seed-averaged per-problem pass@1 difference, AMIR - GRPO: p0 (0.5-0)/4, p1 (2.5-0.5)/4, p2 0, p3 0
    d = data["differences"]["AMIR - GRPO"][1]
    assert d["estimate"] == pytest.approx(np.mean([0.5 / 4, 2.0 / 4, 0, 0]))
    # margins: every mixed problem has -0.1 - (-0.2 - 0.01 s) = 0.1 + 0.01 s
    assert g[1]["margin_median"] == pytest.approx(0.11)
    # coverage at k=4, seed-averaged solve probabilities: GRPO p0 0, p1 0.5, p2 1, p3 1; AMIR p0 0.5, p1..p3 1
    cells = {(r["pattern"]["GRPO"], r["pattern"]["AMIR"]): r["expected_problems"] for r in data["coverage"]}
    assert cells[(True, True)] == pytest.approx(0.5 + 1 + 1)      # p1 (0.5 * 1), p2, p3
    assert cells[(False, True)] == pytest.approx(0.5 + 0.5)       # p0 (1 * 0.5), p1 (0.5 * 1)
    assert cells[(False, False)] == pytest.approx(0.5)            # p0 (1 * 0.5)
    assert cells[(True, False)] == pytest.approx(0.0)
    assert sum(cells.values()) == pytest.approx(4)
    if periodic:
        assert all(f.endswith("eval_step000040.jsonl") for f in data["files"].values())


def test_study_cli_writes_report(tmp_path, capsys):
    groups = _make(tmp_path)
    report = tmp_path / "docs" / "results.md"
    args = [a for lab, ds in groups.items() for a in ("--run", f"{lab}={','.join(ds)}")]
    rc = study.main(args + ["--out", str(tmp_path / "docs" / "assets"), "--report", str(report), "--n-boot", "100"])
    assert rc == 0, capsys.readouterr().err
    text = report.read_text()
    assert "AMIR - GRPO" in text and "## Coverage at pass@4" in text and "## Files" in text
    assert "](assets/study_pass_at_k.png)" in text and "](assets/study_train_accuracy.png)" in text
    assert (tmp_path / "docs" / "assets" / "study_margin.png").is_file()
    saved = json.loads((tmp_path / "docs" / "assets" / "study.json").read_text())
    assert saved["num_problems"] == 4
    # the runs sit outside the report's folder: still relative paths, never this machine's absolute ones
    assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(saved)
    assert all(f.startswith("../") for f in saved["files"].values())


def test_study_bad_arguments(tmp_path, capsys):
    groups = _make(tmp_path)
    assert study.main(["--run", "nolabel", "--out", str(tmp_path / "o")]) == 2
    assert "LABEL=DIR" in capsys.readouterr().err
    assert study.main(["--run", f"A={tmp_path / 'missing'}", "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reference"):
        study.build_study(groups, "PPO")


def test_study_with_base_run(tmp_path):
    groups = _make(tmp_path)
    base = tmp_path / "base"
    write_results(base / "results.jsonl", [ProblemResult(id=f"p{i}", texts=["t"] * N, correct=[j < c for j in range(N)],
                                                         lengths=[5] * N) for i, c in enumerate([0, 0, 0, 1])])
    data = study.build_study(groups, "GRPO", str(base), n_boot=100)
    assert data["algorithms"]["base"]["seeds"][0]["pass_at_k"][4] == pytest.approx(1 / 4)
    assert set(data["coverage"][0]["pattern"]) == {"base", "GRPO", "AMIR"}
    cells = {tuple(r["pattern"][x] for x in ("base", "GRPO", "AMIR")): r["expected_problems"] for r in data["coverage"]}
    assert cells[(True, True, True)] == pytest.approx(1)        # p3 only
    assert cells[(False, True, True)] == pytest.approx(0.5 + 1)  # p1 (GRPO 0.5), p2
    assert sum(cells.values()) == pytest.approx(4)
    with pytest.raises(ValueError, match="clashes"):
        study.build_study({"base": groups["GRPO"]}, "base", str(base))


def test_repeated_run_label_adds_seeds(tmp_path, capsys):
    """--run GRPO=a --run GRPO=b is the same group as --run GRPO=a,b (the first one used to be dropped)."""
    groups = _make(tmp_path)
    args = [a for lab, ds in groups.items() for d in ds for a in ("--run", f"{lab}={d}")]
    rc = study.main(args + ["--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.md"), "--n-boot", "50"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "o" / "study.json").read_text())
    assert {k: len(v["seeds"]) for k, v in data["algorithms"].items()} == {k: len(v) for k, v in groups.items()}


def test_run_label_may_hold_an_equals_sign():
    """launch.study's arms are labelled like "AMIR-GRPO async k=1": the last '=' ends the label."""
    assert study._parse_run_arg("AMIR-GRPO async k=1=runs/a,runs/b") == ("AMIR-GRPO async k=1", ["runs/a", "runs/b"])
    assert study._parse_run_arg("GRPO=runs/a") == ("GRPO", ["runs/a"])
    with pytest.raises(ValueError, match="LABEL=DIR"):
        study._parse_run_arg("=runs/a")

def test_pooled_margin_ci_resamples_problems_not_seed_problem_pairs(tmp_path):
    """Seeds that agree exactly on every problem add no information: the pooled-margin CI over S such seeds must
    equal the one-seed CI (cluster bootstrap over problems), not be ~1/sqrt(S) as wide."""
    P, S = 60, 4
    margins = np.random.default_rng(7).normal(0.05, 0.1, size=P)
    d = tmp_path / "run"
    write_results(d / "results.jsonl", [ProblemResult(id=f"p{i}", texts=["t"] * 2, correct=[True, False],
                                                      lengths=[10, 10], mean_logprobs=[float(m) - 0.5, -0.5])
                                        for i, m in enumerate(margins)])
    one = study.build_study({"A": [str(d)]}, "A", n_boot=1000, seed=3)["algorithms"]["A"]
    many = study.build_study({"A": [str(d)] * S}, "A", n_boot=1000, seed=3)["algorithms"]["A"]
    assert one["margin_pooled_median"] == pytest.approx(np.median(margins))
    assert many["margin_pooled_median"] == pytest.approx(one["margin_pooled_median"])
    ci1, ciS = one["margin_pooled_median_ci"], many["margin_pooled_median_ci"]
    assert ciS["hi"] - ciS["lo"] > 0
    assert (ciS["lo"], ciS["hi"]) == pytest.approx((ci1["lo"], ci1["hi"]))
    # deterministic given the seed
    again = study.build_study({"A": [str(d)] * S}, "A", n_boot=1000, seed=3)["algorithms"]["A"]
    assert again["margin_pooled_median_ci"] == ciS
