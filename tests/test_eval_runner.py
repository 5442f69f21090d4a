"""evaluate(): per-problem results, summary numbers, seeding, atomic files; with a scripted engine and
with the real embedded engine."""

import json
import math
from fractions import Fraction

import pytest
import torch

from megatron_amir.eval.results import read_results
from megatron_amir.eval.runner import as_eval_problem, evaluate, make_verdict, output_paths
from megatron_amir.rollout.engine import GroupResult, Sample, SamplingParams

torch.set_num_threads(1)

EOS = 3


class CharTokenizer:
    """ids = code points; id 3 is EOS (never produced by encode)."""

    eos_id = EOS
    pad_id = 0
    vocab_size = 128

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special=True):
        return "".join(chr(i) for i in ids if not (skip_special and i == EOS))


class ScriptedEngine:
    """Problem "a+b=" gets a correct '#### a+b' in its first (a % (n+1)) samples; the others answer a wrong
    number chosen by the request seed, or nothing. Log-probs: -0.1 per token when correct, -0.3 otherwise."""

    version = 0

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, n=1):
        self.calls.append((len(prompts), [p.seed for p in params]))
        out = []
        for ids, p in zip(prompts, params):
            text = "".join(chr(i) for i in ids)
            a, b = map(int, text.rstrip("=").split("+"))
            good = a % (n + 1)
            samples = []
            for j in range(n):
                if j < good:
                    body, lp = f"sum is #### {a + b}", -0.1
                elif (p.seed + j) % 3 == 0:
                    body, lp = "no idea", -0.3
                else:
                    body, lp = f"#### {a + b + 1 + (p.seed + j) % 2}", -0.3
                ids_out = [ord(c) for c in body] + [EOS]
                samples.append(Sample(ids_out, [lp] * len(ids_out), "stop", 0))
            out.append(GroupResult(list(ids), samples))
        return out


