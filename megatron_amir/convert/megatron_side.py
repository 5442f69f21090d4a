"""The Megatron side of a conversion: a one-process Megatron-Core context, an uninitialized TP=PP=1 model,
and the converted-checkpoint layout.

The converters take the Megatron side from the trainer's own code: ``build_gpt_model`` builds the model
(``mcore-to-hf`` loads into it with ``training.model_checkpoint.load_checkpoint``; ``hf-to-mcore`` takes the
checkpoint layout -- keys, layer stacking, swiglu / QKV sharding -- from a meta-device one, exactly what
``save_checkpoint`` would write), so the files are what the trainer loads; dist_checkpointing reshards the
TP=PP=1 files to any TP/PP on load. Layout of a converted directory::

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
import torch.distributed as dist

from megatron_amir.config import ModelConfig, ParallelConfig
from megatron_amir.model.builder import build_gpt_model, transformer_config
from megatron_amir.model.compat import apply_cpu_compat
from megatron_amir.training.model_checkpoint import FORMAT, load_checkpoint, save_checkpoint

META_NAME = "megatron_amir_model.json"
META_FORMAT = "megatron-amir/converted-model-v1"
MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234) -> Iterator[None]:
    """World of one process (gloo) with TP = PP = 1 model-parallel state; torn down on exit.

    Refuses to run inside an existing multi-process world: conversion is an offline, one-process job.
    """
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


def build_empty_model(model_cfg: ModelConfig, *, meta: bool = False):
    """TP=PP=1 GPTModel on CPU with the local spec and *uninitialized* parameters (torch.empty pages are not
    touched until the converter writes them, so memory grows with the weights actually filled in).
    meta: parameters on the meta device (no storage at all; for the checkpoint layout only)."""
    cfg = model_cfg.model_copy(update={"transformer_impl": "local", "fp8": None, "fp8_param": False})
    par = ParallelConfig()
    tcfg = transformer_config(cfg, par, impl="local")
    tcfg = dataclasses.replace(tcfg, use_cpu_initialization=True, perform_initialization=False,
                               init_model_with_meta_device=meta)
    model = build_gpt_model(cfg, par, config=tcfg)
    model.requires_grad_(False)
    return model


@dataclasses.dataclass
class CheckpointLayout:
    """What the trainer's ``save_checkpoint(save_optimizer=False)`` writes for a TP=PP=1 model.

    tensors: (parameter name, ShardedTensor) -- every chunk, factories (swiglu ``linear_fc1``) already split;
             ``ShardedTensor.data`` is a meta-device view of the parameter (its offset and size inside it).
    objects: every ShardedObject, the ``common_state`` one (format tag, num_steps) included.
    params: the meta-device parameters by name (shape, dtype).
    """

    tensors: list[tuple[str, Any]]
    objects: list[Any]
    params: dict[str, torch.Tensor]


def checkpoint_layout(model_cfg: ModelConfig) -> CheckpointLayout:
    """The layout, from Megatron itself: a meta-device model's sharded state dict, preprocessed the way
    ``dist_checkpointing.save`` does (factories applied, common part split off). Costs no parameter memory;
    call inside ``single_process_megatron``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    model = build_empty_model(model_cfg, meta=True)
    state = {"model": model.sharded_state_dict(), "format": FORMAT, "num_steps": 0}  # as save_checkpoint builds it
    sharded, common = save_preprocess(state, validate_access_integrity=False)
    tensors, objects = [], []
    for name, value in sharded.get("model", {}).items():
        for item in nested_values(value) if isinstance(value, (dict, list)) else [value]:
            if isinstance(item, ShardedTensor):
                tensors.append((name, item))
            elif isinstance(item, ShardedObject):
                objects.append(item)
            else:
                raise TypeError(f"unexpected {type(item).__name__} in the sharded state dict under '{name}'")
    if set(sharded) - {"model"}:
        raise TypeError(f"unexpected sharded entries {sorted(set(sharded) - {'model'})}")
    # dist_checkpointing.save stores the common (non-sharded) part as one more object
    objects.append(ShardedObject(key="common_state", data=common, global_shape=(1,), global_offset=(0,),
                                 replica_id=0))
    return CheckpointLayout(tensors, objects, dict(model.state_dict(keep_vars=True)))


def _holder(model) -> Any:
    # save_checkpoint / load_checkpoint take the trainer's Policy; a model-only checkpoint needs just these.
    return SimpleNamespace(modules=lambda: [model], num_steps=0, optimizer=None, scheduler=None)


def save_model(model, path: Path) -> None:
    save_checkpoint(_holder(model), Path(path), save_optimizer=False)


def load_model(model, path: Path) -> None:
    """Load a model-only checkpoint directory into ``model``. A torn shard file fails naming the file; any other
    load failure keeps its root cause, in the message (every rank's error, in full) and chained."""
    path = Path(path)
    check_shard_files(path)
    try:
        load_checkpoint(_holder(model), path, load_optimizer=False)
    except BaseException as exc:  # torch's CheckpointException (torn or corrupt data) is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"{path}: cannot load the Megatron checkpoint: {root_cause(exc)}") from exc


def check_shard_files(model_dir: Path) -> None:
    """Every data file that ``model_dir/.metadata`` names exists and holds the bytes placed in it.

    torch's reader finds a short file only when it unpickles a chunk of it, and then reports ``EOFError: Ran out
    of input`` without the file's name."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_file = Path(model_dir) / ".metadata"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: not a torch_dist checkpoint directory")
    try:
        metadata = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as exc:
        raise ValueError(f"{meta_file}: cannot read the checkpoint metadata: {type(exc).__name__}: {exc}") from exc
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        data = Path(model_dir) / name
        if not data.is_file():
            raise FileNotFoundError(f"{data} not found (listed in {meta_file})")
        size = data.stat().st_size
        if size < end:
            raise ValueError(f"{data} is truncated: {size} bytes, but {meta_file} places data up to byte {end}")


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of what went wrong; for torch's CheckpointException, the error each rank raised."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        causes = []
        for rank, failure in sorted(failures.items()):
            err = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback frames)
            causes.append(f"rank {rank}: {type(err).__name__}: {err}")
        return "; ".join(causes)
    return f"{type(exc).__name__}: {exc}"


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
        # the tokenizer's vocabulary (padding rows beyond it are dropped on export): recorded by the trainer
        vocab = data.get("original_vocab_size") or model.get("real_vocab_size") or model["vocab_size"]
        return {"model": model, "original_vocab_size": int(vocab), "hf_config": data.get("hf_config"),
                "source": {"trainer_checkpoint": str(ckpt_dir)}}
    raise FileNotFoundError(f"{ckpt_dir} holds neither {META_NAME} (converted model) nor meta.json (trainer step)")


def dtype_of(model_cfg: ModelConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model_cfg.params_dtype]
