"""The README's main command, end to end in its --quick form: warm-up -> GRPO and AMIR-GRPO -> report.

Checks that every phase left its files, the plots are real PNGs, and the report's numbers are the ones in the
run directories (nothing typed in by hand).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "launch.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for phase in ("warmup", "grpo", "amir-grpo"):
        assert (out / phase / "metrics.jsonl").stat().st_size > 0, phase
    for label in ("grpo", "amir-grpo"):
        assert list((out / label / "eval").glob("initial_step*.jsonl")) and list((out / label / "eval").glob("final_step*.jsonl"))
        assert list((out / label / "checkpoints").glob("step_*"))
    pngs = sorted(out.glob("plots/*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for m in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every image the report shows exists
        assert (out / m.group(1)).is_file(), m.group(1)
    # the table's pass@1 of each run is the value in that run's eval.jsonl
    summary = json.loads((out / "summary.json").read_text())
    for label in ("GRPO", "AMIR-GRPO"):
        rows = [json.loads(line) for line in (out / label.lower() / "eval.jsonl").read_text().splitlines()]
        final = [r for r in rows if "final/pass@1" in r][-1]["final/pass@1"]
        assert summary[label]["final"]["pass@1"] == final
        assert f"| {label} | " in report and f"{final:.3f}" in report
    assert (out / "compare" / "report.md").is_file()


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """Finished phases are reused on a re-run of the same --out: a different mode or seed must not reuse them."""
    import json

    from launch.demo import main

    (tmp_path / "demo_settings.json").write_text(json.dumps({"quick": True, "seed": 1234, "plan": {}}))
    assert main(["--out", str(tmp_path), "--seed", "7"]) == 2
    assert "holds a demo run with other settings" in capsys.readouterr().err


# ----------------------------------------------------------------------- expected ranges, environment, warm-up stop
def _expected(tmp_path, ranges, plan=None, runs=None):
    path = tmp_path / "expected.json"
    path.write_text(json.dumps({"plan": plan or {"rl_steps": 120}, "ranges": ranges,
                                "runs": runs or [{"seed": 1, "threads": 2, "cpu_capability": "AVX2"}]}))
    return path


def test_range_rows_say_inside_or_outside_as_printed():
    """A value is compared as the report prints it (3 decimals): 0.2996 prints 0.300 and is inside [0.300, 0.400];
    0.2994 prints 0.299 and is outside; a missing number is neither."""
    from launch.demo_report import range_rows

    ranges = {"GRPO": {"pass@1": [0.3, 0.4], "pass@4": [0.5, 0.6]}, "warm-up": {"pass@1": [0.1, 0.2]}}
    rows = range_rows({"GRPO": {"pass@1": 0.2996, "pass@4": 0.6004}, "warm-up": {}}, ranges)
    assert [(r["model"], r["metric"], r["inside"]) for r in rows] == [
        ("GRPO", "pass@1", True), ("GRPO", "pass@4", True), ("warm-up", "pass@1", None)]
    rows = range_rows({"GRPO": {"pass@1": 0.2994, "pass@4": 0.61}}, ranges)
    assert [r["inside"] for r in rows[:2]] == [False, False]


def test_load_expected_names_the_file_and_field(tmp_path):
    from launch.demo_report import load_expected

    with pytest.raises(ValueError, match=r"expected.json: ranges.GRPO.pass@1 must be \[lo, hi\]"):
        load_expected(_expected(tmp_path, {"GRPO": {"pass@1": [0.4, 0.3]}}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"plan": {}, "ranges": {}}')
    with pytest.raises(ValueError, match="bad.json: missing field 'runs'"):
        load_expected(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: cannot read"):
        load_expected(bad)


def test_expected_section_verdicts(tmp_path):
    """Inside, outside (naming the numbers), a quick run (not compared) and other settings (not compared)."""
    from launch.demo_report import _expected_section

    path = _expected(tmp_path, {"GRPO": {"pass@1": [0.3, 0.4]}, "AMIR-GRPO": {"pass@1": [0.3, 0.4]}})
    plan = {"rl_steps": 120}
    text = "\n".join(_expected_section({"GRPO": {"pass@1": 0.35}, "AMIR-GRPO": {"pass@1": 0.31}}, False, plan, path))
    assert "falls inside the expected ranges" in text and "OUTSIDE" not in text
    assert "| GRPO | pass@1 | 0.350 | 0.300–0.400 | inside |" in text
    assert "seeds 1; AVX2, 2 thread(s)), widened by 0 on each side" in text
    text = "\n".join(_expected_section({"GRPO": {"pass@1": 0.35}, "AMIR-GRPO": {"pass@1": 0.25}}, False, plan, path))
    assert "falls OUTSIDE the expected ranges** (AMIR-GRPO pass@1)" in text
    assert "not the demo's" in "\n".join(_expected_section({}, True, plan, path))
    assert "settings differ" in "\n".join(_expected_section({}, False, {"rl_steps": 8}, path))


def test_checked_in_ranges_are_the_recorded_runs_min_max():
    """launch/demo_expected.json: measured with the full PLAN, and each range is the min-max of the runs it lists
    widened by its margin (so the README's ranges contain every recorded run)."""
    from launch.demo import PLAN
    from launch.demo_report import METRICS, MODELS, load_expected

    exp = load_expected()
    assert exp["plan"] == {k: v[0] for k, v in PLAN.items()}
    assert len(exp["runs"]) >= 3
    for model in MODELS:
        for metric in METRICS:
            vals = [round(r["numbers"][model][metric], 3) for r in exp["runs"]]
            want = [round(max(0.0, min(vals) - exp["margin"]), 3), round(min(1.0, max(vals) + exp["margin"]), 3)]
            assert exp["ranges"][model][metric] == want, (model, metric)


def test_environment_record(monkeypatch):
    import torch

    from launch.demo_report import environment_record

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = environment_record(ROOT, 7)
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["OMP_NUM_THREADS"] == "1"
    assert env["seed"] == 7 and (env["commit"] is None or len(env["commit"]) == 40)
    assert environment_record(ROOT.parent / "no-such-dir", 7)["commit"] is None


def test_warmup_stop_reads_where_and_why(tmp_path):
    from launch.demo_report import _stop_sentence, warmup_stop
    from megatron_amir.training.checkpoint import CheckpointManager

    assert warmup_stop(tmp_path) is None
    stop = {"target_accuracy": 0.3, "target_metric": "greedy", "eval_problems": 256, "step_budget": 6000}
    mgr = CheckpointManager(tmp_path / "warmup" / "checkpoints", keep_last=1)
    mgr.save(700, lambda d: (d / "w").write_text("x"), {"step": 700, "stop": stop, "final": {
        "sft/target_reached": 1.0, "eval/greedy_accuracy": 0.3125}})
    w = warmup_stop(tmp_path)
    assert _stop_sentence(w) == ("**Target reached at step 700** of 6000: greedy accuracy on 256 validation "
                                 "problems 0.312 >= 0.3")
    mgr.save(6000, lambda d: (d / "w").write_text("x"), {"step": 6000, "stop": stop, "final": {
        "sft/target_reached": 0.0, "eval/greedy_accuracy": 0.25}})
    assert _stop_sentence(warmup_stop(tmp_path)).startswith("**Step budget exhausted at step 6000**")


def _fake_run(out: Path, seed: int, threads: int, numbers: dict, gain: float) -> Path:
    """The files run_record reads, as a finished full demo run leaves them."""
    (out / "compare").mkdir(parents=True)
    (out / "environment.json").write_text(json.dumps({"seed": seed, "threads": threads, "cpu_capability": "AVX2"}))
    (out / "summary.json").write_text(json.dumps({"GRPO": {"initial": numbers["warm-up"], "final": numbers["GRPO"]},
                                                  "AMIR-GRPO": {"initial": numbers["warm-up"],
                                                                "final": numbers["AMIR-GRPO"]}}))
    ci = {"estimate": gain, "lo": gain - 0.05, "hi": gain + 0.05}
    (out / "compare" / "compare.json").write_text(json.dumps({"pass_at_k_differences": {
        "GRPO - warm-up": {"1": ci}, "AMIR-GRPO - warm-up": {"1": ci}}}))
    (out / "timings.json").write_text(json.dumps({"warm-up": 100.4, "total": 600.6}))
    return out


def test_expected_ranges_from_runs_are_min_max_plus_margin(tmp_path):
    from launch.demo_report import expected_from_runs, range_rows

    def nums(x):
        return {m: {"greedy_accuracy": x, "pass@1": x / 2, "pass@4": min(1.0, 2 * x)}
                for m in ("warm-up", "GRPO", "AMIR-GRPO")}

    outs = [_fake_run(tmp_path / "a", 1, 2, nums(0.3), 0.1), _fake_run(tmp_path / "b", 2, 1, nums(0.4), 0.12),
            _fake_run(tmp_path / "c", 3, 2, nums(0.55), 0.15)]
    exp = expected_from_runs(outs, {"rl_steps": 120}, margin=0.03)
    assert exp["ranges"]["GRPO"] == {"greedy_accuracy": [0.27, 0.58], "pass@1": [0.12, 0.305],
                                     "pass@4": [0.57, 1.0]}  # pass@4 is clipped at 1
    assert [r["seed"] for r in exp["runs"]] == [1, 2, 3] and exp["runs"][0]["wall_s"] == 601
    assert exp["runs"][1]["pass@1_gain_ci"]["AMIR-GRPO"]["lo"] == pytest.approx(0.07)
    for r in exp["runs"]:  # every recorded run lies inside the ranges made from it
        assert all(row["inside"] for row in range_rows(r["numbers"], exp["ranges"]))
    (tmp_path / "c" / "summary.json").write_text(json.dumps({"GRPO": {"initial": {}, "final": {}},
                                                             "AMIR-GRPO": {"initial": {}, "final": {}}}))
    with pytest.raises(ValueError, match="summary.json: no warm-up greedy_accuracy"):
        expected_from_runs(outs, {}, margin=0.03)
