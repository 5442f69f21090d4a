"""Random-init Hugging Face models of every supported family, built from config alone (tests, benchmark).

``CASES`` covers each family's distinguishing feature: Llama with llama3 rope scaling, Qwen2 with QKV bias
(tied embeddings), Qwen3 with q/k norm and a head_dim that is not hidden/heads, Mistral without sliding
window (tied), plus an untied Llama with TP-unfriendly vocabulary size to exercise the padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

CASES: dict[str, dict[str, Any]] = {
    "llama3-untied": dict(cls="LlamaConfig", rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    "llama-tied": dict(cls="LlamaConfig", tie_word_embeddings=True, vocab_size=509),
    "qwen2-bias-tied": dict(cls="Qwen2Config", tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                           "rope_theta": 1e6}),
    "qwen3-qknorm": dict(cls="Qwen3Config", head_dim=32, tie_word_embeddings=False),
    "mistral-nowindow-tied": dict(cls="MistralConfig", sliding_window=None, tie_word_embeddings=True),
}


def make_hf_model(case: str, seed: int = 0, dtype: torch.dtype = torch.float32, **size: Any):
    """A random-init ``*ForCausalLM`` for ``case`` (a key of CASES); ``size`` overrides SMALL."""
    import transformers

    spec = dict(CASES[case])
    cls = getattr(transformers, spec.pop("cls"))
    cfg = cls(**{**SMALL, **spec, **size})
    cfg.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        # give norms non-trivial weights so a swapped/missing norm changes the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def save_hf_model(model, out_dir: Path, max_shard_size: str | int = "5GB") -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir
