"""The colocated engine (megatron_amir.rollout.vllm_engine.VLLMEngine: vLLM's AsyncLLM in this process) on CPU,
run by tests/test_vllm_real.py with the vLLM virtualenv's Python and the checkout and tests/ on PYTHONPATH::

    .venv-vllm/bin/python tests/vllm_inprocess_check.py OUT_JSON WORKDIR

Writes {"logprob_max_diff", "logprob_mean_diff", "tokens", "greedy_equal", "version", "changed"}: vLLM's processed
log-probs of sampled tokens against transformers' float64 log_softmax(logits / T), then a weight update through
the worker extension (collective_rpc load_snapshot) and greedy output against the new weights' transformers model.
vLLM spawns its engine core, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TEMPERATURE = 0.7


def model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # head size 64 / 2 = 32: vLLM's CPU attention has no head size 16
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # away from near-uniform logits, so greedy is not decided by rounding
    return m, cfg.to_dict()


def main(out: str, workdir: str) -> None:
    from megatron_amir.config import RolloutConfig
    from megatron_amir.rollout.engine import SamplingParams
    from megatron_amir.rollout.vllm_engine import VLLMEngine
    from vllm_trainer_check import greedy_tokens  # tests/ is on PYTHONPATH

    torch.set_num_threads(1)
    hf, cfg = model(0)
    rc = RolloutConfig(engine="vllm", logprobs_mode="processed_logprobs")
    eng = VLLMEngine.from_config(rc, cfg, hf.state_dict(), workdir=workdir, dtype="float32", enforce_eager=True,
                                 max_model_len=256)
    try:
        prompts = [[1, 2, 3], [7, 8, 9, 10], [40, 41]]
        groups = eng.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_new_tokens=16, seed=1), n=4)
        diffs = []
        for p, g in zip(prompts, groups):
            for s in g.samples:
                with torch.no_grad():
                    logits = hf(torch.tensor([p + s.token_ids])).logits[0, len(p) - 1 : -1].double() / TEMPERATURE
                ref = logits.log_softmax(-1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
                diffs.append((ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs())
        d = torch.cat(diffs)
        new, _ = model(4)
        before = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))[0].samples[0].token_ids
        eng.load_weights(new.state_dict(), 2)
        g = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))[0]
        ref = greedy_tokens(new, [5, 6, 7], 8)
        Path(out).write_text(json.dumps({
            "logprob_max_diff": float(d.max()), "logprob_mean_diff": float(d.mean()), "tokens": d.numel(),
            "greedy_equal": g.samples[0].token_ids == ref, "version": g.weight_version,
            "changed": before != ref}))
    finally:
        eng.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
