"""The trainer (megatron_amir.training.trainer.Trainer, what ``megatron-amir train`` runs) against a real vLLM fleet,
with checks hooked into its rollout engine; run by tests/test_vllm_real.py in its own process (torch.distributed
and Megatron's parallel state stay out of pytest's)::

    python tests/vllm_trainer_check.py CONFIG OUT_JSON [key.path=value ...]

After every weight update (the engine's ``load_weights`` or ``load_weight_buckets``, the start-up push included) it
records greedy output through the fleet (router) beside greedy decoding of a transformers model holding the very
tensors the trainer pushed, and how far those tensors moved since the previous update. Around every rollout it
records the engine's weight version and the versions the samples are tagged with. OUT_JSON gets
{"updates": [...], "rollouts": [...]}.
"""

from __future__ import annotations

import json
import sys

import torch

GREEDY_PROMPTS = [[1, 5, 9, 13], [7, 3], [20, 21, 22, 23, 24, 25], [4]]
GREEDY_TOKENS = 10


def greedy_tokens(model, prompt, n_new: int) -> list[int]:
    """``n_new`` argmax tokens of a transformers causal LM after ``prompt``, never stopping at EOS (the fleet
    requests carry no stop token either; ``generate`` would stop at the config's EOS and pad)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def transformers_model(hf_config: dict, weights: dict, dtype: torch.dtype = torch.float32):
    """A transformers Llama holding ``weights`` (in ``dtype``): an implementation independent of both vLLM and the
    trainer's Megatron model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(hf_config)).eval().to(dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    if hf_config.get("tie_word_embeddings"):  # the head is the embedding
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"transformers model vs pushed weights: missing {missing}, unexpected {unexpected}")
    return model


def transformers_greedy(hf_config: dict, weights: dict, prompts, n_new: int) -> list[list[int]]:
    """Greedy decoding of a transformers model holding ``weights``."""
    model = transformers_model(hf_config, weights)
    return [greedy_tokens(model, p, n_new) for p in prompts]


def main(argv: list[str]) -> int:
    from megatron_amir.config import load_config
    from megatron_amir.rollout.engine import SamplingParams
    from megatron_amir.training.trainer import Trainer

    config, out_path, overrides = argv[0], argv[1], argv[2:]
    cfg = load_config(config, overrides)
    torch.set_num_threads(1)
    trainer = Trainer(cfg)  # pushes its starting weights to the fleet (version 0)
    engine = trainer.engine
    record: dict[str, list] = {"updates": [], "rollouts": []}
    previous: dict[str, dict] = {}
    load_weights, load_buckets, generate = engine.load_weights, engine.load_weight_buckets, engine.generate

    def check(weights: dict, version: int) -> None:
        # n=2 at temperature 0: vLLM refuses that request, the client asks for one sample and repeats it
        groups = generate(GREEDY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS), n=2)
        moved = max(float((weights[k].float() - previous["w"][k].float()).abs().max()) for k in weights) \
            if previous else None
        previous["w"] = {k: v.detach().clone() for k, v in weights.items()}
        record["updates"].append({
            "version": version, "engine_version": engine.version, "moved_max": moved,
            "fleet": [[s.token_ids for s in g.samples] for g in groups],
            "fleet_versions": sorted({s.weight_version for g in groups for s in g.samples}),
            "trainer": transformers_greedy(trainer.hf_config, weights, GREEDY_PROMPTS, GREEDY_TOKENS)})

    def checked_load(weights, version):
        report = load_weights(weights, version)
        check(weights, version)
        return report

    def checked_buckets(stream, version):  # the trainer's per-step path: its weight stream, bucket by bucket
        report = load_buckets(stream, version)
        check(trainer._hf_weights(), version)
        return report

    def recorded_generate(prompts, params, n=1, request_ids=None):
        groups = generate(prompts, params, n, request_ids)
        record["rollouts"].append({"engine_version": engine.version, "samples": sum(len(g.samples) for g in groups),
                                   "versions": sorted({s.weight_version for g in groups for s in g.samples})})
        return groups

    try:
        check(trainer._hf_weights(), trainer.weight_version)  # the start-up push happened in Trainer()
        engine.load_weights, engine.load_weight_buckets = checked_load, checked_buckets
        engine.generate = recorded_generate
        code = trainer.train()
    finally:
        trainer.close()
    with open(out_path, "w") as f:
        json.dump(record, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
