"""The Megatron side of a conversion: a one-process Megatron-Core context, an uninitialized TP=PP=1 model,
and the converted-checkpoint layout.

The converter writes the Megatron checkpoint through the trainer's own code (``build_gpt_model`` and
``training.model_checkpoint.save_checkpoint`` / ``load_checkpoint``), so the keys, the layer stacking and the
swiglu / QKV sharding rules are exactly what the trainer loads; dist_checkpointing reshards the TP=PP=1 files to
any TP/PP on load. Layout of a converted directory::

    <dir>/model/                      torch_dist checkpoint (format megatron-amir/policy-v1, no optimizer)
    <dir>/megatron_amir_model.json    ModelConfig (vocab_size = padded), original vocab size, source, HF config
    <dir>/hf/                         tokenizer / generation files copied from the source (for the way back)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from megatron_amir.config import ModelConfig, ParallelConfig

META_NAME = "megatron_amir_model.json"
META_FORMAT = "megatron-amir/converted-model-v1"
MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234) -> Iterator[None]:
    """World of one process (gloo) with TP = PP = 1 model-parallel state; torn down on exit.

    Refuses to run inside an existing multi-process world: conversion is an offline, one-process job.
    """
    import torch.distributed as dist

    from megatron_amir.model.compat import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    own_pg = not dist.is_initialized()
    store_dir = None
    if own_pg:
        store_dir = tempfile.mkdtemp(prefix="mamir-convert-")
        store = dist.FileStore(os.path.join(store_dir, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; torch.distributed has world_size > 1")
    own_ps = not ps.model_parallel_is_initialized()
    try:
        if own_ps:
            ps.initialize_model_parallel(1, 1)
        tensor_parallel.get_cuda_rng_tracker().reset()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        if own_ps:
            ps.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()
            with contextlib.suppress(OSError):
                os.remove(os.path.join(store_dir, "store"))
                os.rmdir(store_dir)


def build_empty_model(model_cfg: ModelConfig):
    """TP=PP=1 GPTModel on CPU with the local spec and *uninitialized* parameters (torch.empty pages are not
    touched until the converter writes them, so memory grows with the weights actually filled in)."""
    from megatron_amir.model.builder import build_gpt_model, transformer_config

    cfg = model_cfg.model_copy(update={"transformer_impl": "local", "fp8": None, "fp8_param": False})
    par = ParallelConfig()
    tcfg = transformer_config(cfg, par, impl="local")
    tcfg = dataclasses.replace(tcfg, use_cpu_initialization=True, perform_initialization=False)
    model = build_gpt_model(cfg, par, config=tcfg)
    model.requires_grad_(False)
    return model


def prestart_checkpoint_writer() -> None:
    """Create Megatron's checkpoint-writer result queue now, with ``fork`` instead of its default ``spawn``.

    dist_checkpointing's writer reports results through a ``multiprocessing`` Manager queue, created on the
    first save and cached process-wide (``filesystem_async.get_write_results_queue``). With ``spawn`` the
    Manager is a fresh interpreter that must also import torch to unpickle the first result: several seconds
    on a busy CPU, inside the save. A forked Manager inherits the already imported torch and starts in
    milliseconds. Call this before any process group or model exists (no gloo threads, no CUDA context yet), so
    the fork copies a quiet process; the Manager child only serves the queue. No-op if the queue exists.
    """
    from megatron_amir.model.compat import apply_cpu_compat

    apply_cpu_compat()  # importing megatron.core needs the Triton stand-in where triton is absent
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue(mp_mode="fork")


def _holder(model) -> Any:
    # save_checkpoint / load_checkpoint take the trainer's Policy; a model-only checkpoint needs just these.
    return SimpleNamespace(modules=lambda: [model], num_steps=0, optimizer=None, scheduler=None)


def save_model(model, path: Path) -> None:
    from megatron_amir.training.model_checkpoint import save_checkpoint

    save_checkpoint(_holder(model), Path(path), save_optimizer=False)


def load_model(model, path: Path) -> None:
    from megatron_amir.training.model_checkpoint import load_checkpoint

    load_checkpoint(_holder(model), Path(path), load_optimizer=False)


def write_meta(out_dir: Path, meta: dict) -> None:
    path = Path(out_dir) / META_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": META_FORMAT, **meta}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # the message must name the file, not only "line 1 column 2"
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_meta(ckpt_dir: Path) -> dict:
    """Metadata of a converted directory, or of a trainer checkpoint (step dir with meta.json + model/)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_NAME
    if path.is_file():
        meta = _read_json(path)
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{path}: unknown format {meta.get('format')!r} (expected {META_FORMAT})")
        return meta
    trainer_meta = ckpt_dir / "meta.json"
    if trainer_meta.is_file():
        data = _read_json(trainer_meta)
        model = (data.get("config") or {}).get("model")
        if model is None:
            raise ValueError(f"{trainer_meta} has no config.model section; cannot tell the architecture")
        return {"model": model, "original_vocab_size": data.get("original_vocab_size", model["vocab_size"]),
                "hf_config": data.get("hf_config"), "source": {"trainer_checkpoint": str(ckpt_dir)}}
    raise FileNotFoundError(f"{ckpt_dir} holds neither {META_NAME} (converted model) nor meta.json (trainer step)")


def dtype_of(model_cfg: ModelConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model_cfg.params_dtype]
