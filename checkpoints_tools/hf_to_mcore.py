"""Hugging Face directory -> Megatron-Core torch_dist checkpoint (+ metadata), streaming shard by shard.

Each HF tensor is read (``hf_io.iter_safetensors``), mapped (``mapping.hf_to_mcore_named_tensors``: q/k/v and
gate/up wait only until their partners arrive) and copied into the matching parameter of an uninitialized
TP=PP=1 GPTModel, then freed; the model is saved with the trainer's checkpoint code. Peak memory is about one
copy of the model plus one tensor in flight. Output appears atomically: everything is written to a temp
directory beside ``out_dir`` and renamed at the end; on any error the temp directory is removed.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from checkpoints_tools import hf_io
from checkpoints_tools.config_bridge import model_config_from_hf
from checkpoints_tools.mapping import MappingError, hf_to_mcore_named_tensors, model_mapping, padded_vocab_size
from checkpoints_tools.megatron_side import (
    HF_SUBDIR,
    MODEL_SUBDIR,
    build_empty_model,
    prestart_checkpoint_writer,
    save_model,
    single_process_megatron,
    write_meta,
)

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def check_parallel(model_cfg, tp: int, pp: int) -> None:
    """TP must divide attention and KV heads, PP the layers (the checkpoint must load at that layout)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    for field, n in (("num_attention_heads", model_cfg.num_attention_heads),
                     ("num_key_value_heads", model_cfg.num_kv_heads)):
        if n % tp:
            raise ValueError(f"TP={tp} does not divide {field}={n} (TP must divide attention and KV heads)")
    if model_cfg.num_layers % pp:
        raise ValueError(f"PP={pp} does not divide num_hidden_layers={model_cfg.num_layers}")


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[str] = None,
) -> dict:
    """Convert ``hf_dir`` to a Megatron checkpoint in ``out_dir`` (must not exist or be empty).

    tp / pp: the layout the checkpoint is meant for; the files are reshardable, tp sets the vocabulary padding
    (multiple of 128 * tp) and both are validated against the architecture.
    dtype: fp32 | bf16 | fp16 for the Megatron parameters (default: the HF config's dtype).
    Returns the metadata written to ``megatron_amir_model.json``.
    """
    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_io.check_empty_target(out_dir)
    hf_config = hf_io.read_config(hf_dir)
    overrides = {}
    if dtype is not None:
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {dtype!r} not one of {DTYPE_CHOICES}")
        overrides["params_dtype"] = dtype
    try:
        model_cfg = model_config_from_hf(hf_config, **overrides)
    except Exception as exc:  # e.g. transformers' strict config classes (not ValueError) on a bad field
        raise hf_io.HFCheckpointError(f"{hf_dir / 'config.json'}: {type(exc).__name__}: {exc}") from None
    check_parallel(model_cfg, tp, pp)
    vocab = model_cfg.vocab_size
    model_cfg = model_cfg.model_copy(update={"vocab_size": padded_vocab_size(vocab, tp)})
    shards = hf_io.list_shards(hf_dir)

    prestart_checkpoint_writer()
    tmp = hf_io.temp_dir_beside(out_dir)
    try:
        with single_process_megatron():
            t_build = time.perf_counter()
            model = build_empty_model(model_cfg)
            log.info("built the empty Megatron model in %.2f s", time.perf_counter() - t_build)
            t_read = time.perf_counter()
            params = model.state_dict(keep_vars=True)
            filled: set[str] = set()
            mm = model_mapping(model_cfg)
            fused_source = lambda name: len(mm.find_hf(name)[0].hf) > 1  # noqa: E731  (q/k/v, gate/up)
            stream = hf_to_mcore_named_tensors(hf_io.iter_hf_tensors(shards, copy=fused_source), model_cfg,
                                               vocab_size=vocab)
            for name, tensor in stream:
                if name not in params:
                    raise MappingError(f"mapped tensor '{name}' is not a parameter of the Megatron model")
                param = params[name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise MappingError(
                        f"shape mismatch for Megatron tensor '{name}': mapped {tuple(tensor.shape)}, "
                        f"model expects {tuple(param.shape)}"
                    )
                if tensor.dtype == param.dtype and tensor.is_contiguous():
                    param.data = tensor  # adopt the freshly read buffer: no copy, the empty storage is never touched
                else:
                    param.data.copy_(tensor)  # e.g. bf16 HF norms into Megatron's fp32 norm weights
                filled.add(name)
            expected = {n for n in params if not n.endswith("._extra_state")}
            if expected - filled:
                raise MappingError(f"Hugging Face checkpoint lacks tensors for {sorted(expected - filled)[:6]}")
            log.info("read and mapped %d tensors in %.2f s", len(filled), time.perf_counter() - t_read)
            t_save = time.perf_counter()
            save_model(model, tmp / MODEL_SUBDIR)
            log.info("saved the torch_dist checkpoint in %.2f s", time.perf_counter() - t_save)
            del model, params
        (tmp / HF_SUBDIR).mkdir()
        side = hf_io.copy_side_files(hf_dir, tmp / HF_SUBDIR)
        meta = {
            "model": model_cfg.model_dump(mode="json"),
            "original_vocab_size": vocab,
            "padded_vocab_size": model_cfg.vocab_size,
            "tp": tp,
            "pp": pp,
            "source": {"hf_dir": str(hf_dir.absolute()), "shards": [s.name for s in shards]},
            "hf_config": hf_config,
            "side_files": side,
        }
        write_meta(tmp, meta)
        hf_io.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1f s", hf_dir, out_dir, time.perf_counter() - t0)
    return meta
