"""HF <-> Megatron-Core: the one name/layout mapping, the config bridge and the file-to-file conversions.

- ``mapping``: HF <-> Megatron parameter names and layouts (one table per family in ``llama``, ``qwen2``,
  ``qwen3``, ``mistral``); the trainer -> rollout weight sync and the converters both use it.
- ``hf_config``: HF config.json <-> ``ModelConfig``.
- ``hf_io``: HF directories (safetensors headers and shards, side files, atomic publication).
- ``torch_dist``: the torch_dist checkpoint writer ``hf_to_mcore`` uses.
- ``megatron_side``: one-process Megatron context, empty model, converted-directory layout and metadata.
- ``hf_to_mcore`` / ``mcore_to_hf``: the conversions (the trainer's ``model.hf_path``, eval's vLLM export, and
  ``megatron-amir convert`` in checkpoints_tools).
- ``peft_export``: export of LoRA checkpoints: merged or base weights for ``mcore_to_hf``, adapters in the PEFT
  format.
"""
