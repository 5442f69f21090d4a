"""Qwen2 / Qwen2.5: Llama layout plus q/k/v biases (always on in HF's Qwen2Attention; o_proj has none)."""

from megatron_amir.convert.mapping import Family, register_family


def _check(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2ForCausalLM with use_sliding_window=true is not supported (full attention only)")


def _extras(cfg) -> dict:
    # Qwen2Config has no head_dim field; HF reads it with getattr, so write it only when it is not the default.
    out = {"use_sliding_window": False, "sliding_window": None}
    if cfg.head_dim is not None:
        out["head_dim"] = cfg.head_dim
    return out


QWEN2 = register_family(
    Family(
        arch="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        hf_model_type="qwen2",
        hf_config_class="Qwen2Config",
        check_hf_config=_check,
        hf_config_extras=_extras,
    )
)
