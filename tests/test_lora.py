"""LoRA adapters on the Megatron policy in one process (TP=PP=1): layer math against float64 dense references,
frozen base, adapter-only optimizer, reference = adapters off, merged HF weights, checkpoints."""

from __future__ import annotations

import pytest
import torch

from megatron_amir.config import Config, ConfigError, config_from_dict
from tests.test_policy import G, N, V, batch

torch.set_num_threads(2)

R, ALPHA = 4, 8.0


def make_cfg(lora: bool = True, seed: int = 3, **lora_kw):
    return Config(
        model=dict(arch="qwen2", vocab_size=V, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                   num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64),
        algorithm=dict(amir=dict(enabled=True, lambda_init=0.05, adaptive_lambda=False)),
        data=dict(prompts_per_step=N // G), rollout=dict(group_size=G),
        train=dict(lr=1e-2, micro_batch_size=2, clip_grad=1e9, seed=seed, steps=10),
        lora={"enabled": lora, "rank": R, "alpha": ALPHA, **lora_kw},
    )


def train_step(policy, cfg):
    from megatron_amir.algorithms import AmirState, prepare_batch

    tokens, mask, rewards, gids = batch()
    old = policy.compute_logprobs(tokens)
    prepared = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg.algorithm,
                             amir_state=AmirState.from_config(cfg.algorithm.amir))
    return policy.train_step(tokens, prepared)


def randomize_adapters(policy, seed: int = 11, scale: float = 0.2):
    """B = 0 at init makes every adapter a no-op; tests need adapters that change the output."""
    from megatron_amir.model.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(policy.modules()):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def policy():
    from megatron_amir.training.policy import Policy

    p = Policy(make_cfg())
    randomize_adapters(p)
    return p


# ------------------------------------------------------------------------------------------------ pure math
def test_merge_unmerge_and_dense_reference_float64():
    from megatron_amir.model.lora import lora_linear_reference, merge_weight, unmerge_weight

    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((12, 7), (3, 7), (12, 3)))
    b, x = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    s = 2.5
    merged = merge_weight(W, A, B, s)
    # element by element: W'_ij = W_ij + s Σ_k B_ik A_kj
    explicit = W.clone()
    for i in range(12):
        for j in range(7):
            explicit[i, j] += s * sum(B[i, k] * A[k, j] for k in range(3))
    assert torch.allclose(merged, explicit, atol=1e-12)
    assert torch.allclose(unmerge_weight(merged, A, B, s), W, atol=1e-12)
    assert torch.allclose(lora_linear_reference(x, W, b, A, B, s), x @ merged.T + b, atol=1e-12)


