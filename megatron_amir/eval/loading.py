"""What ``megatron-amir eval`` builds from its arguments: engine, tokenizer, problems, reward, sampling.

Every call into another package sits behind one small function here, so an API change there is a
one-function change:

- model: a Hugging Face directory (config.json + *.safetensors) loads straight into the rollout
  package's ``EmbeddedEngine``; a megatron-amir trainer checkpoint (a checkpoint root with
  ``latest``, or one ``step_XXXXXXXX`` directory with ``meta.json`` and ``model/``) is loaded into an
  empty single-process Megatron-Core model (TP = PP = 1; dist_checkpointing reshards) and converted to
  HF-named tensors with megatron_amir.convert (``megatron_checkpoint_to_hf``); for vLLM it is exported to
  an HF directory with ``megatron_amir.convert.mcore_to_hf``.
- tokenizer / problems / templates / reward: megatron_amir.data (tokenizer, benchmarks, templates,
  synthetic) and megatron_amir.rewards (get_reward_fn).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_amir.rollout.engine import close_engine

log = logging.getLogger(__name__)


class EvalSetupError(ValueError):
    """Bad eval arguments; the message names the path or option."""


@dataclass
class EvalSetup:
    engine: Any
    tokenizer: Any
    problems: list[Any]
    reward_fn: Any
    sampling_params: Any
    format_prompt: Optional[Callable[[str], str]] = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- model
def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_trainer_checkpoint(path: Path) -> Optional[Path]:
    """The step directory a trainer checkpoint path points at, or None if it is not one.

    ``path`` may be one step directory (meta.json + model/), a checkpoint root (``latest`` and
    ``step_*`` directories: the newest one whose manifest verifies, as the trainer's resume picks),
    or a run directory holding ``checkpoints/``."""
    if (path / "meta.json").is_file() and (path / "model").is_dir():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file() or any(root.glob("step_*")):
            from megatron_amir.training.checkpoint import CheckpointManager

            step = CheckpointManager(root).latest_good()
            if step is None:
                raise EvalSetupError(f"{root} holds no complete checkpoint (every step_* failed its manifest check)")
            return step
    return None


def config_from_checkpoint(step_dir: Path, overrides: Optional[list[str]] = None):
    """The resolved config the trainer stored in ``meta.json`` (plus ``a.b=c`` overrides)."""
    from megatron_amir.config import ConfigError, apply_overrides, config_from_dict

    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalSetupError(f"cannot read {step_dir / 'meta.json'}: {exc}") from None
    if "config" not in meta:
        raise EvalSetupError(f"{step_dir / 'meta.json'} holds no 'config'; pass --config")
    try:
        return config_from_dict(apply_overrides(meta["config"], overrides), str(step_dir / "meta.json"))
    except ConfigError as exc:
        raise EvalSetupError(str(exc)) from None


def megatron_checkpoint_to_hf(step_dir: Path, cfg=None) -> tuple[dict, dict]:
    """(HF config dict, HF-named tensors) of a trainer checkpoint step directory (or a converted
    megatron-amir model directory), on one process, through megatron_amir.convert.

    The model is built empty at TP = PP = 1 (dist_checkpointing reshards whatever layout it was saved
    in), loaded from ``step_dir/model``, and mapped to HF names with padding rows of the vocabulary
    stripped. ``cfg`` is unused (the checkpoint's own metadata names the architecture); kept so callers
    can pass the eval config."""
    from megatron_amir.config import ModelConfig
    from megatron_amir.convert.hf_config import hf_config_from_model_config
    from megatron_amir.convert.mapping import mcore_to_hf_named_tensors
    from megatron_amir.convert.megatron_side import read_meta, single_process_megatron
    from megatron_amir.convert.peft_export import load_export_state_dict

    del cfg
    meta = read_meta(step_dir)
    model_cfg = ModelConfig(**meta["model"])
    vocab = int(meta.get("original_vocab_size") or model_cfg.real_vocab_size or model_cfg.vocab_size)
    with single_process_megatron():
        state = load_export_state_dict(Path(step_dir), model_cfg)  # LoRA adapters merged
        tensors = {name: t.detach().clone() for name, t in
                   mcore_to_hf_named_tensors(state, model_cfg, vocab_size=vocab)}
        del state
    return hf_config_from_model_config(model_cfg, vocab_size=vocab, base=meta.get("hf_config")), tensors


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """("cuda" | "cpu" | an explicit device, "fp32" | "bf16" | "fp16"); auto = CUDA with bf16 when present."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in _DTYPES:
        raise EvalSetupError(f"--dtype {dtype!r}: choose from auto, {', '.join(_DTYPES)}")
    return device, dtype


def load_engine(model: str, cfg, *, logprobs_mode: str, seed: int = 0, step_dir: Optional[Path] = None,
                engine: str = "embedded", device: str = "auto", dtype: str = "auto",
                remote: Optional[dict[str, Any]] = None):
    """A rollout engine holding the model's weights, and a description for the summary.

    engine: ``embedded`` (megatron_amir.rollout.EmbeddedEngine on ``device``), ``vllm`` (a colocated
    vLLM engine on the GPU, configured by the rollout section: tensor parallel size, memory
    utilization, FP8 rollouts) or ``remote`` (a running fleet of rollout servers: the model's weights are
    pushed to every server as a weight-sync snapshot, then the fleet samples; ``remote`` = servers /
    discovery_file / weights_dir, each defaulting to the rollout section)."""
    import torch

    path = Path(model)
    if not path.exists():
        raise EvalSetupError(f"--model {path} does not exist")
    hf_dir = is_hf_dir(path)
    step_dir = None if hf_dir else (step_dir or find_trainer_checkpoint(path))
    if not hf_dir and step_dir is None:
        raise EvalSetupError(f"--model {path} is neither a Hugging Face directory (config.json + *.safetensors) "
                             f"nor a megatron-amir checkpoint (a directory with 'latest', or with meta.json and model/)")
    meta: dict[str, Any] = {"model_kind": "hf" if hf_dir else "megatron", "engine": engine}
    if step_dir is not None:
        meta["checkpoint"] = str(step_dir)
    if engine == "vllm":
        from megatron_amir.rollout.vllm_engine import VLLMEngine

        import tempfile

        rc = cfg.rollout.model_copy(update={"logprobs_mode": logprobs_mode})
        model_dir = path
        if not hf_dir:  # vLLM reads an HF directory: export the checkpoint to one first
            from megatron_amir.convert.mcore_to_hf import mcore_to_hf

            model_dir = Path(tempfile.mkdtemp(prefix="mamir-eval-hf-")) / "model"
            mcore_to_hf(step_dir, model_dir)
            meta["exported_hf_dir"] = str(model_dir)
        if rc.fp8_rollout:  # FP8 serving reads an FP8 block checkpoint (rollout.fp8)
            from megatron_amir.rollout.vllm_engine import fp8_checkpoint_dir

            fp8_dir = fp8_checkpoint_dir(model_dir, Path(tempfile.mkdtemp(prefix="mamir-eval-fp8-")) / "model")
            if fp8_dir != model_dir:
                meta["fp8_hf_dir"] = str(fp8_dir)
            model_dir = fp8_dir
        eng = VLLMEngine(model_dir, logprobs_mode=logprobs_mode, tensor_parallel_size=rc.vllm_tensor_parallel_size,
                         gpu_memory_utilization=rc.vllm_gpu_memory_utilization, fp8=rc.fp8_rollout, seed=seed)
        return eng, meta
    from megatron_amir.rollout.embedded import EmbeddedEngine, read_hf_dir

    if engine not in ("embedded", "remote"):
        raise EvalSetupError(f"--engine {engine!r}: choose embedded, vllm or remote")
    hf_config, tensors = read_hf_dir(path) if hf_dir else megatron_checkpoint_to_hf(step_dir, cfg)
    if engine == "remote":
        return _remote_engine(hf_config, tensors, cfg, remote or {}, meta)
    device, dtype = resolve_device(device, dtype)
    meta.update({"device": device, "dtype": dtype})
    return EmbeddedEngine(hf_config, tensors, logprobs_mode=logprobs_mode, seed=seed, device=device,
                          dtype=getattr(torch, _DTYPES[dtype])), meta


def _remote_engine(hf_config: dict, tensors: dict, cfg, remote: dict[str, Any], meta: dict[str, Any]):
    """A FleetEngine on the configured (or given) servers, loaded with ``tensors`` as weight version 1."""
    from megatron_amir.rollout.client import FleetEngine

    rc = cfg.rollout.model_copy(update={k: v for k, v in (("servers", remote.get("servers")),
                                                          ("discovery_file", remote.get("discovery_file")))
                                        if v})
    if not (rc.servers or rc.discovery_file):
        raise EvalSetupError("--engine remote needs --servers or --discovery-file (or rollout.servers / "
                             "rollout.discovery_file in --config)")
    sync_dir = remote.get("weights_dir") or rc.weight_sync_dir
    if not sync_dir:
        raise EvalSetupError("--engine remote needs --weights-dir: a directory the servers can read "
                             "(their --weights-root), where the model's weights are written for them")
    eng = FleetEngine.from_config(rc, hf_config=hf_config, sync_dir=sync_dir)
    try:
        eng.load_weights(tensors, version=1)
    except BaseException:
        eng.close()
        raise
    meta.update({"servers": list(rc.servers), "discovery_file": rc.discovery_file, "weights_dir": str(sync_dir)})
    # the servers report log-probs in their own --logprobs-mode: record what they say (the results' margins are
    # computed from them); servers that do not say (stock vllm serve) leave the requested mode, marked unverified
    modes = {m for m in eng.logprobs_modes().values() if m}
    if len(modes) == 1:
        meta["logprobs_mode"] = modes.pop()
    elif modes:
        meta["logprobs_mode"] = "mixed: " + ", ".join(sorted(modes))
    else:
        meta["logprobs_mode_unverified"] = True
    return eng, meta


# --------------------------------------------------------------------------------------------- data
def load_eval_tokenizer(tokenizer_dir: Optional[str], model: Path, cfg):
    """--tokenizer, else the config's tokenizer (data.tokenizer_dir / model.tokenizer), else the HF model
    directory's own, else (synthetic task) the trainer's cached demo tokenizer, built the same way."""
    from megatron_amir.data.tokenizer import load_tokenizer

    if tokenizer_dir:
        if not Path(tokenizer_dir).is_dir():
            raise EvalSetupError(f"--tokenizer {tokenizer_dir} is not a directory")
        return load_tokenizer(tokenizer_dir)
    if cfg.data.tokenizer_dir or cfg.model.tokenizer:
        from megatron_amir.training.data_setup import build_tokenizer

        return build_tokenizer(cfg)
    if is_hf_dir(model) and any((model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "megatron_amir_tokenizer.json")):
        return load_tokenizer(model)
    if cfg.data.source == "synthetic":  # same corpus, vocabulary and cache as the trainer's build_data
        from megatron_amir.data.synthetic import corpus_lines, make_splits
        from megatron_amir.training.data_setup import build_tokenizer

        return build_tokenizer(cfg, corpus_lines(make_splits(cfg.data.synthetic)[0]))
    raise EvalSetupError(f"no tokenizer found for {model}: pass --tokenizer DIR (or set data.tokenizer_dir)")


def load_problems(bench: str, cfg) -> list[Any]:
    """Problems of ``--bench`` through megatron_amir.data:

    - a file (JSONL / JSON / Parquet): its format is detected from the fields (benchmarks.py);
    - ``NAME=FILE``: the file read in benchmark NAME's format (math500, aime24, gsm8k, ...);
    - ``synthetic``: the held-out split of the config's synthetic task;
    - ``NAME``: benchmark NAME from the config's ``data.test_path`` (never downloaded)."""
    from megatron_amir.data.benchmarks import load_benchmark, load_benchmark_file

    if Path(bench).is_file():
        probs = load_benchmark_file(bench)
    elif "=" in bench:
        name, file = bench.split("=", 1)
        if not Path(file).is_file():
            raise EvalSetupError(f"--bench {bench}: file {file} does not exist")
        probs = load_benchmark_file(file, name)
    elif _looks_like_a_path(bench):  # not "unknown benchmark '/data/x.jsonl'"
        raise EvalSetupError(f"--bench {bench}: file not found")
    elif bench == "synthetic":
        from megatron_amir.data.synthetic import make_splits

        probs = list(make_splits(cfg.data.synthetic)[1])
    else:
        probs = load_benchmark(bench, cfg.data)
    if not probs:
        raise EvalSetupError(f"--bench {bench}: no problems")
    return list(probs)


def _looks_like_a_path(bench: str) -> bool:
    """A --bench value meant as a file (a directory part or a data-file suffix), not a benchmark name."""
    return "/" in bench or os.sep in bench or Path(bench).suffix.lower() in (".jsonl", ".json", ".parquet")


def apply_prompt_template(problems: list[Any], cfg, tokenizer) -> list[Any]:
    """Problems whose ``prompt`` is the text the model sees (``data.template``: plain, chat, boxed, ...)."""
    from megatron_amir.data.templates import apply_template

    return apply_template(problems, cfg.data.template, tokenizer)


# --------------------------------------------------------------------------------------------- all
def build_eval_setup(*, model: str, bench: str, config_path: Optional[str] = None,
                     overrides: Optional[list[str]] = None, tokenizer_dir: Optional[str] = None,
                     temperature: Optional[float] = None, top_p: Optional[float] = None,
                     top_k: Optional[int] = None, max_new_tokens: Optional[int] = None,
                     max_problems: Optional[int] = None, logprobs_mode: str = "raw_logprobs",
                     seed: int = 0, engine: str = "embedded", device: str = "auto",
                     dtype: str = "auto", remote: Optional[dict[str, Any]] = None) -> EvalSetup:
    from megatron_amir.config import ConfigError, load_config
    from megatron_amir.rewards import get_reward_fn
    from megatron_amir.rollout.engine import SamplingParams

    mpath = Path(model)
    step_dir = find_trainer_checkpoint(mpath) if mpath.is_dir() and not is_hf_dir(mpath) else None
    try:
        if config_path:
            cfg = load_config(config_path, overrides)
        elif step_dir is not None:
            cfg = config_from_checkpoint(step_dir, overrides)
        else:
            cfg = load_config(None, overrides)
    except ConfigError as exc:
        raise EvalSetupError(str(exc)) from None
    tokenizer = load_eval_tokenizer(tokenizer_dir, mpath, cfg)
    problems = load_problems(bench, cfg)
    limit = max_problems or cfg.eval.max_problems
    if limit:
        problems = problems[:limit]
    problems = apply_prompt_template(problems, cfg, tokenizer)
    eng, meta = load_engine(model, cfg, logprobs_mode=logprobs_mode, seed=seed, step_dir=step_dir, engine=engine,
                            device=device, dtype=dtype, remote=remote)
    model_vocab = getattr(eng, "vocab_size", None)
    if model_vocab is not None and tokenizer.vocab_size > model_vocab:
        close_engine(eng)
        raise EvalSetupError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                             f"{model_vocab}: wrong --tokenizer for {model}?")
    reward_fn = get_reward_fn(cfg.reward.name, cfg.reward)
    params = SamplingParams(
        temperature=cfg.eval.temperature if temperature is None else temperature,
        top_p=cfg.rollout.top_p if top_p is None else top_p,
        top_k=cfg.rollout.top_k if top_k is None else top_k,
        max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        stop_token_ids=(tokenizer.eos_id,))
    meta.update({"reward": cfg.reward.name, "template": cfg.data.template, "num_problems": len(problems)})
    return EvalSetup(eng, tokenizer, problems, reward_fn, params, None, meta)
