"""Prompt files: schema validation naming file:line and field, skip counting, Parquet, the resumable
sampler (resume == uninterrupted), templates and length filtering."""

import json

import pytest

from megatron_amir.data.dataset import (DatasetError, PromptRecord, PromptSampler, filter_by_length,
                                        load_prompts)
from megatron_amir.data.templates import BOXED_INSTRUCTION, apply_template, get_template

GOOD = [
    {"id": "a", "prompt": "1+1=", "answer": "2"},
    {"id": 7, "prompt": "What is 3*4?", "answer": 12, "metadata": {"level": 1}},
    {"id": "c", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}],
     "answer": 4.0},
]


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    with open(p, "wb") as f:
        for ln in lines:
            f.write((json.dumps(ln) if not isinstance(ln, (str, bytes)) else ln).encode()
                    if not isinstance(ln, bytes) else ln)
            f.write(b"\n")
    return p


def test_good_file(tmp_path):
    p = _write(tmp_path, GOOD + [""])  # a blank line is fine
    recs = load_prompts(p)
    assert [r.id for r in recs] == ["a", "7", "c"]
    assert [r.answer for r in recs] == ["2", "12", "4"]
    assert recs[2].prompt is None and recs[2].messages[1]["content"] == "2+2="
    assert recs[1].metadata == {"level": 1}
    assert recs.skipped == 0


BAD = [
    ("not json {", "bad JSON", None),
    ({"prompt": "x", "answer": "1"}, "missing field 'id'", "id"),
    ({"id": "z", "answer": "1"}, "missing field 'prompt'", "prompt"),
    ({"id": "z", "prompt": "x"}, "missing field 'answer'", "answer"),
    ({"id": "z", "prompt": 5, "answer": "1"}, "field 'prompt' must be a string, got int", "prompt"),
    ({"id": "z", "prompt": "x", "answer": [1]}, "field 'answer' must be a string or number, got list", "answer"),
    ({"id": ["z"], "prompt": "x", "answer": "1"}, "field 'id' must be a string or integer", "id"),
    ({"id": "z", "prompt": "   ", "answer": "1"}, "field 'prompt' is empty", "prompt"),
    ({"id": "z", "prompt": "x", "answer": ""}, "field 'answer' is empty", "answer"),
    ({"id": "z", "messages": [{"role": "user"}], "answer": "1"}, "messages[0].content", "messages"),
    ({"id": "z", "messages": [{"role": "robot", "content": "x"}], "answer": "1"}, "messages[0].role", "messages"),
    ({"id": "z", "prompt": "x", "answer": "1", "metadata": 3}, "field 'metadata' must be an object", "metadata"),
    ({"id": "a", "prompt": "x", "answer": "1"}, "duplicate id 'a' (first at", "id"),
    (b'{"id": "z", "prompt": "caf\xe9", "answer": "1"}', "not valid UTF-8", None),
    ("[1, 2]", "expected a JSON object", None),
]


@pytest.mark.parametrize("bad,msg,fieldname", BAD)
def test_bad_record_names_file_line_and_field(tmp_path, bad, msg, fieldname):
    p = _write(tmp_path, [GOOD[0], GOOD[1], bad, GOOD[2]])
    with pytest.raises(DatasetError) as ei:
        load_prompts(p)
    text = str(ei.value)
    assert text.startswith(f"{p}:3: "), text
    assert msg in text, text
    if fieldname:
        assert f"'{fieldname}" in text
    # skip mode: dropped and counted, the rest loaded
    recs = load_prompts(p, on_bad_record="skip")
    assert recs.skipped == 1 and len(recs) == 3
    assert recs.problems[0].startswith(f"{p}:3: ")


def test_skip_counts_several_and_all_bad_is_an_error(tmp_path):
    p = _write(tmp_path, [GOOD[0], "{", {"id": "q"}, GOOD[1], b"\xff\xfe"])
    recs = load_prompts(p, on_bad_record="skip")
    assert recs.skipped == 3 and [r.id for r in recs] == ["a", "7"]
    p2 = _write(tmp_path, ["{", "{"], name="bad.jsonl")
    with pytest.raises(DatasetError, match="every record was bad"):
        load_prompts(p2, on_bad_record="skip")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_prompts(p, on_bad_record="ignore")
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "1+1=", "answer": "2"}, {"id": "b", "prompt": "", "answer": "3"},
            {"id": "c", "prompt": "5-1=", "answer": "4"}]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(DatasetError, match=rf"{p}:row 2: field 'prompt' is empty"):
        load_prompts(p)
    recs = load_prompts(p, on_bad_record="skip")
    assert [r.id for r in recs] == ["a", "c"] and recs.skipped == 1
    p2 = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "x"}]), p2)
    with pytest.raises(DatasetError, match="row 1: missing field 'answer'"):
        load_prompts(p2)


