"""Policy checkpoints with Megatron-Core dist_checkpointing (torch_dist), reshardable across TP/PP.

Layout of ``<dir>``: the torch_dist files written by ``dist_checkpointing.save`` holding
``model`` (sharded tensors, global names such as ``decoder.layers.self_attention.linear_qkv.weight``
with a leading layer axis), ``optimizer`` (optional; exact with the plain optimizer -- the
DistributedOptimizer's state does not round-trip on CPU, see docs/megatron_on_cpu.md), and the common
(replicated) items ``scheduler``, ``num_steps``, ``format`` and, for a LoRA policy, ``lora`` (its settings and base
model; the adapters are model tensors ``...lora_A`` / ``...lora_B`` beside the base). A checkpoint saved at any TP/PP
loads at any other TP/PP: dist_checkpointing reassembles every shard from the global offsets.

The directory appears atomically: rank 0 creates ``<dir>.tmp-*``, all ranks write, then rank 0
renames it into place after a barrier.

``gather_full_state_dict`` builds full tensors (named as in a TP=PP=1 GPTModel) on rank 0 from the
same sharded state dict, which is what the HF converter (megatron_amir.convert) consumes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_amir.fileio import publish_mode

FORMAT = "megatron-amir/policy-v1"


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _model_sharded_state_dict(policy) -> dict:
    mods = policy.modules()
    if len(mods) != 1:
        raise NotImplementedError("virtual pipeline chunks are not supported")
    return mods[0].sharded_state_dict()


def save_checkpoint(policy, path: Path, *, save_optimizer: bool = True) -> None:
    """Collective: every rank calls. Writes ``path`` atomically (replacing nothing: it must not exist)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if save_optimizer and policy.cfg.parallel.use_distributed_optimizer and not torch.cuda.is_available():
        raise NotImplementedError(
            "saving DistributedOptimizer state is broken on CPU in megatron-core 0.19.2; "
            "use parallel.use_distributed_optimizer=false or save_optimizer=False"
        )
    # rank 0 decides (target free? temp dir) and tells everyone, so all ranks raise or proceed together
    tmp = None
    if _rank() == 0:
        if path.exists():
            tmp = f"error:checkpoint directory {path} already exists"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent)
            publish_mode(tmp, directory=True)
    tmp = broadcast_from_rank0(tmp)
    if tmp.startswith("error:"):
        raise FileExistsError(tmp[len("error:"):])
    model_sd = _model_sharded_state_dict(policy)
    state = {"model": model_sd, "format": FORMAT, "num_steps": policy.num_steps}
    lora = _lora_record(policy)
    if lora is not None:  # the adapters' settings and the base they sit on, for resume checks and export
        state["lora"] = lora
    if save_optimizer:
        state["optimizer"] = policy.optimizer.sharded_state_dict(model_sd)
        state["scheduler"] = policy.scheduler.state_dict()
    try:
        dist_checkpointing.save(state, tmp)
        _barrier()
        if _rank() == 0:
            os.replace(tmp, path)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()


def load_checkpoint(policy, path: Path, *, load_optimizer: bool = True) -> None:
    """Collective. Loads the model (any saved TP/PP) and, if asked and present, optimizer + scheduler."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    common = dist_checkpointing.load_common_state_dict(str(path))
    if common.get("format") != FORMAT:
        raise ValueError(f"{path}: not a megatron-amir policy checkpoint (format={common.get('format')!r})")
    has_opt = "scheduler" in common
    load_optimizer = load_optimizer and has_opt
    model_sd = _model_sharded_state_dict(policy)
    # a checkpoint without LoRA adapters (a warm-up or full fine-tuning checkpoint) into a LoRA policy: load the base,
    # keep the fresh adapters; that checkpoint's optimizer state belongs to other parameters
    fresh_adapters = _adapter_keys(model_sd)
    if not fresh_adapters and common.get("lora"):
        # loading only the base would silently drop what the run trained
        raise ValueError(f"{path}: holds LoRA adapters (rank {common['lora'].get('rank')}) but this policy has none: "
                         "set lora.enabled=true with the checkpoint's settings, or start from merged weights "
                         "(megatron-amir convert mcore-to-hf --lora merge)")
    if fresh_adapters and _saved_adapters(path):
        _check_same_lora(_lora_record(policy), common.get("lora"), path)
        fresh_adapters = []
    if fresh_adapters:
        model_sd = {k: v for k, v in model_sd.items() if k not in fresh_adapters}
        load_optimizer = False
    state = {"model": model_sd}
    if load_optimizer:
        state["optimizer"] = policy.optimizer.sharded_state_dict(model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    result = policy.modules()[0].load_state_dict(loaded["model"], strict=not fresh_adapters)
    if fresh_adapters and (result.unexpected_keys or set(result.missing_keys) - set(fresh_adapters)):
        raise RuntimeError(f"{path}: state dict mismatch beyond the LoRA adapters: {result}")
    if load_optimizer:
        policy.optimizer.load_state_dict(loaded["optimizer"])
        policy.scheduler.load_state_dict(common["scheduler"])
        policy.num_steps = int(common.get("num_steps", 0))
    elif getattr(policy, "optimizer", None) is not None:
        policy.optimizer.reload_model_params()  # fp32 main params of bf16/fp16 models <- loaded weights
    _barrier()


def _lora_record(policy) -> Optional[dict]:
    cfg = getattr(policy, "cfg", None)
    if cfg is None or not getattr(policy, "lora_modules", None):
        return None
    return {**cfg.lora.model_dump(mode="json"), "base": {"hf_path": cfg.model.hf_path, "load": cfg.model.load}}


def saved_lora(path: Path) -> Optional[dict]:
    """The LoRA settings (rank, alpha, dropout, target_modules, base) a policy checkpoint was saved with, or None."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path)).get("lora")


