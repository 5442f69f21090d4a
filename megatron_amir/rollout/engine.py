"""The rollout ``Engine`` protocol and the messages it exchanges with the trainer.

Every engine (embedded torch engine, vLLM's AsyncLLM, the HTTP fleet client) speaks token ids in and
token ids + per-token log-probs out, never strings. A call generates ``n`` samples (one GRPO group) for
each prompt and tags every sample with the version of the weights it was sampled from, so the trainer
can measure staleness and apply off-policy corrections.

Log-prob semantics (``logprobs_mode``, same names as vLLM's ``--logprobs-mode``):

* ``processed_logprobs`` (default, what TRL and verl use): the log-prob of the sampled token under the
  distribution it was actually sampled from: ``log_softmax(logits / T)`` after top-k / top-p filtering
  (filtered tokens get -inf and the rest is renormalized). The trainer must recompute its log-probs with
  the same temperature for the importance ratio to be 1 on-policy; with top_k=0 and top_p=1 that is
  exactly ``log_softmax(logits / T)``. Greedy rows (temperature 0) report ``log_softmax(logits)``.
* ``raw_logprobs``: ``log_softmax(logits)`` of the model, before any sampling transformation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]
LOGPROBS_MODES: tuple[str, ...] = ("processed_logprobs", "raw_logprobs")
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (one prompt; its ``n`` samples share them).

    temperature: 0 means greedy (argmax). top_p in (0, 1]. top_k: 0 or -1 = off (vLLM accepts both).
    stop_token_ids: generation of a sample ends after it emits one of these (the stop token is kept in
    the output, with its log-prob, because the policy must learn to emit it). seed: per-request seed;
    the same seed, prompt and weights give the same samples whatever else shares the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        # Normalize list inputs so the dataclass stays hashable and comparable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not (self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be non-negative, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_rollout_config(cls, cfg, stop_token_ids: Sequence[int] = (), seed: Optional[int] = None) -> "SamplingParams":
        """Build from ``megatron_amir.config.RolloutConfig`` (stop ids come from the tokenizer, not the config)."""
        return cls(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=tuple(stop_token_ids),
            seed=seed,
        )


@dataclass
class Sample:
    """One completion. ``token_ids`` holds the response only (no prompt); ``logprobs[i]`` belongs to
    ``token_ids[i]``; ``weight_version`` is the version of the weights that produced every token."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Sample: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"Sample.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@dataclass
class GroupResult:
    """The ``n`` samples of one prompt (a GRPO group)."""

    prompt_token_ids: list[int]
    samples: list[Sample]
    request_id: str = ""
    weight_version: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.weight_version == -1 and self.samples:
            # A group is only as fresh as its oldest sample (they can differ across a mid-request update).
            self.weight_version = min(s.weight_version for s in self.samples)


PerPromptParams = Union[SamplingParams, Sequence[SamplingParams]]
NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def expand_params(params: PerPromptParams, num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt (a single object applies to all)."""
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] is {type(p).__name__}, expected SamplingParams")
    return params


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: Optional[int] = None) -> list[list[int]]:
    """Check prompts are non-empty lists of token ids in range; returns plain lists of int."""
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        if vocab_size is not None:
            bad = [t for t in ids if t < 0 or t >= vocab_size]
            if bad:
                raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs from a rollout engine.

    ``generate`` returns one GroupResult per prompt, in prompt order, each with ``n`` Samples.
    ``load_weights`` takes HF-named tensors (the names vLLM and transformers use) and the new version
    number; samples generated afterwards carry that version.
    """

    @property
    def version(self) -> int: ...

    def generate(self, prompts: Sequence[Sequence[int]], params: PerPromptParams, n: int = 1) -> list[GroupResult]: ...

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None: ...


def close_engine(engine: object) -> None:
    """Release an engine's resources (a fleet client's router and event-loop thread, a vLLM engine's workers);
    a no-op for engines without ``close`` (the embedded engine holds nothing beyond memory)."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def push_weight_buckets(engine: object, stream: Any, version: int) -> Any:
    """Weights ``version`` from a bucketed stream (``training.weight_stream.WeightStream``) into ``engine``: engines
    with ``load_weight_buckets`` take it bucket by bucket; any other ``Engine`` gets the tensors collected into one
    mapping (a whole copy)."""
    load = getattr(engine, "load_weight_buckets", None)
    if callable(load):
        return load(stream, version)
    weights: dict = {}
    for bucket in stream:
        weights.update(bucket.tensors)
    return engine.load_weights(weights, version)
