"""HF config.json <-> megatron_amir ModelConfig.

``model_config_from_hf`` first lets ``transformers`` fill the family's defaults (config.json files only hold
non-default values, and transformers 4/5 spell rope settings differently), then checks every feature the
Megatron model cannot reproduce exactly and refuses it with a message naming the key.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_amir.config import ModelConfig
from megatron_amir.convert.mapping import family_for_arch, family_for_hf_config

# Megatron-Core's RotaryEmbedding implements llama3 scaling with only `factor` configurable.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_DTYPES_BACK = {v: k for k, v in _DTYPES.items()}


def _normalized_hf_dict(config: dict) -> dict:
    """config.json -> full dict with the transformers class defaults filled in."""
    import transformers

    family = family_for_hf_config(config)
    cls = getattr(transformers, family.hf_config_class)
    kwargs = {k: v for k, v in config.items() if k not in ("transformers_version",)}
    full = cls(**kwargs).to_dict()
    full.setdefault("architectures", config.get("architectures"))
    return full


def _rope(hf: dict) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from either transformers-5 ``rope_parameters`` or 4.x top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope = {**scaling, **params}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")
    for key, want in _MCORE_LLAMA3_FIXED.items():
        if float(rope.get(key, want)) != want:
            raise ValueError(
                f"rope_scaling.{key}={rope.get(key)} is not supported: Megatron-Core's llama3 rope scaling fixes "
                f"{key}={want} (only factor is configurable)"
            )
    scaling_out = {"rope_type": "llama3", "factor": float(rope["factor"]), **_MCORE_LLAMA3_FIXED}
    return float(theta), scaling_out


def model_config_from_hf(config_dict: dict, **overrides: Any) -> ModelConfig:
    """HF config.json dict -> ModelConfig. Raises ValueError naming the unsupported key.

    ``vocab_size`` is the HF one; the converter overrides it with the padded size of the Megatron model.
    """
    family = family_for_hf_config(config_dict)
    hf = _normalized_hf_dict(config_dict)
    family.check_hf_config(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim == hf["hidden_size"] // heads:
        head_dim = None  # the default; keep ModelConfig minimal
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = str(dtype).replace("torch.", "")
    fields: dict[str, Any] = dict(
        arch=family.arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf["rms_norm_eps"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
        params_dtype=_DTYPES.get(dtype, "fp32"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model_config(
    cfg: ModelConfig, vocab_size: Optional[int] = None, base: Optional[dict] = None
) -> dict:
    """ModelConfig -> HF config.json dict (full, as the installed transformers writes it).

    vocab_size: the original (unpadded) vocabulary; default cfg.vocab_size.
    base: the source config.json, whose other keys (token ids, ...) are kept; architecture keys come from cfg.
    """
    import transformers

    family = family_for_arch(cfg.arch)
    if cfg.arch == "llama" and cfg.use_qkv_bias:
        raise ValueError("model.qkv_bias=true cannot be expressed for LlamaForCausalLM (it would add an o_proj bias)")
    if cfg.use_qk_norm and cfg.arch != "qwen3":
        raise ValueError(f"model.qk_norm=true has no Hugging Face equivalent for arch {cfg.arch}")
    if cfg.arch == "qwen2" and not cfg.use_qkv_bias:
        raise ValueError("Qwen2ForCausalLM always has q/k/v biases; model.qkv_bias=false cannot be exported")
    if cfg.arch == "qwen3" and (cfg.use_qkv_bias or not cfg.use_qk_norm):
        raise ValueError("Qwen3ForCausalLM has q/k norm and no q/k/v bias; model.qk_norm/qkv_bias disagree")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        if rope.get("rope_type", rope.get("type")) == "llama3":  # the values Megatron uses when not given
            rope = {**_MCORE_LLAMA3_FIXED, "factor": 8.0, **rope}
    keys = dict(
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_method_std,
        hidden_act="silu",
        rope_parameters=rope,
        dtype=_DTYPES_BACK[cfg.params_dtype],
        architectures=[family.hf_architectures[0]],
        **family.hf_config_extras(cfg),
    )
    kept = {k: v for k, v in (base or {}).items() if k not in keys and k not in ("rope_scaling", "rope_theta",
                                                                                 "torch_dtype", "transformers_version")}
    cls = getattr(transformers, family.hf_config_class)
    out = cls(**kept, **keys).to_dict()
    out.pop("_name_or_path", None)
    return out