def test_merge_lora_state_dict_drops_adapters():
    from megatron_amir.model.lora import merge_lora_state_dict, merge_weight

    g = torch.Generator().manual_seed(1)
    sd = {"a.linear_qkv.weight": torch.randn(6, 4, generator=g), "a.linear_qkv.lora_A": torch.randn(2, 4, generator=g),
          "a.linear_qkv.lora_B": torch.randn(6, 2, generator=g), "a.norm.weight": torch.randn(4, generator=g)}
    out = merge_lora_state_dict(sd, 0.5)
    assert set(out) == {"a.linear_qkv.weight", "a.norm.weight"}
    assert torch.equal(out["a.norm.weight"], sd["a.norm.weight"])
    assert torch.equal(out["a.linear_qkv.weight"], merge_weight(sd["a.linear_qkv.weight"], sd["a.linear_qkv.lora_A"],
                                                                 sd["a.linear_qkv.lora_B"], 0.5))


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("target", ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                                    "mlp.linear_fc2"])
def test_wrapped_layer_equals_dense_float64_reference(policy, target):
    from megatron_amir.model.lora import adapters_disabled, lora_linear_reference

    layer = policy.modules()[0].decoder.layers[1]
    parent, name = target.split(".")
    lin = getattr(getattr(layer, parent), name)
    assert type(lin).__name__.startswith("LoRA")
    x = torch.randn(5, 3, lin.weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, bias = lin(x)
        if bias is not None:
            out = out + bias
        b = getattr(lin, "bias", None)
        ref = lora_linear_reference(x.double(), lin.weight.double(), None if b is None else b.double(),
                                    lin.lora_A.double(), lin.lora_B.double(), ALPHA / R)
        assert float((out.double() - ref).abs().max()) < 1e-5
        with adapters_disabled(policy.modules()):
            base, bias2 = lin(x)
        base = base if bias2 is None else base + bias2
        dense = x.double() @ lin.weight.double().T + (0 if b is None else b.double())
        assert float((base.double() - dense).abs().max()) < 1e-5
        assert float((out - base).abs().max()) > 1e-3  # the adapters do contribute
    assert lin.lora_enabled  # restored after the block


def test_fresh_adapters_are_a_no_op_and_init_is_seeded():
    from megatron_amir.model.lora import lora_modules
    from megatron_amir.training.policy import Policy

    tokens, *_ = batch()
    a = Policy(make_cfg(seed=21))
    base = Policy(make_cfg(lora=False, seed=21))
    assert float((a.compute_logprobs(tokens) - base.compute_logprobs(tokens)).abs().max()) == 0.0
    la = list(lora_modules(a.modules()))
    assert all(float(m.lora_B.abs().max()) == 0.0 for m in la)
    assert all(0 < float(m.lora_A.abs().max()) <= 1 / m.lora_A.shape[1] ** 0.5 for m in la)  # U(-1/sqrt(in), ..)
    assert not torch.equal(la[0].lora_A, la[4].lora_A)  # each layer/module draws its own A


def test_config_validation():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        config_from_dict({"lora": {"target_modules": ["linear_qkv", "linear_qkv"]}})
    with pytest.raises(ConfigError, match="lora.target_modules"):
        config_from_dict({"lora": {"target_modules": ["q_proj"]}})
    with pytest.raises(ConfigError, match="lora.rank"):
        config_from_dict({"lora": {"rank": 0}})
    for name, field in type(make_cfg().lora).model_fields.items():
        assert field.description, name


# ------------------------------------------------------------------------------------------------ training
def test_only_adapters_train_and_base_is_unchanged_bit_for_bit():
    from megatron_amir.model.lora import adapter_parameters
    from megatron_amir.training.policy import Policy

    cfg = make_cfg(seed=5)
    p = Policy(cfg)
    randomize_adapters(p)
    adapters = {id(x) for x in adapter_parameters(p.modules())}
    opt_params = [x for g in p.optimizer.param_groups for x in g["params"]]
    assert len(opt_params) == len(adapters) == 2 * 4 * 2
    base0 = {n: x.detach().clone() for n, x in p.modules()[0].named_parameters() if id(x) not in adapters}
    lora0 = {n: x.detach().clone() for n, x in p.modules()[0].named_parameters() if id(x) in adapters}
    for _ in range(3):
        m = train_step(p, cfg)
        assert m["update_successful"] == 1.0 and m["grad_norm"] > 0
    for n, x in p.modules()[0].named_parameters():
        if id(x) in adapters:
            assert x.requires_grad and float(x.main_grad.abs().max()) > 0, n  # gradients reach every adapter
            assert not torch.equal(x, lora0[n]), n
        else:
            assert not x.requires_grad and getattr(x, "main_grad", None) is None and x.grad is None, n
            assert torch.equal(x, base0[n]), n


def test_reference_is_the_base_with_adapters_off(policy):
    from megatron_amir.model.lora import AdaptersOffReference, adapter_parameters

    tokens, *_ = batch()
    ref = policy.frozen_copy(offload=True)
    assert isinstance(ref, AdaptersOffReference)
    ref_lp = ref.compute_logprobs(tokens)
    saved = [x.detach().clone() for x in adapter_parameters(policy.modules())]
    with torch.no_grad():
        for x in adapter_parameters(policy.modules()):
            if x.shape[1] == R:  # B
                x.zero_()
    base_lp = policy.compute_logprobs(tokens)
    with torch.no_grad():
        for x, s in zip(adapter_parameters(policy.modules()), saved):
            x.copy_(s)
    assert float((ref_lp - base_lp).abs().max()) == 0.0
    assert float((policy.compute_logprobs(tokens) - base_lp).abs().max()) > 1e-3  # adapters back on
    with pytest.raises(RuntimeError, match="adapters off"):
        ref.load("somewhere")


def test_full_hf_state_dict_is_merged(policy):
    from megatron_amir.model.lora import merge_weight

    full = policy.full_state_dict()
    hf = policy.full_hf_state_dict()
    assert not any("lora" in k for k in hf)
    s = ALPHA / R
    name = "decoder.layers.0.mlp.linear_fc2"
    expect = merge_weight(full[name + ".weight"], full[name + ".lora_A"], full[name + ".lora_B"], s)
    assert torch.equal(hf["model.layers.0.mlp.down_proj.weight"], expect)
    assert not torch.equal(expect, full[name + ".weight"])


def test_checkpoint_round_trip_and_base_only_checkpoint(policy, tmp_path):
    from megatron_amir.model.lora import adapter_parameters
    from megatron_amir.training.policy import Policy

    tokens, *_ = batch()
    want = policy.compute_logprobs(tokens)
    policy.save(tmp_path / "lora", save_optimizer=False)
    other = Policy(make_cfg(seed=99))
    other.load(tmp_path / "lora")
    assert float((other.compute_logprobs(tokens) - want).abs().max()) == 0.0
    with pytest.raises(ValueError, match="lora.alpha: config 4.0, checkpoint 8.0"):
        Policy(make_cfg(seed=99, alpha=4.0)).load(tmp_path / "lora")
    # a checkpoint without adapters (full fine-tuning / warm-up) loads its base; the adapters stay fresh
    plain = Policy(make_cfg(lora=False, seed=42))
    plain.save(tmp_path / "plain", save_optimizer=True)
    fresh = Policy(make_cfg(seed=43))
    b0 = [x.detach().clone() for x in adapter_parameters(fresh.modules())]
    fresh.load(tmp_path / "plain")
    assert all(torch.equal(x, y) for x, y in zip(adapter_parameters(fresh.modules()), b0))
    assert float((fresh.compute_logprobs(tokens) - Policy(make_cfg(seed=43)).compute_logprobs(tokens)).abs().max()) > 0
    assert float((fresh.compute_logprobs(tokens) - plain.compute_logprobs(tokens)).abs().max()) == 0.0
    # the other way round, the trained adapters would be dropped without a word: refused, naming the way out
    with pytest.raises(ValueError, match="holds LoRA adapters .* but this policy has none"):
        Policy(make_cfg(lora=False, seed=44)).load(tmp_path / "lora")
