"""Pieces of the follow-up study reports (launch/study_reports.py): wall time from logs, the pair structure of the
two reward schemes, per-style answer accuracy, and the summaries quoted in results.md."""

from launch import study_reports as R
from megatron_amir.eval.results import ProblemResult


def test_run_wall_seconds_spans_midnight_and_leaves_out_long_gaps(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "/venv/.../warnings.py: UserWarning",          # no timestamp: ignored
        "23:59:50 [rank0] INFO start",
        "00:00:20 [rank0] INFO step 1",                 # +30 s across midnight
        "00:01:20 [rank0] INFO step 2",                 # +60 s
        "02:00:00 [rank0] INFO resumed",                # a gap of ~2 h: an interrupted run, not counted
        "02:00:05 [rank0] INFO final",                  # +5 s
    ]) + "\n")
    assert R.run_wall_seconds(log) == 95.0
    assert R.wall_time([log, tmp_path / "missing.log"]) == (95.0, [log])


def test_pairs_per_group_under_the_two_reward_schemes():
    # 4 samples: 2 correct, 1 wrong with an answer, 1 without an answer
    # (the results' answers fall back to a looser extraction: the sample without '####' still has one there)
    r = ProblemResult(id="p", texts=["#### 5", "1+4=5 #### 5", "#### 4", "1+4=5"], correct=[True, True, False, False],
                      lengths=[1, 1, 1, 1], answers=["5", "5", "4", "5"])
    # 0/1, margin 0.5: every correct x incorrect; 2.0 + 0.5 format, margin 2.0: correct (2.5) x no answer (0) only,
    # a correct vs a formatted wrong answer being exactly 2.0 apart
    assert R._pairs_per_group(r, "01") == 4.0
    assert R._pairs_per_group(r, "paper") == 2.0


def test_answer_accuracy_by_style():
    r = ProblemResult(id="add:12+30=", texts=["12+30= 2+0=2 1+3=4 #### 42", "2+0=2 1+3=4 #### 42",
                                              "12+30= 2+0=2 #### 2", "2+0=2 1+3=4 #### 42"],
                      correct=[True, False, False, False], lengths=[9, 6, 6, 6], answers=["42", "42", "2", "42"],
                      gold="42")
    assert R._answer_accuracy(r) == 0.75  # the style gate made only the first correct; the answers say 3 of 4
    assert R._answer_accuracy(r, True) == 0.5 and R._answer_accuracy(r, False) == 1.0
    assert R._answer_accuracy(ProblemResult(id="x", texts=["1"], correct=[False], lengths=[1], answers=["1"],
                                            gold="1"), True) is None


def test_summary_is_the_first_paragraph_of_its_section(tmp_path):
    rep = tmp_path / "r.md"
    rep.write_text("# T\n\n## Summary\n\n- a\n- b\n\nSetting: long text\n\n## Per arm\n\nrows\n")
    assert R.summary_of(rep) == "- a\n- b"
    assert R.summary_of(tmp_path / "none.md") == ""
