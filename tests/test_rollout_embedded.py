"""EmbeddedEngine: log-probs against a full forward of the transformers model, greedy against HF
generate, sampling filters against a float64 loop reference, seeds, stop/length, weight updates."""

import math

import pytest
import torch

from megatron_amir.rollout.embedded import EmbeddedEngine, filter_logits, request_stream_seed
from megatron_amir.rollout.engine import Engine, GroupResult, SamplingParams
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(1)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43]]


def full_forward_logprobs(hf, prompt, response, temperature):
    """float64 log p(response_t | prefix) from one full forward of the transformers model."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = hf(ids).logits[0].double()
    out = []
    for t, tok in enumerate(response):
        row = logits[len(prompt) - 1 + t] / temperature
        m = row.max()
        lse = m + math.log(sum(math.exp(float(v - m)) for v in row))
        out.append(float(row[tok]) - lse)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode,temp", [("processed_logprobs", 0.7), ("raw_logprobs", 0.7), ("processed_logprobs", 1.0)])
def test_logprobs_match_full_forward(family, mode, temp):
    hf, cfg = tiny_hf_model(family)
    eng = EmbeddedEngine(cfg, hf.state_dict(), logprobs_mode=mode, seed=0)
    assert isinstance(eng, Engine)
    res = eng.generate(PROMPTS, SamplingParams(temperature=temp, max_new_tokens=9, stop_token_ids=[3, 4, 5]), n=3)
    assert len(res) == len(PROMPTS) and all(len(g.samples) == 3 for g in res)
    worst = 0.0
    for prompt, g in zip(PROMPTS, res):
        assert g.prompt_token_ids == prompt
        for s in g.samples:
            ref = full_forward_logprobs(hf, prompt, s.token_ids, temp if mode == "processed_logprobs" else 1.0)
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, s.logprobs)))
            assert s.weight_version == 0
    assert worst < 1e-4, worst


def test_greedy_equals_transformers_generate():
    hf, cfg = tiny_hf_model("qwen2")
    eng = EmbeddedEngine(cfg, hf.state_dict())
    res = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10), n=2)
    for prompt, g in zip(PROMPTS, res):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=10, do_sample=False, pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
        assert [s.token_ids for s in g.samples] == [ref, ref]
        assert all(s.finish_reason == "length" for s in g.samples)


def _filter_ref(row, k, p):
    """Loop reference: keep every token at least as likely as the k-th largest (ties kept), then the shortest
    most-likely prefix with mass >= p (p = 1: all of them)."""
    V = len(row)
    order = sorted(range(V), key=lambda j: -row[j])
    kth = row[order[k - 1]]
    kept = [j for j in order if row[j] >= kth]
    z = sum(math.exp(row[j]) for j in kept)
    out, mass = set(), 0.0
    for j in kept:
        if mass >= p and p < 1:
            break
        out.add(j)
        mass += math.exp(row[j]) / z
    return out


def test_filter_logits_against_loop_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    top_k = torch.tensor([40, 5, 1, 40, 10, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.3], dtype=torch.float64)
    f = filter_logits(logits, top_k, top_p)
    for b in range(6):
        kept = set(torch.isfinite(f[b]).nonzero().squeeze(1).tolist())
        assert kept == _filter_ref(logits[b].tolist(), int(top_k[b]), float(top_p[b])), b
        assert torch.equal(f[b][list(kept)], logits[b][list(kept)])


def test_filter_logits_keeps_ties_and_top_p_one():
    """Ties with the k-th logit stay (vLLM / HF semantics); a top_p = 1 row drops nothing even when its float32
    cumulative mass reaches 1.0 before the tail (another row of the batch forces the filtering path)."""
    ties = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_logits(ties, torch.tensor([2]), torch.tensor([1.0]))).tolist()
    assert kept == [[True, True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 512, generator=g) * 8  # peaked: the tail's float32 mass underflows the cumulative sum
    f = filter_logits(logits, torch.tensor([512, 5]), torch.tensor([1.0, 0.9]))
    assert bool(torch.isfinite(f[0]).all()) and int(torch.isfinite(f[1]).sum()) <= 5


def test_processed_logprobs_include_top_k_renormalization():
    hf, cfg = tiny_hf_model("llama")
    eng = EmbeddedEngine(cfg, hf.state_dict(), seed=1)
    k = 5
    res = eng.generate([[7, 8, 9]], SamplingParams(temperature=0.8, top_k=k, max_new_tokens=4), n=4)
    for s in res[0].samples:
        ids = torch.tensor([[7, 8, 9] + s.token_ids])
        with torch.no_grad():
            logits = hf(ids).logits[0].double() / 0.8
        for t, tok in enumerate(s.token_ids):
            row = logits[2 + t]
            top = row.topk(k).values
            assert row[tok] >= top[-1]  # sampled inside the top-k
            ref = float(row[tok] - torch.logsumexp(top, 0))
            assert abs(ref - s.logprobs[t]) < 1e-4


def test_seed_reproducible_and_independent_of_batch():
    hf, cfg = tiny_hf_model("llama")
    eng = EmbeddedEngine(cfg, hf.state_dict())
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=123)
    a = eng.generate([PROMPTS[0]], sp, n=4)[0]
    b = eng.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                     [SamplingParams(max_new_tokens=3), sp, SamplingParams(max_new_tokens=8, seed=5)], n=4)[1]
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    for x, y in zip(a.samples, b.samples):
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-5
    # the n samples of a group differ from each other, and another seed gives other samples
    assert len({tuple(s.token_ids) for s in a.samples}) > 1
    c = eng.generate([PROMPTS[0]], sp.replace(seed=124), n=4)[0]
    assert [s.token_ids for s in c.samples] != [s.token_ids for s in a.samples]


def test_stop_and_length():
    hf, cfg = tiny_hf_model("llama")
    eng = EmbeddedEngine(cfg, hf.state_dict(), seed=0)
    greedy = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=12), n=1)[0].samples[0]
    stop_tok = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_tok)
    s = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop_tok]), n=1)
    s = s[0].samples[0]
    assert s.finish_reason == "stop"
    assert s.token_ids == greedy.token_ids[: first + 1]  # stop token kept
    assert len(s.logprobs) == len(s.token_ids)
    short = eng.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=3), n=1)[0].samples[0]
    assert short.finish_reason == "length" and short.token_ids == greedy.token_ids[:3]


def test_mixed_lengths_and_compaction_match_single_requests():
    """Rows finishing at different steps (cache compaction) give what each request gives alone."""
    hf, cfg = tiny_hf_model("qwen3")
    eng = EmbeddedEngine(cfg, hf.state_dict())
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in (1, 2, 7, 12)]
    together = eng.generate(PROMPTS, params, n=2)
    for prompt, sp, g in zip(PROMPTS, params, together):
        alone = eng.generate([prompt], sp, n=1)[0].samples[0]
        for s in g.samples:
            assert s.token_ids == alone.token_ids
            assert max(abs(a - b) for a, b in zip(s.logprobs, alone.logprobs)) < 1e-5


def test_load_weights_sets_version_and_changes_outputs():
    hf_a, cfg = tiny_hf_model("llama", seed=0)
    hf_b, _ = tiny_hf_model("llama", seed=1)
    eng = EmbeddedEngine(cfg, hf_a.state_dict())
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    before = eng.generate(PROMPTS, sp)
    eng.load_weights(hf_b.state_dict(), version=7)
    assert eng.version == 7
    after = eng.generate(PROMPTS, sp)
    assert all(g.weight_version == 7 and g.samples[0].weight_version == 7 for g in after)
    ref_b = EmbeddedEngine(cfg, hf_b.state_dict()).generate(PROMPTS, sp)
    assert [g.samples[0].token_ids for g in after] == [g.samples[0].token_ids for g in ref_b]
    assert [g.samples[0].token_ids for g in after] != [g.samples[0].token_ids for g in before]


def test_bad_input_errors():
    hf, cfg = tiny_hf_model("llama")
    eng = EmbeddedEngine(cfg, hf.state_dict())
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        eng.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[1, 600]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1000))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        eng.generate([[1]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="logprobs_mode"):
        EmbeddedEngine(cfg, logprobs_mode="raw_logits")
    assert isinstance(GroupResult([1], []), GroupResult)


def test_chunking_keeps_groups_and_order():
    hf, cfg = tiny_hf_model("llama")
    eng = EmbeddedEngine(cfg, hf.state_dict(), max_batch_rows=4)
    sp = SamplingParams(temperature=0, max_new_tokens=5)
    chunked = eng.generate(PROMPTS, sp, n=3, request_ids=["a", "b", "c", "d"])
    whole = EmbeddedEngine(cfg, hf.state_dict()).generate(PROMPTS, sp, n=3)
    assert [g.request_id for g in chunked] == ["a", "b", "c", "d"]
    assert [[s.token_ids for s in g.samples] for g in chunked] == [[s.token_ids for s in g.samples] for g in whole]


def test_stream_seed_mixes_prompt_and_seed():
    """One batch-wide seed must not give every prompt the same random stream."""
    a = request_stream_seed(7, [1, 2, 3])
    assert a == request_stream_seed(7, [1, 2, 3])
    assert len({a, request_stream_seed(7, [1, 2, 4]), request_stream_seed(8, [1, 2, 3]),
                request_stream_seed(7, [1, 2, 3, 0])}) == 4
    assert 0 <= a < 2**63