PROBLEMS = [{"id": f"q{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)}
            for i, (a, b) in enumerate([(3, 4), (10, 20), (7, 7), (0, 5), (4, 1), (2, 9), (8, 8)])]


def exact_reward(text, gold):
    ans = text.rsplit("####", 1)[1].strip() if "####" in text else None
    return 1.0 if ans == gold else 0.0


def brute_pass(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("use_reward_module", [False, True])
def test_results_and_summary(tmp_path, use_reward_module):
    if use_reward_module:
        from megatron_amir.rewards import get_reward_fn

        reward = get_reward_fn("exact")
    else:
        reward = exact_reward
    n = 4
    s = evaluate(ScriptedEngine(), CharTokenizer(), PROBLEMS, reward, n, SamplingParams(max_new_tokens=32),
                 tmp_path / "run", progress=False, seed=100)
    res = {r.id: r for r in read_results(tmp_path / "run")}
    assert list(res) == [p["id"] for p in PROBLEMS]
    counts = []
    for p in PROBLEMS:
        a = int(p["prompt"].split("+")[0])
        r = res[p["id"]]
        good = a % (n + 1)
        counts.append(good)
        assert r.correct == [j < good for j in range(n)]
        assert r.gold == p["answer"] and r.prompt == p["prompt"]
        assert r.lengths == [len(t) + 1 for t in r.texts]  # + EOS, which decode drops
        assert r.mean_logprobs == pytest.approx([-0.1 if ok else -0.3 for ok in r.correct])
        assert all(ans == p["answer"] for ans, ok in zip(r.answers, r.correct) if ok)
        assert all(ans is None for ans, t in zip(r.answers, r.texts) if t == "no idea")
    for k in (1, 2, 4):
        want = sum(brute_pass(n, c, k) for c in counts) / len(counts)
        assert s.pass_at_k[k] == pytest.approx(float(want), abs=1e-12)
    assert s.num_problems == len(PROBLEMS) and s.samples == n
    assert s.num_correct_samples == sum(counts)
    ok_len = [ln for r in res.values() for ln, ok in zip(r.lengths, r.correct) if ok]
    assert s.mean_length_correct == pytest.approx(sum(ok_len) / len(ok_len))
    # every problem with mixed samples has margin -0.1 - (-0.3) = 0.2
    assert s.median_logprob_margin == pytest.approx(0.2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pass_at_k"]["2"] == pytest.approx(s.pass_at_k[2])
    assert summary["extra"]["sampling_params"]["max_new_tokens"] == 32
    assert not list((tmp_path / "run").glob("*.partial"))
    m = s.metrics()
    assert m["pass@1"] == s.pass_at_k[1] and "maj@4" in m and "length_incorrect" in m


def test_seeds_do_not_depend_on_batch_size(tmp_path):
    outs = []
    for bs in (1, 3, 16):
        eng = ScriptedEngine()
        evaluate(eng, CharTokenizer(), PROBLEMS, exact_reward, 3, SamplingParams(), tmp_path / f"b{bs}",
                 batch_size=bs, seed=7, progress=False)
        assert [seed for _, seeds in eng.calls for seed in seeds] == [7 + i for i in range(len(PROBLEMS))]
        assert max(c for c, _ in eng.calls) == min(bs, len(PROBLEMS))
        outs.append((tmp_path / f"b{bs}" / "results.jsonl").read_text())
    assert outs[0] == outs[1] == outs[2]


def test_jsonl_out_path_and_keyword_sampling(tmp_path):
    eng = ScriptedEngine()
    out = tmp_path / "eval" / "eval_step000010.jsonl"
    s = evaluate(eng, CharTokenizer(), PROBLEMS[:2], exact_reward, samples=2, temperature=0.6, max_new_tokens=16,
                 out_path=out, seed=1, progress=False)
    assert out.is_file() and output_paths(out)[1].is_file()
    summary = json.loads(output_paths(out)[1].read_text())
    assert summary["extra"]["sampling_params"]["temperature"] == 0.6
    assert summary["extra"]["sampling_params"]["stop_token_ids"] == [EOS]
    assert s.num_problems == 2


def test_engine_misbehaviour_is_an_error_and_leaves_no_results(tmp_path):
    class Short(ScriptedEngine):
        def generate(self, prompts, params, n=1):
            return super().generate(prompts, params, n)[:-1]

    with pytest.raises(RuntimeError, match="groups for"):
        evaluate(Short(), CharTokenizer(), PROBLEMS, exact_reward, 2, SamplingParams(), tmp_path / "r",
                 batch_size=4, progress=False)
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_bad_problems_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="no 'answer'"):
        evaluate(ScriptedEngine(), CharTokenizer(), [{"prompt": "1+1="}], exact_reward, 2, None, tmp_path,
                 progress=False)
    with pytest.raises(ValueError, match="duplicate problem id"):
        evaluate(ScriptedEngine(), CharTokenizer(), [PROBLEMS[0], PROBLEMS[0]], exact_reward, 2, None, tmp_path,
                 progress=False)
    with pytest.raises(ValueError, match="samples"):
        evaluate(ScriptedEngine(), CharTokenizer(), PROBLEMS, exact_reward, 0, None, tmp_path, progress=False)
    with pytest.raises(ValueError, match="out_path"):
        evaluate(ScriptedEngine(), CharTokenizer(), PROBLEMS, exact_reward, 1, None, None, progress=False)
    assert as_eval_problem({"question": "x", "gold": "1"}, 5).id == "5"


def test_make_verdict_forms():
    assert make_verdict(1.0, "#### 3", 0.5).correct
    assert not make_verdict(0.2, "#### 3", 0.5).correct
    v = make_verdict({"reward": 1.1, "correct": False, "pred": "9"}, "", 0.5)
    assert (v.correct, v.reward, v.answer) == (False, 1.1, "9")
    assert make_verdict(True, "\\boxed{\\frac{1}{2}} end", 0.5).answer == "\\frac{1}{2}"
    with pytest.raises(TypeError):
        make_verdict(object(), "", 0.5)


def test_with_the_embedded_engine(tmp_path):
    """Plumbing with the real rollout engine (random tiny model): every field well formed."""
    from megatron_amir.convert.hf_config import hf_config_from_model_config
    from megatron_amir.config import ModelConfig
    from megatron_amir.rollout.embedded import EmbeddedEngine

    torch.manual_seed(0)
    hf = hf_config_from_model_config(ModelConfig(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                                                 num_attention_heads=2, num_kv_heads=1, max_position_embeddings=64))
    engine = EmbeddedEngine(hf, None, logprobs_mode="raw_logprobs", seed=0)
    s = evaluate(engine, CharTokenizer(), PROBLEMS[:3], exact_reward, 4,
                 SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(EOS,)), tmp_path / "e",
                 seed=3, progress=False)
    rs = read_results(tmp_path / "e")
    assert len(rs) == 3 and all(r.n == 4 for r in rs)
    assert all(1 <= ln <= 6 for r in rs for ln in r.lengths)
    assert all(lp is not None and lp < 0 for r in rs for lp in r.mean_logprobs)
    assert set(s.pass_at_k) == {1, 2, 4}
    # same seed -> same samples
    evaluate(engine, CharTokenizer(), PROBLEMS[:3], exact_reward, 4,
             SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(EOS,)), tmp_path / "e2",
             seed=3, progress=False)
    assert [r.texts for r in read_results(tmp_path / "e2")] == [r.texts for r in rs]


def test_batch_reward_called_once_per_engine_batch(tmp_path):
    from megatron_amir.rewards import ExactReward

    class Counting(ExactReward):
        calls = []

        def __call__(self, responses, answers):
            self.calls.append(len(responses))
            return super().__call__(responses, answers)

    reward = Counting()
    s = evaluate(ScriptedEngine(), CharTokenizer(), PROBLEMS, reward, 2, SamplingParams(), tmp_path / "c",
                 batch_size=3, progress=False)
    assert reward.calls == [6, 6, 2]  # 3 + 3 + 1 problems x 2 samples
    assert s.num_samples == 14
