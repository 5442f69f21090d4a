"""Rollout: the Engine protocol, the embedded torch engine, the vLLM engine, the HTTP server speaking
vLLM's API subset, the router + fleet client, and weight sync. Heavy parts import lazily."""

from megatron_amir.rollout.engine import Engine, GroupResult, Sample, SamplingParams, close_engine

__all__ = ["Engine", "GroupResult", "Sample", "SamplingParams", "EmbeddedEngine", "FleetClient", "FleetEngine",
           "VLLMEngine", "close_engine"]
_LAZY = {
    "EmbeddedEngine": "megatron_amir.rollout.embedded",
    "FleetClient": "megatron_amir.rollout.client",
    "FleetEngine": "megatron_amir.rollout.client",
    "VLLMEngine": "megatron_amir.rollout.vllm_engine",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_amir.rollout' has no attribute {name!r}")
