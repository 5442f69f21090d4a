"""GPU-only: Transformer Engine layer spec and FP8 training steps (skip on CPU with a reason).

Tolerance (stated): from the same bf16 initial weights and batch, the FP8 (hybrid, tensorwise/current
scaling) policy's token log-probs differ from bf16's by < 0.05 nats on average, and each of 3 RL step
losses differs by < 0.05 absolute (losses here are O(0.1-1)). FP8 GEMMs quantize activations and weights
to 8 bits (e4m3 forward / e5m2 backward for hybrid), so per-token log-prob noise of a few 1e-2 is expected.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + Transformer Engine (FP8)"),
]

N, L, G = 8, 32, 4


def _te():
    from megatron_amir.model.builder import te_available

    if not te_available():
        pytest.skip("transformer_engine is not installed")


def make_cfg(**model):
    from megatron_amir.config import Config

    m = dict(arch="llama", vocab_size=256, hidden_size=128, ffn_hidden_size=256, num_layers=2,
             num_attention_heads=4, num_kv_heads=2, params_dtype="bf16")
    m.update(model)
    return Config(model=m, algorithm=dict(amir=dict(enabled=True, adaptive_lambda=False, lambda_init=0.05)),
                  data=dict(prompts_per_step=N // G), rollout=dict(group_size=G),
                  train=dict(lr=1e-4, micro_batch_size=4, seed=1, steps=10))


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (N, L), generator=g)
    mask = torch.zeros(N, L - 1)
    mask[:, 8:] = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    return tokens, mask, rewards, torch.arange(N) // G


def _steps(policy, cfg, n=3):
    from megatron_amir.algorithms import AmirState, prepare_batch

    tokens, mask, rewards, gids = _batch()
    logp0 = policy.compute_logprobs(tokens)
    losses = []
    for _ in range(n):
        old = policy.compute_logprobs(tokens)
        prep = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg.algorithm,
                             amir_state=AmirState.from_config(cfg.algorithm.amir))
        losses.append(policy.train_step(tokens, prep)["loss"])
    return logp0, losses


def test_te_spec_is_chosen_on_gpu():
    _te()
    from megatron_amir.config import ModelConfig
    from megatron_amir.model.builder import choose_transformer_impl

    assert choose_transformer_impl(ModelConfig()) == "transformer_engine"
    assert choose_transformer_impl(ModelConfig(transformer_impl="local")) == "local"


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_step_tracks_bf16(tmp_path, recipe):
    _te()
    from megatron_amir.training.policy import Policy

    cfg_bf16 = make_cfg()
    bf16 = Policy(cfg_bf16)
    assert bf16.impl == "transformer_engine"
    bf16.save(tmp_path / "init", save_optimizer=False)
    logp_bf16, loss_bf16 = _steps(bf16, cfg_bf16)

    cfg_fp8 = make_cfg(fp8="hybrid", fp8_recipe=recipe)
    fp8 = Policy(cfg_fp8)
    assert fp8.config.fp8 == "hybrid" and fp8.config.fp8_recipe == recipe
    fp8.load(tmp_path / "init", load_optimizer=False)
    logp_fp8, loss_fp8 = _steps(fp8, cfg_fp8)

    assert torch.isfinite(logp_fp8).all() and all(map(lambda x: x == x, loss_fp8))
    assert float((logp_fp8 - logp_bf16).abs().mean()) < 0.05
    for a, b in zip(loss_bf16, loss_fp8):
        assert abs(a - b) < 0.05, (loss_bf16, loss_fp8)


def test_offloaded_reference_frees_device_memory():
    """On a GPU the offloaded reference holds no device memory between passes and matches a resident copy."""
    from megatron_amir.training.policy import Policy

    cfg = make_cfg(transformer_impl="local")
    policy = Policy(cfg)
    tokens = _batch()[0]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    off = policy.frozen_copy(offload=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20  # nothing but allocator noise stays on the device
    resident = policy.frozen_copy()
    torch.testing.assert_close(off.compute_logprobs(tokens), resident.compute_logprobs(tokens), rtol=0, atol=0)
    assert all(h.is_pinned() for _, h in off._host)
