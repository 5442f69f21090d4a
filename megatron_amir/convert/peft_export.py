"""LoRA policy checkpoint -> Hugging Face PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained`` onto the base model that
``mcore-to-hf --lora base`` exports from the same checkpoint.

Megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``; one adapter (A, B) on a fused layer is
exactly one adapter per HF projection with the SAME A and the rows of B that the weight mapping gives that
projection: ΔW = s·B A, and splitting the rows of ΔW is splitting the rows of B. So B goes through the weight's own
mapping (``mcore_to_hf_named_tensors``) and A is copied to each part; rank r and alpha stay as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from megatron_amir.config import LoRAConfig, ModelConfig

from megatron_amir.convert import hf_io
from megatron_amir.convert.mapping import mcore_to_hf_named_tensors
from megatron_amir.convert.megatron_side import (MODEL_SUBDIR, build_empty_model, check_shard_files, load_model,
                                                 read_meta, root_cause, single_process_megatron)

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the HF model: its names gain this prefix


def peft_adapter_tensors(state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron adapters (``<module>.lora_A`` [r, in], ``<module>.lora_B`` [out, r], full tensors) -> PEFT names
    ``base_model.model.<hf module>.lora_A.weight`` / ``.lora_B.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, lora_A in state_dict.items():
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len(".lora_A")]
        parts = mcore_to_hf_named_tensors({prefix + ".weight": state_dict[prefix + ".lora_B"]}, model_cfg, strict=False)
        for hf_name, lora_B in parts:
            stem = PEFT_PREFIX + hf_name[: -len(".weight")]
            out[stem + ".lora_A.weight"] = lora_A.detach().clone().contiguous()  # one copy per projection
            out[stem + ".lora_B.weight"] = lora_B.detach().clone().contiguous()
    return out


def peft_adapter_config(lora: LoRAConfig, tensor_names, base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json for peft's LoraConfig; target_modules are the HF projection names present."""
    targets = sorted({n.split(".")[-3] for n in tensor_names})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


def _lora_config(lora: dict) -> LoRAConfig:
    """The LoRAConfig of the settings a checkpoint records (which also hold the base's identity)."""
    return LoRAConfig(**{k: v for k, v in lora.items() if k in LoRAConfig.model_fields})


def _saved_lora(ckpt_dir: Path) -> Optional[dict]:
    """The LoRA settings of checkpoint ``ckpt_dir`` (None without adapters). A missing or torn ``model/`` fails
    here, naming the file and keeping the root cause, before anything reads its data."""
    from megatron_amir.training.model_checkpoint import saved_lora

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} not found")
    check_shard_files(model_dir)
    try:
        return saved_lora(model_dir)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"{model_dir}: cannot load the Megatron checkpoint: {root_cause(exc)}") from exc


def load_lora_model(ckpt_dir: Path, model_cfg: ModelConfig, lora: dict):
    """The checkpoint's TP=PP=1 model with its adapters (call inside ``single_process_megatron``)."""
    from megatron_amir.model.lora import apply_lora

    model = build_empty_model(model_cfg)
    apply_lora(model, _lora_config(lora))
    load_model(model, Path(ckpt_dir) / MODEL_SUBDIR)
    return model


def load_export_model(ckpt_dir: Path, model_cfg: ModelConfig, lora: str = "merge"):
    """The checkpoint's TP=PP=1 model for export and the LoRA scaling to merge with (call inside
    ``single_process_megatron``): ``lora="merge"`` gives W + s·B A on export, ``lora="base"`` (scaling None) the
    frozen base; the exporter (``training.weight_stream``) leaves the adapter tensors out either way."""
    from megatron_amir.model.lora import lora_scaling

    if lora not in ("merge", "base"):
        raise ValueError(f"lora={lora!r}: choose merge or base")
    adapters = _saved_lora(ckpt_dir)
    if adapters is None:
        model = build_empty_model(model_cfg)
        load_model(model, Path(ckpt_dir) / MODEL_SUBDIR)
        return model, None
    model = load_lora_model(ckpt_dir, model_cfg, adapters)
    return model, (lora_scaling(adapters["rank"], adapters["alpha"]) if lora == "merge" else None)


def load_export_state_dict(ckpt_dir: Path, model_cfg: ModelConfig, lora: str = "merge") -> dict[str, torch.Tensor]:
    """The TP=PP=1 Megatron state dict of checkpoint ``ckpt_dir`` for export (call inside
    ``single_process_megatron``), adapters merged (``lora="merge"``) or left out (``"base"``)."""
    from megatron_amir.model.lora import ADAPTER_SUFFIXES, merge_lora_state_dict

    model, scaling = load_export_model(ckpt_dir, model_cfg, lora)
    state = model.state_dict()
    if scaling is not None:
        return merge_lora_state_dict(state, scaling)
    return {k: v for k, v in state.items() if not k.endswith(ADAPTER_SUFFIXES)}


def mcore_to_peft(ckpt_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapters of LoRA checkpoint ``ckpt_dir`` (trainer step dir or model dir with metadata) to
    ``out_dir`` in the PEFT format; returns the safetensors file."""
    from safetensors.torch import save_file

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    hf_io.check_empty_target(out_dir)
    meta = read_meta(ckpt_dir)
    model_cfg = ModelConfig(**meta["model"])
    lora = _saved_lora(ckpt_dir)
    if lora is None:
        raise ValueError(f"{ckpt_dir / MODEL_SUBDIR} holds no LoRA adapters (saved without lora.enabled)")
    lcfg = _lora_config(lora)
    with single_process_megatron():
        model = load_lora_model(ckpt_dir, model_cfg, lora)
        tensors = peft_adapter_tensors(model.state_dict(), model_cfg)
    base = base_model_name_or_path or (lora.get("base") or {}).get("hf_path")
    tmp = hf_io.temp_dir_beside(out_dir)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_adapter_config(lcfg, tensors, base), indent=2))
        hf_io.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d LoRA tensors of %s -> %s", len(tensors), ckpt_dir, out_dir)
    return out_dir / "adapter_model.safetensors"
