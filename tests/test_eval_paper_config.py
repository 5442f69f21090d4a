"""configs/paper_qwen2.5_7b.yaml: loads, validates, and describes Qwen2.5-7B-Instruct exactly."""

from pathlib import Path

from megatron_amir.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_qwen2.5_7b.yaml"

# config.json of Qwen/Qwen2.5-7B-Instruct (the fields that fix the architecture)
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def test_paper_config_loads_with_the_paper_hyperparameters():
    cfg = load_config(CONFIG)
    a = cfg.algorithm.amir
    assert (cfg.rollout.group_size, a.beta, a.lambda_init, a.adaptive_lambda, cfg.train.lr) == (8, 0.2, 0.01, True, 5e-6)
    assert a.enabled and a.logprob_norm == "mean" and not a.reference_anchored
    assert cfg.model.arch == "qwen2" and cfg.model.use_qkv_bias and cfg.model.rope_theta == 1e6
    assert cfg.parallel.tensor_model_parallel_size == 4 and cfg.parallel.pipeline_model_parallel_size == 1
    assert cfg.model.params_dtype == "bf16" and cfg.eval.samples == 8 and cfg.eval.temperature == 0.6
    # the GRPO baseline and the FP8 variant are one override away and still validate
    base = load_config(CONFIG, ["algorithm.amir.enabled=false", "model.fp8=hybrid"])
    assert not base.algorithm.amir.enabled and base.model.fp8 == "hybrid"


def test_paper_config_matches_the_hf_architecture():
    from megatron_amir.convert.hf_config import hf_config_from_model_config

    hf = hf_config_from_model_config(load_config(CONFIG).model)
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    for k, v in QWEN25_7B.items():
        assert hf[k] == v, k
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta"))
    assert theta == 1e6
