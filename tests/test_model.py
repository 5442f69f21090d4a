"""Model builder: architecture -> TransformerConfig / GPTModel structure, RoPE options, CPU guards.

(Logit parity with Hugging Face models per family, at TP/PP layouts, is tested by the converter's
tests/test_convert_parity.py, which builds through this builder.)
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_amir.config import ModelConfig, ParallelConfig

torch.set_num_threads(2)

SMALL = dict(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from megatron_amir.training.parallel import init_parallel

    init_parallel(ParallelConfig(), seed=0)


def build(**kw):
    from megatron_amir.model.builder import build_gpt_model

    return build_gpt_model(ModelConfig(**{**SMALL, **kw}), ParallelConfig())


def params(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def test_transformer_config_fields():
    from megatron_amir.model.builder import transformer_config

    m = ModelConfig(**SMALL, arch="qwen3", head_dim=16, norm_eps=1e-6, rope_theta=5e5)
    c = transformer_config(m, ParallelConfig())
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads) == (2, 32, 48, 4)
    assert c.num_query_groups == 2 and c.kv_channels == 16
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
    assert c.gated_linear_unit and c.activation_func is torch.nn.functional.silu
    assert not c.add_bias_linear and not c.add_qkv_bias and c.qk_layernorm
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
    assert c.calculate_per_token_loss  # the RL loss is a sum; see training/policy.py
    assert c.params_dtype == torch.float32 and not c.bf16
    if not torch.cuda.is_available():
        assert c.use_cpu_initialization and not c.gradient_accumulation_fusion and not c.apply_rope_fusion
    c16 = transformer_config(ModelConfig(**SMALL, params_dtype="bf16"), ParallelConfig())
    assert c16.bf16 and c16.params_dtype == torch.bfloat16 and c16.pipeline_dtype == torch.bfloat16


def test_llama_structure_and_shapes():
    p = params(build(arch="llama"))
    hd = 32 // 4
    assert p["embedding.word_embeddings.weight"] == (64, 32)
    assert p["output_layer.weight"] == (64, 32)
    # fused QKV: (q heads + 2 * kv heads) * head_dim rows; SwiGLU fc1 = [gate; up]
    assert p["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * hd, 32)
    assert p["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 48, 32)
    assert p["decoder.layers.1.mlp.linear_fc2.weight"] == (32, 48)
    assert p["decoder.final_layernorm.weight"] == (32,)
    assert not any(k.endswith(".bias") for k in p)
    assert not any("q_layernorm" in k for k in p)


def test_family_variants():
    q2 = params(build(arch="qwen2"))
    assert q2["decoder.layers.0.self_attention.linear_qkv.bias"] == ((4 + 2 * 2) * 8,)
    assert not any(k.endswith(".bias") and "linear_qkv" not in k for k in q2)
    q3 = params(build(arch="qwen3", head_dim=16))
    assert q3["decoder.layers.0.self_attention.q_layernorm.weight"] == (16,)
    assert q3["decoder.layers.0.self_attention.k_layernorm.weight"] == (16,)
    assert q3["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 32)
    assert q3["decoder.layers.0.self_attention.linear_proj.weight"] == (32, 4 * 16)
    tied = params(build(tie_word_embeddings=True))
    assert "output_layer.weight" not in tied


def test_rope_options():
    from megatron_amir.model.builder import _rope_args

    base = build(rope_theta=10000.0)
    scaled = build(rope_theta=10000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv0, inv1 = base.rotary_pos_emb.inv_freq, scaled.rotary_pos_emb.inv_freq
    hd = 8
    want = [1.0 / 10000.0 ** (2 * i / hd) for i in range(hd // 2)]
    assert max(abs(float(a) - b) for a, b in zip(inv0, want)) < 1e-7
    assert float(inv1[0]) == pytest.approx(float(inv0[0]))  # high frequencies unchanged by llama3 scaling
    assert _rope_args(ModelConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0}))[
        "seq_len_interpolation_factor"] == 2.0
    with pytest.raises(ValueError, match="has no rope_type"):  # a factor alone would be silently ignored
        _rope_args(ModelConfig(**SMALL, rope_scaling={"factor": 8.0}))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' unsupported"):
        _rope_args(ModelConfig(**SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="model.rope_scaling.high_freq_factor"):
        _rope_args(ModelConfig(**SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}))


def test_forward_shapes_and_causality():
    model = build()
    model.eval()
    tok = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        out = model(tok, pos, None)
        assert out.shape == (3, 7, 64)
        tok2 = tok.clone()
        tok2[:, 4:] = (tok2[:, 4:] + 1) % 64
        out2 = model(tok2, pos, None)
    assert torch.equal(out[:, :4], out2[:, :4])  # causal: later tokens never change earlier logits
    assert not torch.equal(out[:, 4:], out2[:, 4:])
    # untrained model: near-uniform predictions
    lp = torch.log_softmax(out.double(), -1)
    assert float((-(lp.exp() * lp).sum(-1)).mean()) > 0.9 * math.log(64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only guards")
def test_cpu_guards():
    from megatron_amir.model.builder import FP8UnavailableError, transformer_config

    with pytest.raises(FP8UnavailableError, match="model.fp8"):
        build(fp8="e4m3")
    with pytest.raises(ValueError, match="sequence_parallel is not supported on CPU"):
        transformer_config(ModelConfig(**SMALL), ParallelConfig(sequence_parallel=True))


def test_fp8_recipe_needs_the_right_gpu():
    """Pure check of recipe vs compute capability (the GPU path calls it with the real capability)."""
    from megatron_amir.model.builder import FP8UnavailableError, check_fp8_support

    check_fp8_support(ModelConfig(**SMALL), (7, 0))  # no FP8 requested: nothing to check
    check_fp8_support(ModelConfig(**SMALL, fp8="hybrid", fp8_recipe="tensorwise"), (9, 0))
    check_fp8_support(ModelConfig(**SMALL, fp8="e4m3", fp8_recipe="delayed"), (8, 9))
    check_fp8_support(ModelConfig(**SMALL, fp8="hybrid", fp8_recipe="blockwise"), (9, 0))
    check_fp8_support(ModelConfig(**SMALL, fp8="hybrid", fp8_recipe="mxfp8"), (10, 0))
    with pytest.raises(FP8UnavailableError, match="fp8_recipe='mxfp8'.*>= 10.0; this one is 9.0"):
        check_fp8_support(ModelConfig(**SMALL, fp8="hybrid", fp8_recipe="mxfp8"), (9, 0))
    with pytest.raises(FP8UnavailableError, match="blockwise"):
        check_fp8_support(ModelConfig(**SMALL, fp8="hybrid", fp8_recipe="blockwise"), (8, 9))
    with pytest.raises(FP8UnavailableError, match=">= 8.9; this one is 8.0"):
        check_fp8_support(ModelConfig(**SMALL, fp8="e4m3"), (8, 0))
