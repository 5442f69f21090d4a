"""Megatron-Core checkpoint (converted dir or trainer step dir) -> Hugging Face directory.

The checkpoint is loaded (any saved TP/PP: dist_checkpointing reshards) into an uninitialized TP=PP=1 model
with the trainer's ``load_checkpoint``; its parameters go through ``mapping.mcore_to_hf_named_tensors``
(padding rows stripped) into size-limited safetensors shards that are written as they fill, so beyond the
model itself only one shard's worth of split q/k/v and gate/up copies is held. config.json comes from
``hf_config_from_model_config`` (keeping the source config's other keys), tokenizer and generation files are
copied. Output appears atomically (temp dir beside ``out_dir``, renamed at the end).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from megatron_amir.config import ModelConfig
from megatron_amir.convert import hf_io
from megatron_amir.convert.hf_config import hf_config_from_model_config
from megatron_amir.convert.mapping import model_mapping
from megatron_amir.convert.megatron_side import (
    HF_SUBDIR,
    MODEL_SUBDIR,
    dtype_of,
    read_meta,
    single_process_megatron,
)
from megatron_amir.convert.peft_export import load_export_model
from megatron_amir.training.weight_stream import stream_hf_buckets

log = logging.getLogger(__name__)
EXPORT_BUCKET_BYTES = 256 * 1024**2


def _write_bucket(writer, bucket, expected: dict, dtype) -> None:
    for name, tensor in bucket.tensors:
        if tuple(tensor.shape) != expected.get(name):
            raise ValueError(f"shape mismatch for exported tensor '{name}': {tuple(tensor.shape)}, "
                             f"config implies {expected.get(name)}")
        # Megatron's local-spec norms stay fp32 in a bf16 model; HF files hold one dtype (exact cast back)
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / bytes -> bytes (powers of 1000, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = text.strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 1000000)")


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    vocab_size: Optional[int] = None,
    lora: str = "merge",
) -> list[Path]:
    """Export ``ckpt_dir`` (with ``model/`` inside) to ``out_dir`` (must not exist or be empty).

    vocab_size: original vocabulary to keep (default: the one recorded in the checkpoint metadata).
    lora: for a checkpoint with LoRA adapters, ``merge`` writes W + s·B A, ``base`` the frozen base weights (the
    model a PEFT adapter from ``peft_export.mcore_to_peft`` goes on).
    Returns the written safetensors files.
    """
    t0 = time.perf_counter()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    hf_io.check_empty_target(out_dir)
    meta = read_meta(ckpt_dir)
    model_dir = ckpt_dir / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} not found: no Megatron model checkpoint in {ckpt_dir}")
    model_cfg = ModelConfig(**meta["model"])
    vocab = int(vocab_size or meta.get("original_vocab_size") or model_cfg.vocab_size)
    if vocab > model_cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab} exceeds the checkpoint's (padded) vocabulary {model_cfg.vocab_size}")
    hf_config = hf_config_from_model_config(model_cfg, vocab_size=vocab, base=meta.get("hf_config"))
    expected = model_mapping(model_cfg).hf_shapes(vocab)

    if lora not in ("merge", "base"):
        raise ValueError(f"lora={lora!r}: choose merge or base")
    tmp = hf_io.temp_dir_beside(out_dir)
    try:
        with single_process_megatron():
            # load errors name the file and keep the root cause
            model, scaling = load_export_model(ckpt_dir, model_cfg, lora)
            dtype = dtype_of(model_cfg)
            writer = hf_io.ShardedWriter(tmp, parse_size(max_shard_size))
            for bucket in stream_hf_buckets([model], model_cfg, bucket_bytes=EXPORT_BUCKET_BYTES, vocab_size=vocab,
                                            lora_scaling=scaling):
                _write_bucket(writer, bucket, expected, dtype)
            missing = set(expected) - set(writer.names())
            if missing:
                raise ValueError(f"export lacks tensors {sorted(missing)[:6]}")
            files = writer.close()
            del model
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        side_src = ckpt_dir / HF_SUBDIR
        if side_src.is_dir():
            hf_io.copy_side_files(side_src, tmp)
        hf_io.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s in %.1f s", ckpt_dir, out_dir, time.perf_counter() - t0)
    return [out_dir / f.name for f in files]
