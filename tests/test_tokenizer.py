"""Tokenizers: the demo sentencepiece model (cache, round trips, boundaries, chat template, save/load)
and an HF tokenizer directory built in the test (ids survive save + reload)."""

import json
import os

import pytest

from megatron_amir.data.synthetic import corpus_lines, make_splits
from megatron_amir.data.tokenizer import (DEMO_SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer,
                                          demo_tokenizer, load_tokenizer)


@pytest.fixture(scope="module")
def problems():
    tr, te = make_splits(kinds=["add", "sub", "mul", "linear", "word"], num_train=1500, num_test=100, seed=3)
    return tr, te


@pytest.fixture(scope="module")
def tok(problems, tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tokcache"), corpus_lines(problems[0]), vocab_size=256)


def test_demo_tokenizer_basics(tok, problems):
    assert tok.vocab_size <= 256
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    lengths = []
    for p in problems[0] + problems[1]:
        a, b = tok.encode(p.prompt), tok.encode(p.solution)
        # prompt and completion encoded apart give the same ids as encoded together
        assert a + b == tok.encode(p.prompt + p.solution)
        assert tok.decode(a + b) == p.prompt + p.solution
        assert tok.unk_id not in a + b
        lengths.append(len(b) + 1)
    assert 8 <= min(lengths) and max(lengths) <= 64, (min(lengths), max(lengths))
    # digits are one token each
    ids = tok.encode("1234567890")
    assert len(ids) == 10 and tok.decode(ids) == "1234567890"


def test_decode_skip_special_and_ascii_roundtrip(tok):
    text = "Any ASCII: ~`!@#$%^&*()_+{}|:\"<>?[]\\;',./ \t\nxyz QRS"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    with_specials = [tok.bos_id] + tok.encode("12+3=") + [tok.eos_id, tok.pad_id]
    assert tok.decode(with_specials) == "12+3="
    assert tok.decode(with_specials, skip_special=False) == "<s>12+3=</s><pad>"
    # ids past the vocabulary (padding rows of a larger embedding) decode to nothing, like specials
    assert tok.decode(tok.encode("7+") + [tok.vocab_size, tok.vocab_size + 40]) == "7+"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size], skip_special=False)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_chat_template_markers_are_single_tokens(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}])
    assert text == "<|system|>be brief<|end|><|user|>2+2=<|end|><|assistant|>"
    ids = tok.encode(text)
    for marker in DEMO_SPECIAL_TOKENS:
        assert len(tok.encode(marker)) == 1
    assert tok.decode(ids) == "be brief2+2="
    assert tok.decode(ids, skip_special=False) == text
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_cache_hit_same_ids_and_new_entry_on_changed_inputs(problems, tmp_path):
    texts = corpus_lines(problems[0][:300])
    t1 = demo_tokenizer(tmp_path, texts, vocab_size=200)
    entries = sorted(os.listdir(tmp_path))
    assert len(entries) == 1 and entries[0].startswith("spm-")
    mtime = os.path.getmtime(tmp_path / entries[0] / "tokenizer.model")
    t2 = demo_tokenizer(tmp_path, texts, vocab_size=200)
    assert os.path.getmtime(tmp_path / entries[0] / "tokenizer.model") == mtime  # loaded, not retrained
    s = "123+456=6+3=9 #### 579"
    assert t1.encode(s) == t2.encode(s)
    demo_tokenizer(tmp_path, texts, vocab_size=160)
    demo_tokenizer(tmp_path, texts[:-1], vocab_size=200)
    assert len([e for e in os.listdir(tmp_path) if e.startswith("spm-")]) == 3
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temp leftovers


def test_save_and_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "tk")
    t2 = load_tokenizer(tmp_path / "tk")
    assert isinstance(t2, SentencePieceTokenizer)
    s = "5x+3=2x+18 x=5x-2x=18-3 3x=15 x=15/3=5 #### 5"
    assert t2.encode(s) == tok.encode(s)
    assert (t2.eos_id, t2.pad_id, t2.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="<= 512"):
        demo_tokenizer(tmp_path, ["1+1=2"], vocab_size=1000)
    with pytest.raises(ValueError, match="no texts"):
        demo_tokenizer(tmp_path, [], vocab_size=256)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_hf_tokenizer_dir_roundtrip(tmp_path):
    """A byte-level BPE in a PreTrainedTokenizerFast, saved next to a Qwen2 config.json (the transformers-5
    trap): ids after load_tokenizer equal ids before saving."""
    from tokenizers import Tokenizer as RawTok, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["the cat sat on the mat 12 + 30 = 42"] * 50 + ["hello world"] * 20, trainer)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                 chat_template=template)
    tok = HFTokenizer(hf)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    tok.save(d)
    t2 = load_tokenizer(d)
    assert isinstance(t2, HFTokenizer)
    s = "the cat sat 12 + 30 = 42 hello"
    assert t2.encode(s) == tok.encode(s)
    assert t2.decode(t2.encode(s)) == s
    assert t2.eos_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert t2.pad_id == hf.convert_tokens_to_ids("<|pad|>")
    assert t2.bos_id is None
    assert t2.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n<assistant>"
    assert t2.decode([t2.eos_id] + t2.encode("hi"), skip_special=True) == "hi"
