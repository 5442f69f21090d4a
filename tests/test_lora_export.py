"""LoRA export: PEFT adapter (adapter_config.json + adapter_model.safetensors) loaded with ``peft`` onto the base
model our converter exports, and the merged HF model loaded with stock ``transformers``: logits equal our Megatron
LoRA model's within fp32 tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_lora import make_cfg, randomize_adapters

TOL = 1e-4  # fp32, different kernels (as tests/test_convert_parity.py)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from megatron_amir.convert.mcore_to_hf import mcore_to_hf
    from megatron_amir.convert.peft_export import mcore_to_peft
    from megatron_amir.model.lora import adapters_disabled
    from megatron_amir.training.policy import Policy

    root = tmp_path_factory.mktemp("lora_export")
    cfg = make_cfg(seed=8)
    policy = Policy(cfg)
    randomize_adapters(policy, seed=4, scale=0.3)
    step = root / "step_00000001"
    policy.save(step / "model", save_optimizer=False)
    (step / "meta.json").write_text(json.dumps({"step": 1, "config": {"model": cfg.model.model_dump(mode="json")}}))
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = policy.model[0](tokens, pos, None).float()
        with adapters_disabled(policy.modules()):
            ours_base = policy.model[0](tokens, pos, None).float()
    mcore_to_hf(step, root / "merged")
    mcore_to_hf(step, root / "base", lora="base")
    mcore_to_peft(step, root / "peft", base_model_name_or_path="base")
    return {"root": root, "tokens": tokens, "ours": ours, "ours_base": ours_base, "step": step}


def _maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def test_merged_export_loads_in_transformers(exported):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["root"] / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(exported["tokens"]).logits
    assert _maxdiff(logits, exported["ours"]) < TOL
    assert _maxdiff(exported["ours"], exported["ours_base"]) > 1e-2  # the adapters change the logits


def test_peft_adapter_loads_onto_the_exported_base(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = exported["root"]
    cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert _maxdiff(base(exported["tokens"]).logits, exported["ours_base"]) < TOL
    model = PeftModel.from_pretrained(base, root / "peft").eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert n_lora == 2 * 7 * 2  # A and B of 7 projections in 2 layers: every adapter was loaded
    with torch.no_grad():
        logits = model(exported["tokens"]).logits
    assert _maxdiff(logits, exported["ours"]) < TOL


def test_cli_and_errors(exported, tmp_path, capsys):
    from checkpoints_tools.cli import main

    assert main(["mcore-to-peft", "--ckpt", str(exported["step"]), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert main(["mcore-to-peft", "--ckpt", str(exported["step"]), "--out", str(tmp_path / "p")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_eval_loader_merges_the_adapters(exported):
    """Evaluating a LoRA checkpoint evaluates the trained model (merged), not its base."""
    from safetensors.torch import load_file

    from megatron_amir.eval.loading import megatron_checkpoint_to_hf

    _, tensors = megatron_checkpoint_to_hf(exported["step"])
    merged = {}
    for f in sorted((exported["root"] / "merged").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    assert set(tensors) == set(merged) and all(torch.equal(tensors[k], merged[k]) for k in merged)