def _check_same_lora(mine: Optional[dict], saved: Optional[dict], path: Path) -> None:
    """Adapters trained with another rank, scaling or set of modules do not fit (or silently change the model)."""
    if mine is None or saved is None:
        return
    diff = [f"lora.{k}: config {mine[k]!r}, checkpoint {saved.get(k)!r}" for k in ("rank", "alpha", "target_modules")
            if mine[k] != saved.get(k)]
    if diff:
        raise ValueError(f"{path}: the LoRA adapters were saved with other settings: " + "; ".join(diff))


def _adapter_keys(model_sd: dict) -> list[str]:
    from megatron_amir.model.lora import ADAPTER_SUFFIXES

    return [k for k in model_sd if k.endswith(ADAPTER_SUFFIXES)]


def _saved_adapters(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds LoRA adapter tensors."""
    from megatron.core import dist_checkpointing

    from megatron_amir.model.lora import ADAPTER_SUFFIXES

    return any(k.endswith(ADAPTER_SUFFIXES) for k in dist_checkpointing.load_tensors_metadata(str(path)))


def _flatten(sd, out: list):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    items = sd.values() if isinstance(sd, dict) else sd if isinstance(sd, (list, tuple)) else [sd]
    for v in items:
        if isinstance(v, ShardedTensorFactory):
            _flatten(v.build(), out)
        elif isinstance(v, ShardedTensor):
            out.append(v)
        elif isinstance(v, (dict, list, tuple)):
            _flatten(v, out)


def gather_full_state_dict(modules) -> Optional[dict[str, torch.Tensor]]:
    """Full tensors on rank 0 named like a TP=PP=1 GPTModel.state_dict() (e.g. decoder.layers.0....).

    Collective over the world. Each rank contributes its main-replica shards (global offsets from the
    sharded state dict); rank 0 places them. Layer-stacked keys are split back into per-layer names.
    """
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    shards = []
    for mod in modules:
        flat: list = []
        _flatten(mod.sharded_state_dict(), flat)
        for st in flat:
            if not is_main_replica(st.replica_id) or st.key.endswith("_extra_state"):
                continue
            if st.flattened_range is not None:
                raise NotImplementedError(f"flattened shard {st.key} not supported")
            shards.append((st.key, tuple(st.global_shape), tuple(st.global_offset), st.prepend_axis_num,
                           st.data.detach().cpu().clone()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        gathered = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(shards, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        shards = [s for part in gathered for s in part]
    full: dict[str, torch.Tensor] = {}
    prepend: dict[str, int] = {}
    for key, gshape, goff, pre, data in shards:
        if key not in full:
            full[key] = torch.empty(gshape, dtype=data.dtype)
            prepend[key] = pre
        idx = tuple(goff[:pre]) + tuple(slice(o, o + n) for o, n in zip(goff[pre:], data.shape))
        full[key][idx] = data
    # the sharded keys of the local spec use TE-style norm names (sharded_state_dict_keys_map of the
    # layer spec, e.g. input_layernorm. -> self_attention.linear_qkv.layer_norm_); map them back so the
    # names are exactly those of the module's own state_dict()
    keys_map = {}
    for mod in modules:
        layers = getattr(getattr(mod, "decoder", None), "layers", None)
        if layers is not None and len(layers):
            keys_map = dict(getattr(layers[0].submodules_config, "sharded_state_dict_keys_map", {}) or {})
            break
    out: dict[str, torch.Tensor] = {}
    for skey, t in full.items():
        key = skey
        for src, dst in keys_map.items():
            if key.startswith("decoder.layers.") and key[len("decoder.layers."):].startswith(dst):
                key = "decoder.layers." + src + key[len("decoder.layers.") + len(dst):]
                break
        if prepend[skey] == 1 and key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i].clone()
        elif prepend[skey] == 0:
            out[key] = t
        else:
            raise NotImplementedError(f"unexpected sharded key layout {skey} (prepend_axis_num={prepend[skey]})")
    return out
