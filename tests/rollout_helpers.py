"""Tiny random-init HF models shared by the rollout tests (built from config, no download)."""

from __future__ import annotations

import torch


def tiny_hf_model(family: str = "llama", seed: int = 0, **overrides):
    """(transformers model in eval mode, config.json dict) of a tiny random model of ``family``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen3":
        kw["head_dim"] = 32
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = cls(**kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # random init keeps logits near-uniform; scale the head so sampling and stop tokens behave like a real model
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model, cfg.to_dict()
