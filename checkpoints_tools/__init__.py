"""HF <-> Megatron-Core checkpoint conversion (see docs/converters.md).

The name/layout mapping lives in ``checkpoints_tools.mapping`` (one table per family in llama.py, qwen2.py,
qwen3.py, mistral.py); the trainer -> rollout weight sync uses the same functions.
"""

from checkpoints_tools.config_bridge import hf_config_from_model_config, model_config_from_hf
from checkpoints_tools.mapping import (
    MappingError,
    gather_tp_shards,
    hf_to_mcore_named_tensors,
    mcore_tp_shard_to_hf,
    mcore_to_hf_named_tensors,
    model_mapping,
    padded_vocab_size,
    strip_vocab,
    supported_architectures,
)

__all__ = [
    "MappingError",
    "gather_tp_shards",
    "hf_config_from_model_config",
    "hf_to_mcore_named_tensors",
    "mcore_tp_shard_to_hf",
    "mcore_to_hf_named_tensors",
    "model_config_from_hf",
    "model_mapping",
    "padded_vocab_size",
    "strip_vocab",
    "supported_architectures",
]
