"""Rollout: the Engine protocol, the embedded torch engine, the vLLM engine, the HTTP server speaking
vLLM's API subset, the router + fleet client, and weight sync. Heavy parts import lazily."""

from megatron_amir.rollout.engine import Engine, GroupResult, Sample, SamplingParams

__all__ = ["Engine", "GroupResult", "Sample", "SamplingParams", "EmbeddedEngine"]


def __getattr__(name):
    if name == "EmbeddedEngine":
        from megatron_amir.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine
    raise AttributeError(name)
