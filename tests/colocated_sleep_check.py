"""The trainer with a colocated engine (rollout.engine=vllm) and rollout.vllm_sleep_level, with its engine's calls
recorded; run by tests/test_colocated_sleep.py (CPU) and tests/test_weight_sync_gpu.py (GPU) in its own process
(torch.distributed and Megatron's parallel state stay out of pytest's)::

    python tests/colocated_sleep_check.py CONFIG OUT_JSON [--stand-in] [key.path=value ...]

``--stand-in``: vLLM's sleep mode needs CUDA, so on CPU the trainer's vllm branch builds an ``EmbeddedEngine``
(which has the same sleep/wake_up semantics: level 1 offloads, level 2 discards, nothing generates or loads while
asleep) instead of ``VLLMEngine``; everything else is the real trainer. OUT_JSON gets the engine's calls in order,
the memory it held before and after each sleep (CUDA free memory on GPU, the engine's parameter bytes with the
stand-in), and, at the first rollout after each update, greedy output of the engine beside greedy decoding of the
pushed tensors by transformers. The final weights go to OUT_JSON's directory as weights.safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vllm_trainer_check import GREEDY_PROMPTS, GREEDY_TOKENS, transformers_greedy


def stand_in_class():
    """An ``EmbeddedEngine`` built the way ``VLLMEngine.from_config`` is called by the trainer."""
    from megatron_amir.rollout.embedded import EmbeddedEngine

    class StandIn(EmbeddedEngine):
        @classmethod
        def from_config(cls, rc, hf_config, named_tensors, version=0, **kwargs):
            return cls(hf_config, named_tensors, logprobs_mode=rc.logprobs_mode, version=version)

        def held_bytes(self) -> int:
            return sum(p.untyped_storage().nbytes() for p in {id(p): p for p in self.model.parameters()}.values())

    return StandIn


def main(argv: list[str]) -> int:
    from megatron_amir.config import load_config
    from megatron_amir.rollout.engine import SamplingParams

    stand_in = "--stand-in" in argv
    argv = [a for a in argv if a != "--stand-in"]
    config, out_path, overrides = argv[0], Path(argv[1]), argv[2:]
    cfg = load_config(config, overrides)
    torch.set_num_threads(1)
    if stand_in:
        import megatron_amir.rollout.vllm_engine as vllm_engine

        vllm_engine.VLLMEngine = stand_in_class()
    from megatron_amir.training.trainer import Trainer

    trainer = Trainer(cfg)
    engine = trainer.engine
    record: dict[str, list] = {"calls": [], "memory": [], "probes": []}
    pushed: dict[str, dict] = {}

    def held() -> int:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return -int(torch.cuda.mem_get_info()[0])  # minus the free memory: lower = less held
        return engine.held_bytes()

    sleep, wake_up, load_buckets, generate = engine.sleep, engine.wake_up, engine.load_weight_buckets, engine.generate

    def recorded_sleep(level=1):
        before = held()
        sleep(level)
        record["memory"].append([before, held()])
        record["calls"].append(f"sleep({level})")

    def recorded_wake_up(tags=None):
        wake_up(tags)
        record["calls"].append(f"wake_up({','.join(tags) if tags is not None else 'all'})")

    def recorded_load(stream, version):
        out = load_buckets(stream, version)
        record["calls"].append(f"load({version})")
        pushed["w"] = trainer._hf_weights()
        return out

    def recorded_generate(prompts, params, n=1, request_ids=None):
        if "w" in pushed:  # the first rollout after an update: the engine holds the pushed weights
            greedy = generate(GREEDY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS))
            record["probes"].append({
                "engine": [g.samples[0].token_ids for g in greedy],
                "trainer": transformers_greedy(trainer.hf_config, pushed.pop("w"), GREEDY_PROMPTS, GREEDY_TOKENS)})
        record["calls"].append("generate")
        return generate(prompts, params, n, request_ids)

    engine.sleep, engine.wake_up, engine.load_weight_buckets = recorded_sleep, recorded_wake_up, recorded_load
    engine.generate = recorded_generate
    try:
        code = trainer.train()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer._hf_weights().items()},
                  str(out_path.parent / "weights.safetensors"))
    finally:
        trainer.close()
    # consecutive identical calls (one generate per sampling round) collapse into one entry
    record["calls"] = [c for i, c in enumerate(record["calls"]) if i == 0 or c != record["calls"][i - 1]]
    out_path.write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