def _records(n):
    return [PromptRecord(id=f"r{i}", prompt=f"p{i}", answer=str(i)) for i in range(n)]


def test_sampler_resume_equals_uninterrupted():
    recs = _records(23)
    full = PromptSampler(recs, seed=11)
    expected = [r.id for _ in range(9) for r in full.next_batch(7)]  # crosses two epoch boundaries
    a = PromptSampler(recs, seed=11)
    first = [r.id for _ in range(4) for r in a.next_batch(7)]
    state = json.loads(json.dumps(a.state_dict()))  # as saved in a checkpoint
    b = PromptSampler(recs, seed=11)
    b.load_state_dict(state)
    rest = [r.id for _ in range(5) for r in b.next_batch(7)]
    assert first + rest == expected


def test_sampler_epochs_are_permutations_and_reshuffled():
    recs = _records(20)
    s = PromptSampler(recs, seed=3)
    e0 = [r.id for r in s.next_batch(20)]
    e1 = [r.id for r in s.next_batch(20)]
    assert sorted(e0) == sorted(e1) == sorted(r.id for r in recs)
    assert e0 != e1 and s.epoch == 1
    assert [r.id for r in PromptSampler(recs, seed=3).next_batch(20)] == e0  # deterministic
    assert [r.id for r in PromptSampler(recs, seed=4).next_batch(20)] != e0
    assert [r.id for r in PromptSampler(recs, seed=3, shuffle=False).next_batch(5)] == [f"r{i}" for i in range(5)]


def test_sampler_rejects_other_dataset_state():
    s = PromptSampler(_records(10), seed=1)
    s.next_batch(3)
    with pytest.raises(ValueError, match="different dataset"):
        PromptSampler(_records(11), seed=1).load_state_dict(s.state_dict())
    other = [PromptRecord(id=f"x{i}", prompt="p", answer="1") for i in range(10)]
    with pytest.raises(ValueError, match="different dataset"):
        PromptSampler(other, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="missing 'pos'"):
        PromptSampler(_records(10), seed=1).load_state_dict({"epoch": 0})


class _CharTok:
    """One token per character, and a recognizable chat template."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt else "")


def test_templates_and_length_filter(tmp_path):
    tok = _CharTok()
    recs = load_prompts(_write(tmp_path, GOOD))
    plain = apply_template(recs, "plain", tok)
    assert plain[0].prompt == "1+1=" and plain[2].prompt == "[system]be brief[user]2+2=[assistant]"
    boxed = apply_template(recs, "chat-boxed", tok)
    assert boxed[0].prompt == f"[user]1+1=\n{BOXED_INSTRUCTION}[assistant]"
    assert boxed[0].metadata["raw_prompt"] == "1+1="
    custom = apply_template(recs[:2], "Q: {prompt}\nA:", tok)
    assert custom[1].prompt == "Q: What is 3*4?\nA:"
    assert get_template("boxed").render("{x}") == "{x}\n" + BOXED_INSTRUCTION  # braces in text are safe
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")
    kept, rep = filter_by_length(plain, tok, max_prompt_tokens=12)
    assert [r.id for r in kept] == ["a", "7"]  # "What is 3*4?" has 12 chars: kept (<=)
    assert rep.dropped == 1 and rep.dropped_ids == ["c"] and rep.dropped_lengths == [len(plain[2].prompt)]
    assert "dropped 1" in rep.summary() and "c (" in rep.summary()
    with pytest.raises(ValueError, match="no prompt text"):
        filter_by_length(recs, tok, 10)


def test_prepare_prompts_template_then_filter(tmp_path):
    from megatron_amir.data.templates import prepare_prompts

    tok = _CharTok()
    recs = load_prompts(_write(tmp_path, GOOD))
    out, rep = prepare_prompts(recs, tok, "gsm8k", max_prompt_tokens=20)
    # "Question: 1+1=\nAnswer:" is 22 chars > 20: dropped; chat record rendered through the chat template
    assert [r.id for r in out] == []
    assert rep.dropped == 3
    out, rep = prepare_prompts(recs, tok, "plain", max_prompt_tokens=1000)
    assert [r.prompt for r in out][:2] == ["1+1=", "What is 3*4?"] and rep.dropped == 0
    out, rep = prepare_prompts(recs, tok, "plain")
    assert rep is None and len(out) == 3


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([GOOD[0], {"id": "b", "prompt": 3, "answer": "1"}]))
    with pytest.raises(DatasetError, match=rf"{p}:item 2: field 'prompt' must be a string"):
        load_prompts(p)
    assert [r.id for r in load_prompts(p, on_bad_record="skip")] == ["a"]
    p.write_text('[{"id": "a",\n "prompt": }]')
    with pytest.raises(DatasetError, match=rf"{p}:2: bad JSON"):
        load_prompts(p)
