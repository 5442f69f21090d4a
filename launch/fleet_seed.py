"""Write the snapshot an embedded rollout server starts from when the trainer has not produced weights yet.

``megatron-amir serve`` (megatron_amir/rollout/server.py) needs ``--model HF_DIR`` or ``--snapshot DIR``.
In slurm/amir_hetjob.sbatch the fleet starts *before* the trainer, so there is neither; the trainer pushes
its real weights to every server as soon as it starts (FleetEngine.load_weights, also after a resume), so
the servers only need a model of the right architecture to begin with. This writes one::

    python -m launch.fleet_seed CONFIG OUT_ROOT [key.path=value ...]   # prints OUT_ROOT/v0
    python -m launch.fleet_seed --hf CONFIG OUT_DIR [key.path=value ...]  # an HF directory for vLLM members

The HF config is the one the trainer gives its rollout engine (megatron_amir.training.data_setup:
the tokenizer's real vocabulary, padding rows dropped), the tensors are the embedded engine's random
initialization with ``cfg.train.seed``, written with megatron_amir.rollout.weight_sync (safetensors +
manifest with sha256, atomic).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


def rollout_hf_config_of(cfg) -> dict:
    """The HF config the trainer gives its rollout engine (same call path as the trainer: the tokenizer's
    real vocabulary bound into ``cfg.model``, padding rows dropped)."""
    from megatron_amir.training.data_setup import bind_vocab, build_data, rollout_hf_config

    tokenizer, _, _ = build_data(cfg)
    bind_vocab(cfg, tokenizer)
    return rollout_hf_config(cfg)


def _seed_weights(config: str, overrides: Sequence[str]) -> tuple[dict, dict, bool]:
    """(HF config, HF-named random-init tensors with ``cfg.train.seed``, ``rollout.fp8_rollout``) of the config's
    rollout model."""
    import torch

    from megatron_amir.config import load_config
    from megatron_amir.rollout.hf_model import CausalLM

    cfg = load_config(config, list(overrides))
    hf_config = rollout_hf_config_of(cfg)
    torch.manual_seed(cfg.train.seed)
    model = CausalLM(hf_config)
    names = model.expected_names()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}
    return hf_config, tensors, cfg.rollout.fp8_rollout


def write_seed_snapshot(config: str, out_root: str | Path, overrides: Sequence[str] = ()) -> Path:
    from megatron_amir.rollout.weight_sync import write_snapshot

    hf_config, tensors, fp8 = _seed_weights(config, overrides)
    if fp8:  # the servers' weights are what FP8 layers would hold, as after every update (rollout.fp8)
        from megatron_amir.rollout.fp8 import fp8_named_tensors

        tensors = dict(fp8_named_tensors(tensors))
    return write_snapshot(tensors, out_root, version=0, hf_config=hf_config)


def write_seed_hf_dir(config: str, out_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
    """The same model as an HF directory (config.json + model.safetensors, no generation_config.json) for stock
    vLLM members: its vocab_size is the trainer's, so the trainer's weight updates fit it (vLLM refuses
    embedding rows that differ from the served config's vocab_size). With ``rollout.fp8_rollout`` it is an FP8 block
    checkpoint (quantized linear weights + config.json's quantization_config), so the members allocate the e4m3 weights
    and scales the trainer's updates carry."""
    from megatron_amir.rollout.vllm_engine import write_hf_dir

    hf_config, tensors, fp8 = _seed_weights(config, overrides)
    return write_hf_dir(out_dir, hf_config, tensors, fp8=fp8)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    hf_dir = argv[:1] == ["--hf"]
    if hf_dir:
        argv = argv[1:]
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m launch.fleet_seed [--hf] CONFIG OUT [key.path=value ...]\n"
              "  (--hf: OUT is an HF directory for vLLM; default: OUT is a snapshot root, prints OUT/v0)",
              file=sys.stderr)
        return 2
    from megatron_amir.config import ConfigError

    try:
        write = write_seed_hf_dir if hf_dir else write_seed_snapshot
        path = write(argv[0], argv[1], argv[2:])
    except ConfigError as exc:
        print(f"launch.fleet_seed: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
