"""Mistral (v0.2+ style, no sliding window): the Llama decoder under another name."""

from megatron_amir.convert.mapping import Family, register_family


def _check(hf: dict) -> None:
    # The Megatron local/TE attention used here is full causal attention; a window would change the logits.
    if hf.get("sliding_window") is not None:
        raise ValueError(
            f"MistralForCausalLM with sliding_window={hf['sliding_window']} is not supported; "
            "only sliding_window=null (full attention) converts exactly"
        )


MISTRAL = register_family(
    Family(
        arch="mistral",
        hf_architectures=("MistralForCausalLM",),
        hf_model_type="mistral",
        hf_config_class="MistralConfig",
        check_hf_config=_check,
        hf_config_extras=lambda cfg: {"sliding_window": None, "head_dim": cfg.kv_channels},
    )
)
