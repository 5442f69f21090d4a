"""Benchmark loaders on small fixture files written here in each benchmark's public format."""

import json

import pytest

from megatron_amir.data.benchmarks import BENCHMARKS, load_benchmark, load_benchmark_file
from megatron_amir.data.dataset import DatasetError


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_math500(tmp_path):
    p = _jsonl(tmp_path / "test.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Find $x$.", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "subject": "Algebra", "level": 3,
         "unique_id": "test/algebra/2.json"},  # original MATH: answer only inside the solution
    ])
    recs = load_benchmark("math500", p)
    assert [r.answer for r in recs] == ["2", "\\frac{1}{2}"]
    assert recs[0].id == "math500/test/algebra/1.json" and recs[0].metadata["level"] == 1
    assert recs[0].metadata["benchmark"] == "math500"
    assert load_benchmark_file(p)[1].answer == "\\frac{1}{2}"  # format detected


def test_aime_amc_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p24 = _jsonl(tmp_path / "aime24.jsonl", [{"id": 60, "problem": "Every morning Aya ...", "answer": "204",
                                              "url": "u", "year": 2024}])
    assert load_benchmark("aime24", p24)[0].answer == "204"
    p25 = tmp_path / "aime25.json"
    p25.write_text(json.dumps([{"question": "Find the sum ...", "answer": 70}, {"question": "Q2", "answer": 588}]))
    recs = load_benchmark("AIME2025", p25)
    assert [r.answer for r in recs] == ["70", "588"] and recs[0].id == "aime25/aime25/0"
    pamc = tmp_path / "amc23.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 0, "question": "How many ...", "answer": 27.0, "url": "x"},
                                         {"id": 1, "question": "What is ...", "answer": 0.5, "url": "y"}]), pamc)
    assert [r.answer for r in load_benchmark("amc23", pamc)] == ["27", "0.5"]


def test_gsm8k(tmp_path):
    p = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Natalia sold clips ...", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 72"},
        {"question": "Big numbers ...", "answer": "...\n#### 1,250"},
    ])
    recs = load_benchmark("gsm8k", p)
    assert [r.answer for r in recs] == ["72", "1250"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: field 'answer' has no '####"):
        load_benchmark("gsm8k", bad)


def test_minerva_and_olympiadbench(tmp_path):
    pm = _jsonl(tmp_path / "minerva.jsonl", [
        {"question": "Compute the energy ...", "answer": "3.5e5"},
        {"problem": "Find the mass ...", "solution": "... $\\boxed{12}$ kg", "type": "Physics"},
    ])
    assert [r.answer for r in load_benchmark("minerva", pm)] == ["3.5e5", "12"]
    po = _jsonl(tmp_path / "ob.jsonl", [
        {"id": 1606, "question": "Find all pairs ...", "final_answer": ["$(1,2)$", "$(2,1)$"], "context": None,
         "is_multiple_answer": True, "unit": None, "answer_type": "Tuple", "subfield": "Algebra"},
        {"id": 1607, "question": "Then what is x?", "final_answer": ["$\\frac{1}{2}$"],
         "context": "A setup sentence.", "answer_type": "Numerical"},
    ])
    recs = load_benchmark("olympiadbench", po)
    assert recs[0].answer == "(1,2), (2,1)" and recs[1].answer == "\\frac{1}{2}"
    assert recs[1].prompt == "A setup sentence.\nThen what is x?"
    assert recs[0].metadata["answer_type"] == "Tuple"
    assert load_benchmark_file(po)[0].answer == "(1,2), (2,1)"  # detected by final_answer


def test_errors_name_file_row_and_field(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no answer", "solution": "none"}])
    with pytest.raises(DatasetError, match=r"m.jsonl:2: missing field 'answer'"):
        load_benchmark("math500", p)
    p2 = _jsonl(tmp_path / "a.jsonl", [{"id": 1, "answer": "3"}])
    with pytest.raises(DatasetError, match=r"a.jsonl:1: missing field 'problem'"):
        load_benchmark("aime24", p2)
    p3 = tmp_path / "broken.jsonl"
    p3.write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: bad JSON"):
        load_benchmark("aime24", p3)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", p)
    with pytest.raises(DatasetError, match="never downloaded"):
        load_benchmark("math500", None)
    assert set(BENCHMARKS) == {"math500", "aime24", "aime25", "amc23", "gsm8k", "minerva", "olympiadbench"}


def test_data_config_source_and_limit(tmp_path):
    from megatron_amir.config import DataConfig

    p = _jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
    cfg = DataConfig(source="benchmark", benchmark="gsm8k", test_path=str(p))
    recs = load_benchmark("gsm8k", cfg, limit=3)
    assert [r.answer for r in recs] == ["0", "1", "2"]


def test_plain_problem_answer_file_is_not_labelled_a_benchmark(tmp_path):
    """A file with only problem|question|prompt + answer matches no benchmark: its ids say plain/, not aime24/."""
    p = _jsonl(tmp_path / "mine.jsonl", [{"id": "q1", "problem": "1+1?", "answer": "2"},
                                         {"prompt": "2+2?", "answer": 4}])
    recs = load_benchmark_file(p)
    assert [r.id for r in recs] == ["plain/q1", "plain/mine/1"] and [r.answer for r in recs] == ["2", "4"]
    assert all(r.metadata["benchmark"] == "plain" for r in recs)
    assert load_benchmark_file(p, "aime24")[0].id == "aime24/q1"  # a named format still labels its ids
    assert load_benchmark_file(p, "plain")[0].id == "plain/q1"
    assert "plain" not in BENCHMARKS
