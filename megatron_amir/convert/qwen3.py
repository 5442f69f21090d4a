"""Qwen3 (dense): Llama layout plus per-head RMSNorm on q and k (q_norm/k_norm -> q_layernorm/k_layernorm)."""

from megatron_amir.convert.mapping import Family, register_family


def _check(hf: dict) -> None:
    if hf.get("attention_bias"):
        raise ValueError("Qwen3ForCausalLM with attention_bias=true (q/k/v/o biases) is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3ForCausalLM with use_sliding_window=true is not supported (full attention only)")


QWEN3 = register_family(
    Family(
        arch="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        hf_model_type="qwen3",
        hf_config_class="Qwen3Config",
        check_hf_config=_check,
        hf_config_extras=lambda cfg: {
            "head_dim": cfg.kv_channels, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        },
    )
)
