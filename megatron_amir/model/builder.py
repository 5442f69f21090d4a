"""Megatron-Core GPTModel from our ModelConfig / ParallelConfig.

One function decides the implementation (``choose_transformer_impl``): the Transformer Engine layer
spec (+ FP8 recipe) when CUDA and TE are present, the local (pure Megatron-Core) spec otherwise.
``transformer_config`` maps the architecture (Llama / Qwen2 / Qwen3 / Mistral: RMSNorm, SwiGLU, RoPE
with theta and llama3 scaling, GQA, QKV bias, q/k norm, tied embeddings) onto TransformerConfig.

Sequences are right-padded and attention is causal, so padding never changes the hidden states of
earlier positions: no attention mask is built; position ids are 0..L-1 for every row.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_amir.config import ModelConfig, ParallelConfig
from megatron_amir.model.compat import apply_cpu_compat

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FP8UnavailableError(RuntimeError):
    """FP8 was requested where Transformer Engine on CUDA is not available."""


def te_available() -> bool:
    """Transformer Engine importable (never true on our CPU machines; see docs/megatron_on_cpu.md)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # the empty meta package raises RuntimeError on import
        return False
    return True


def check_fp8_support(model_cfg: ModelConfig, capability: tuple[int, int]) -> None:
    """FP8 recipes the GPU can run (Transformer Engine): FP8 GEMMs need compute capability >= 8.9
    (Ada/Hopper); blockwise scaling Hopper (9.x) or newer; MXFP8 Blackwell (10.x) or newer."""
    if not model_cfg.fp8:
        return
    need = {"mxfp8": (10, 0), "blockwise": (9, 0)}.get(model_cfg.fp8_recipe, (8, 9))
    if tuple(capability) < need:
        raise FP8UnavailableError(
            f"model.fp8_recipe={model_cfg.fp8_recipe!r} (model.fp8={model_cfg.fp8!r}) needs a GPU of compute "
            f"capability >= {need[0]}.{need[1]}; this one is {capability[0]}.{capability[1]}"
        )


def choose_transformer_impl(model_cfg: ModelConfig) -> str:
    """The one place that decides 'transformer_engine' vs 'local'.

    auto -> TE when CUDA and TE are both present, local otherwise. An explicit
    'transformer_engine' or any FP8 request without CUDA + TE fails with a message naming the field.
    """
    have_te = torch.cuda.is_available() and te_available()
    if model_cfg.fp8 and not have_te:
        raise FP8UnavailableError(
            f"model.fp8={model_cfg.fp8!r} needs CUDA and Transformer Engine "
            f"(cuda available: {torch.cuda.is_available()}, transformer_engine importable: {te_available()}); "
            "unset model.fp8 to train in bf16/fp32 on this machine"
        )
    if model_cfg.fp8:
        check_fp8_support(model_cfg, torch.cuda.get_device_capability())
    if model_cfg.transformer_impl == "transformer_engine":
        if not have_te:
            raise FP8UnavailableError(
                "model.transformer_impl=transformer_engine needs CUDA and Transformer Engine; use 'auto' or 'local'"
            )
        return "transformer_engine"
    if model_cfg.transformer_impl == "local":
        if model_cfg.fp8:  # the local layers ignore TE's fp8_autocast: the run would train in bf16 silently
            raise FP8UnavailableError("model.fp8 needs model.transformer_impl=transformer_engine (or auto), not local")
        return "local"
    return "transformer_engine" if have_te else "local"


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _rope_args(m: ModelConfig) -> dict:
    """GPTModel RoPE keyword arguments from the HF-style rope_scaling dict."""
    args = dict(position_embedding_type="rope", rotary_base=m.rope_theta, rotary_percent=1.0)
    rs = m.rope_scaling
    if not rs:
        return args
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        # Megatron hard-codes low/high freq factors 1/4 and original length 8192 (rotary_pos_embedding.py)
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in fixed.items():
            if k in rs and float(rs[k]) != v:
                raise ValueError(f"model.rope_scaling.{k}={rs[k]} unsupported: Megatron-Core fixes it to {v}")
        args.update(rope_scaling=True, rope_scaling_factor=float(rs.get("factor", 8.0)))
    elif kind == "linear":
        args.update(seq_len_interpolation_factor=float(rs["factor"]))
    elif kind == "default" or (kind is None and not set(rs) - {"rope_theta"}):
        pass
    elif kind is None:
        raise ValueError(f"model.rope_scaling {rs} has no rope_type: say llama3, linear or default "
                         "(without it the factors would be silently ignored)")
    else:
        raise ValueError(f"model.rope_scaling type {kind!r} unsupported (llama3, linear, default)")
    return args


def transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    impl: Optional[str] = None,
    calculate_per_token_loss: bool = True,
    pipeline_dtype: Optional[torch.dtype] = None,
):
    """TransformerConfig for our architecture; dropout is 0 (RL fine-tuning, reproducible log-probs)."""
    apply_cpu_compat()
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = model_cfg, parallel_cfg
    impl = impl or choose_transformer_impl(m)
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[m.params_dtype]
    if p.sequence_parallel and not on_gpu:
        raise ValueError("parallel.sequence_parallel is not supported on CPU (asserts with torch LayerNorm)")
    fp8 = {}
    if m.fp8:
        fp8 = dict(fp8=m.fp8, fp8_recipe=m.fp8_recipe, fp8_param=m.fp8_param,
                   first_last_layers_bf16=m.first_last_layers_bf16)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.kv_channels,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.use_qkv_bias,
        qk_layernorm=m.use_qk_norm,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=pipeline_dtype or dtype,
        # CPU init draws the full master weight and splits it, so TP layouts share one init
        use_cpu_initialization=not on_gpu,
        # fusions that need CUDA kernels stay off on CPU (docs/megatron_on_cpu.md)
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=on_gpu,
        # Megatron's fused scale-mask-softmax (local spec) imports apex's scaled_masked_softmax_cuda: only when present
        masked_softmax_fusion=on_gpu and _has_module("scaled_masked_softmax_cuda"),
        bias_dropout_fusion=on_gpu,
        attention_softmax_in_fp32=True,
        # the RL loss is a SUM over micro-batches and DP ranks (see training/policy.py)
        calculate_per_token_loss=calculate_per_token_loss,
        variable_seq_lengths=False,  # True is rejected with the default MoE dispatcher; L is fixed per call
        deterministic_mode=False,
        **fp8,
    )


def layer_spec(model_cfg: ModelConfig, impl: str):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.use_qk_norm)
    return get_gpt_layer_local_spec(qk_layernorm=model_cfg.use_qk_norm, normalization="RMSNorm")


def build_gpt_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    *,
    config=None,
    vp_stage: Optional[int] = None,
):
    """A Megatron-Core GPTModel (this rank's pipeline stage). parallel_state must be initialized."""
    apply_cpu_compat()
    from megatron.core.models.gpt import GPTModel

    impl = choose_transformer_impl(model_cfg)
    config = config or transformer_config(model_cfg, parallel_cfg, impl=impl)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg, impl),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-sharded: log-probs never gather the vocab
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        vp_stage=vp_stage,
        **_rope_args(model_cfg),
    )
