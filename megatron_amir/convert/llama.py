"""Llama (1/2/3.x, incl. llama3 rope scaling): the base decoder table, nothing optional."""

from megatron_amir.convert.mapping import Family, register_family


def _check(hf: dict) -> None:
    # Megatron's linear_qkv bias has no o_proj counterpart and fc1/fc2 biases are all-or-nothing with it.
    if hf.get("attention_bias"):
        raise ValueError("LlamaForCausalLM with attention_bias=true (q/k/v/o biases) is not supported")
    if hf.get("mlp_bias"):
        raise ValueError("LlamaForCausalLM with mlp_bias=true is not supported")


LLAMA = register_family(
    Family(
        arch="llama",
        hf_architectures=("LlamaForCausalLM",),
        hf_model_type="llama",
        hf_config_class="LlamaConfig",
        check_hf_config=_check,
        hf_config_extras=lambda cfg: {"attention_bias": False, "mlp_bias": False, "head_dim": cfg.kv_channels},
    )
)
