"""Hugging Face directory -> Megatron-Core torch_dist checkpoint (+ metadata), file to file.

The HF shards are indexed (headers only: ``hf_io.open_tensor_refs``) and grouped per Megatron parameter by the
one mapping (``mapping.group_hf_tensors``; names, layers, duplicates, missing pieces and shapes are all checked
before anything is written). What to write -- keys, chunks, dtypes, objects -- comes from Megatron itself: the
sharded state dict of a meta-device TP=PP=1 model, preprocessed as ``dist_checkpointing.save`` does
(``megatron_side.checkpoint_layout``). ``torch_dist.TorchDistWriter`` then writes each chunk: when the HF dtype
is the parameter's, its bytes are the HF rows the mapping names (``ParamMapping.mcore_rows``: q/k/v
interleaved per query group, [gate; up], zero rows for vocabulary padding) copied file to file in the kernel;
otherwise (a dtype cast, e.g. bf16 HF norms into Megatron's fp32 norms) the parameter is read and built with
``ParamMapping.to_mcore``. No model copy is held: memory stays at about one parameter in flight. Output
appears atomically: everything is written to a temp directory beside ``out_dir`` and renamed at the end
(flushed to disk first with ``fsync=True``); on any error the temp directory is removed.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_amir.convert import hf_io
from megatron_amir.convert.hf_config import model_config_from_hf
from megatron_amir.convert.mapping import (
    MappingError,
    ParamMapping,
    check_hf_shapes,
    group_hf_tensors,
    padded_vocab_size,
)
from megatron_amir.convert.megatron_side import (
    HF_SUBDIR,
    MODEL_SUBDIR,
    CheckpointLayout,
    checkpoint_layout,
    single_process_megatron,
    write_meta,
)
from megatron_amir.convert.torch_dist import Piece, TorchDistWriter

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


def _param_pieces(mp: ParamMapping, parts: list[hf_io.TensorRef], model_cfg, vocab: int,
                  dtype: torch.dtype, shape: tuple[int, ...]) -> list[Piece]:
    """The full Megatron parameter's bytes as pieces: HF file ranges where no cast is needed, else one buffer."""
    if all(ref.dtype == dtype for ref in parts):
        pieces: list[Piece] = []
        row_bytes = [ref.nbytes // ref.shape[0] if ref.shape and ref.shape[0] else 0 for ref in parts]
        zero_row = (math.prod(shape[1:]) if len(shape) > 1 else 1) * dtype.itemsize
        for i, first, n in mp.mcore_rows(model_cfg, vocab):
            if i is None:
                pieces.append(bytes(n * zero_row))
            else:
                pieces.append((parts[i].fd, parts[i].offset + first * row_bytes[i], n * row_bytes[i]))
        return pieces
    full = mp.to_mcore([hf_io.read_tensor(ref) for ref in parts], model_cfg, vocab).to(dtype).contiguous()
    return [full.reshape(-1).view(torch.uint8).numpy().data]


def _write_model(path: Path, layout: CheckpointLayout, groups: dict, model_cfg, vocab: int, *,
                 fsync: bool) -> None:
    """Every chunk of ``layout`` from the HF groups (Megatron name -> (mapping, [TensorRef])), then the objects."""
    writer = TorchDistWriter(path, sync=fsync)
    by_param: dict[str, list] = {}
    for name, sh in layout.tensors:
        by_param.setdefault(name, []).append(sh)
    for name, chunks in by_param.items():
        if name not in groups:
            raise MappingError(f"Hugging Face checkpoint lacks tensors for Megatron parameter '{name}'")
        mp, parts = groups.pop(name)
        param = layout.params[name]  # meta device: shape and dtype only
        rows = sum(n for _, _, n in mp.mcore_rows(model_cfg, vocab))
        if (rows, *parts[0].shape[1:]) != tuple(param.shape):
            raise MappingError(f"shape mismatch for Megatron tensor '{name}': mapped {(rows, *parts[0].shape[1:])}, "
                               f"model expects {tuple(param.shape)}")
        for sh in chunks:  # each chunk a contiguous piece of the parameter itself (or all of it)
            if (sh.flattened_range is not None or not sh.data.is_contiguous() or sh.dtype != param.dtype
                    or not (sh.data is param or sh.data._base is param)):
                raise MappingError(f"'{name}': unsupported chunk layout in Megatron's sharded state dict")
        for key in dict.fromkeys(sh.key for sh in chunks):
            mine = [sh for sh in chunks if sh.key == key]
            writer.add_tensor(
                key, mine[0].global_shape, param.dtype,
                [(sh.global_offset, (1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                  (sh.data.storage_offset() - param.storage_offset()) * param.dtype.itemsize) for sh in mine],
                functools.partial(_param_pieces, mp, parts, model_cfg, vocab, param.dtype, tuple(param.shape)),
            )
    if groups:
        raise MappingError(f"mapped tensor '{sorted(groups)[0]}' is not a parameter of the Megatron model")
    for obj in layout.objects:
        writer.add_object(obj.unique_key, obj.data)
    writer.close()


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[str] = None,
    fsync: bool = False,
) -> dict:
    """Convert ``hf_dir`` to a Megatron checkpoint in ``out_dir`` (must not exist or be empty).

    tp / pp: the layout the checkpoint is meant for; the files are reshardable, tp sets the vocabulary padding
    (multiple of 128 * tp) and both are validated against the architecture.
    dtype: fp32 | bf16 | fp16 for the Megatron parameters (default: the HF config's dtype).
    fsync: flush the checkpoint to disk before it is renamed into place (durable across an OS crash or power
    loss, as Megatron's own writer is; costs about as much again as writing it). Off by default, like
    ``save_pretrained`` / safetensors: a crashed *process* never leaves a partial ``out_dir`` either way (temp
    dir + rename), and the source is untouched, so a conversion lost to a power cut is simply run again.
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

    tmp = hf_io.temp_dir_beside(out_dir)
    try:
        with hf_io.open_tensor_refs(shards) as refs:
            groups = {}
            for mp, layer, parts in group_hf_tensors(refs, model_cfg):
                check_hf_shapes(mp, parts, model_cfg, vocab, layer)
                groups[mp.mcore_param(layer)] = (mp, parts)
            t_layout = time.perf_counter()
            with single_process_megatron():
                layout = checkpoint_layout(model_cfg)
            log.info("checkpoint layout from a meta-device model in %.2f s", time.perf_counter() - t_layout)
            t_save = time.perf_counter()
            _write_model(tmp / MODEL_SUBDIR, layout, groups, model_cfg, vocab, fsync=fsync)
            log.info("wrote the torch_dist checkpoint in %.2f s", time.perf_counter() - t_save)
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
        if fsync:
            hf_io.fsync_tree(tmp)  # the model files are flushed already; this adds the metadata and side files
        hf_io.publish_dir(tmp, out_dir)
        if fsync:
            hf_io.fsync_path(out_dir.absolute().parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1f s", hf_dir, out_dir, time.perf_counter() - t0)
    return meta
