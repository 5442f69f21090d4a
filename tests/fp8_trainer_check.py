"""The trainer with FP8 rollouts (``rollout.fp8_rollout``) against an engine that dequantizes what it receives (the
embedded engine in process, or embedded fleet servers through the file or broadcast route); run by
tests/test_fp8_trainer.py in its own process (torch.distributed and Megatron's parallel state stay out of pytest's)::

    python tests/fp8_trainer_check.py CONFIG OUT_JSON [--alternate-transport] [key.path=value ...]

``--alternate-transport`` (a remote fleet): after every rollout the fleet engine switches between the broadcast and
the file route, so one run takes updates through both; each record names the route of the version it sampled with.

Around every rollout it takes the trainer's current weights (the version the engine was just given) and scores the
sampled tokens with two float64 transformers models: one holding those weights quantized and dequantized exactly as the
trainer's FP8 route does (quantize_block_fp8 then dequantize_block_fp8; what the engine should be sampling from), one
holding them as they are (what the old route, and a bf16 engine, would sample from). OUT_JSON gets {"rollouts":
[{"version", "transport", "tokens", "max_vs_fp8", "max_vs_float", "mean_vs_float"}, ...]}: the largest |engine log-prob − reference|
per rollout call (processed log-probs: log_softmax(logits / T), the config samples without top-k/top-p).
"""

from __future__ import annotations

import json
import sys

import torch


def _logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].double() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def main(argv: list[str]) -> int:
    from megatron_amir.config import load_config
    from megatron_amir.rollout.fp8 import dequantized, fp8_named_tensors
    from megatron_amir.training.trainer import Trainer
    from vllm_trainer_check import transformers_model  # tests/ is on PYTHONPATH

    config, out_path, overrides = argv[0], argv[1], argv[2:]
    alternate = "--alternate-transport" in overrides
    overrides = [o for o in overrides if o != "--alternate-transport"]
    cfg = load_config(config, overrides)
    if not cfg.rollout.fp8_rollout or cfg.rollout.top_p < 1 or cfg.rollout.top_k:
        raise SystemExit("fp8_trainer_check needs rollout.fp8_rollout=true and no top-k/top-p")
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    engine, generate = trainer.engine, trainer.engine.generate
    record: list[dict] = []

    def checked_generate(prompts, params, n=1, request_ids=None):
        groups = generate(prompts, params, n, request_ids)
        weights = {k: v.double() for k, v in trainer._hf_weights().items()}
        fp8 = transformers_model(trainer.hf_config, dict(dequantized(fp8_named_tensors(weights))), torch.float64)
        full = transformers_model(trainer.hf_config, weights, torch.float64)
        d_fp8, d_full = [], []
        for prompt, g in zip(prompts, groups):
            for s in g.samples:
                got = torch.tensor(s.logprobs, dtype=torch.float64)
                d_fp8.append((got - _logprobs(fp8, list(prompt), s.token_ids, cfg.rollout.temperature)).abs())
                d_full.append((got - _logprobs(full, list(prompt), s.token_ids, cfg.rollout.temperature)).abs())
        d_fp8, d_full = torch.cat(d_fp8), torch.cat(d_full)
        record.append({"version": engine.version, "transport": getattr(engine, "transport", None),
                       "tokens": int(d_fp8.numel()), "max_vs_fp8": float(d_fp8.max()),
                       "max_vs_float": float(d_full.max()), "mean_vs_float": float(d_full.mean())})
        if alternate:  # the next update takes the other route
            engine.transport = "file" if engine.transport == "broadcast" else "broadcast"
        return groups

    try:
        engine.generate = checked_generate
        code = trainer.train()
    finally:
        trainer.close()
    with open(out_path, "w") as f:
        json.dump({"rollouts": record}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
