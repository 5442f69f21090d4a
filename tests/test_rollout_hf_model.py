"""The compact HF-family model matches transformers logits, including left padding and the KV cache."""

import pytest
import torch

from megatron_amir.rollout.hf_model import CausalLM, HFConfigError, ModelArgs
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(1)

CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("mistral", {"sliding_window": 4}),
]


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_logits_match_transformers(family, overrides):
    hf, cfg = tiny_hf_model(family, **overrides)
    m = CausalLM(cfg).eval()
    m.load_hf_state_dict(hf.state_dict())
    toks = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(toks).logits
        full = m(toks, torch.arange(11).expand(2, 11))
        # row 0 left-padded by 3, then decoded one and two tokens at a time through the cache
        pad = 3
        t = torch.cat([torch.zeros(2, pad, dtype=torch.long), toks[:, :8]], 1)
        p = torch.cat([torch.full((2, pad), -1), torch.arange(8).expand(2, 8)], 1)
        cache = m.new_cache(2, 16)
        o1 = m(t, p, cache)
        o2 = m(toks[:, 8:9], torch.full((2, 1), 8), cache)
        o3 = m(toks[:, 9:11], torch.tensor([[9, 10], [9, 10]]), cache)
    assert (full - ref).abs().max() < 1e-5
    assert (o1[:, pad:] - ref[:, :8]).abs().max() < 1e-5
    assert (o2[:, 0] - ref[:, 8]).abs().max() < 1e-5
    assert (o3 - ref[:, 9:11]).abs().max() < 1e-5


def test_sliding_window_changes_logits():
    """Guard that the window really masks (else the mistral case above could pass vacuously)."""
    hf, cfg = tiny_hf_model("mistral")
    a = CausalLM(cfg).eval()
    a.load_hf_state_dict(hf.state_dict())
    b = CausalLM({**cfg, "sliding_window": 3}).eval()
    b.load_hf_state_dict(hf.state_dict())
    toks = torch.randint(0, 512, (1, 10))
    pos = torch.arange(10)[None]
    with torch.no_grad():
        la, lb = a(toks, pos), b(toks, pos)
    assert (la[:, :3] - lb[:, :3]).abs().max() < 1e-6
    assert (la[:, 5:] - lb[:, 5:]).abs().max() > 1e-3


def test_load_errors_name_the_weight():
    hf, cfg = tiny_hf_model("llama")
    m = CausalLM(cfg)
    sd = dict(hf.state_dict())
    with pytest.raises(KeyError, match="model.bogus"):
        m.load_hf_state_dict({**sd, "model.bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        m.load_hf_state_dict(bad)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="up_proj"):
        m.load_hf_state_dict(sd)


def test_config_errors_name_the_field():
    with pytest.raises(HFConfigError, match="model_type"):
        ModelArgs.from_hf_config({"model_type": "gpt2"})
    _, cfg = tiny_hf_model("llama")
    cfg = dict(cfg)
    del cfg["intermediate_size"]
    with pytest.raises(HFConfigError, match="intermediate_size"):
        ModelArgs.from_hf_config(cfg)
    with pytest.raises(HFConfigError, match="rope_scaling"):
        ModelArgs.from_hf_config({**tiny_hf_model("llama")[1], "rope_scaling": {"rope_type": "yarn", "factor": 2}})
