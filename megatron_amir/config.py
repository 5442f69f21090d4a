"""Typed configuration: one pydantic model per section, loaded from YAML with ``a.b=c`` overrides.

Loading (``load_config``) parses the file and every override value with one YAML loader (``_YamlLoader``),
merges with OmegaConf and validates with pydantic, so every error names the key path
(``algorithm.clip_eps_low``) and, for unknown keys, suggests the closest known one. Cross-field rules (TP divides
heads, PP divides layers, micro-batch divides global batch, min <= max pairs, ...) run at load, before any work
starts, and name the full dotted path of the field they blame (``data.synthetic.min_digits``).

Every field's description is the docstring under it; ``python -m megatron_amir.config`` (or ``megatron-amir config
docs``) renders them into docs/config.md, and refuses while any field has none.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


class _Section(BaseModel):
    # a field's description is the docstring under it (docs/config.md is generated from them)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    """Architecture of the policy (a Megatron-Core GPTModel). Field names follow HF config.json where possible."""

    arch: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    """Model family: llama, qwen2, qwen3 or mistral. All are built as one Megatron-Core GPTModel (RMSNorm, SwiGLU MLP,
    RoPE, no linear biases); the family picks the defaults of ``qkv_bias`` (qwen2) and ``qk_norm`` (qwen3) and the
    Hugging Face class the converters read and write."""
    vocab_size: int = Field(512, ge=1)
    """Rows of the embedding and output layer. May exceed the tokenizer's vocabulary (padding, e.g. to a multiple of 128
    * TP; see ``real_vocab_size``), never be smaller; must be divisible by ``parallel.tensor_model_parallel_size``."""
    real_vocab_size: Optional[int] = Field(None, ge=1)
    """Number of real token ids: ids >= this are padding rows, never sampled and given no probability in the trainer's
    log-probs; also the vocabulary size of exported Hugging Face weights. null = the tokenizer's vocabulary size,
    filled in at start-up."""
    hidden_size: int = Field(64, ge=1)
    """Model width (HF ``hidden_size``)."""
    ffn_hidden_size: int = Field(128, ge=1)
    """Width of the SwiGLU MLP's inner layer (HF ``intermediate_size``)."""
    num_layers: int = Field(2, ge=1)
    """Transformer layers (HF ``num_hidden_layers``); must be divisible by ``parallel.pipeline_model_parallel_size``."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads; must be a multiple of ``num_kv_heads`` and divisible by ``parallel.tensor_model_parallel_size``."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads of grouped-query attention (HF ``num_key_value_heads``, Megatron ``num_query_groups``); equal to
    ``num_attention_heads`` = plain multi-head attention. Must be divisible by TP."""
    head_dim: Optional[int] = Field(None, ge=1)
    """Dimension of one attention head (Megatron ``kv_channels``). null = hidden_size // num_attention_heads (then
    hidden_size must be divisible by the head count)."""
    max_position_embeddings: int = Field(2048, ge=1)
    """Longest sequence, prompt plus completion tokens, the model is built for (Megatron ``max_sequence_length``); the
    embedded rollout engine and server refuse longer requests."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency (HF ``rope_theta``, Megatron ``rotary_base``)."""
    rope_scaling: Optional[dict[str, Any]] = None
    """Hugging Face style RoPE scaling, e.g. ``{rope_type: llama3, factor: 8}`` or ``{rope_type: linear, factor: 4}``;
    null = none. Types: llama3 (Megatron-Core fixes low/high frequency factors 1 and 4 and the original length 8192;
    other values are rejected), linear, default."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the RMSNorm layers (HF ``rms_norm_eps``)."""
    tie_word_embeddings: bool = False
    """Share the weights of the input embedding and the output layer."""
    qkv_bias: Optional[bool] = None
    """Bias on the query/key/value projections. null = true for arch=qwen2, false otherwise."""
    qk_norm: Optional[bool] = None
    """RMSNorm on each head's queries and keys (Megatron ``qk_layernorm``). null = true for arch=qwen3, false
    otherwise."""
    init_method_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal weight initialization (random init only; HF ``initializer_range``)."""
    hf_path: Optional[str] = None
    """Hugging Face model directory to start from: converted once into ``<checkpoint.dir>/init`` with this run's TP/PP,
    and reused while that holds a conversion of the same directory. Ignored when resuming or when ``model.load`` /
    ``--init-from`` is given. This section must describe that model (checked field by field at start). null (with no
    ``load``) = random initialization."""
    load: Optional[str] = None
    """A megatron-amir checkpoint to start from (model weights only, e.g. the warm-up's); the ``--init-from`` flag wins
    over it. Ignored when resuming."""
    tokenizer: Optional[str] = None
    """Tokenizer directory (a Hugging Face tokenizer or one saved by megatron-amir), used when ``data.tokenizer_dir`` is
    not set. Both null = the sentencepiece demo tokenizer trained on the synthetic corpus."""
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the parameters and the compute: fp32, bf16 or fp16 (bf16/fp16 turn on Megatron's mixed precision, with
    fp32 master weights in the optimizer)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: transformer_engine (Transformer Engine layers; needs CUDA and TE), local (Megatron-Core's
    torch layers, the CPU path), auto = transformer_engine when CUDA and TE are both present, local otherwise."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 training through Transformer Engine: e4m3 for all tensors, or hybrid (e4m3 forward, e5m2 gradients); null =
    no FP8. Needs CUDA, TE and transformer_impl transformer_engine or auto."""
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    """FP8 scaling recipe (used only with ``fp8``): tensorwise (current per-tensor scaling) and delayed (scales from an
    amax history) need GPU compute capability >= 8.9, blockwise >= 9.0 (Hopper), mxfp8 >= 10.0 (Blackwell)."""
    fp8_param: bool = False
    """Store the parameters themselves in FP8 (Megatron ``fp8_param``) to save memory; needs ``fp8``."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in bf16 when training in FP8 (Megatron ``first_last_layers_bf16``),
    for stability; used only with ``fp8``."""

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def use_qkv_bias(self) -> bool:
        return self.arch == "qwen2" if self.qkv_bias is None else self.qkv_bias

    @property
    def use_qk_norm(self) -> bool:
        return self.arch == "qwen3" if self.qk_norm is None else self.qk_norm

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_kv_heads:
            raise _cross("model.num_kv_heads", f"num_attention_heads={self.num_attention_heads} must be a multiple "
                                               f"of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise _cross("model.hidden_size", f"hidden_size={self.hidden_size} is not divisible by "
                                              f"num_attention_heads={self.num_attention_heads}; set model.head_dim")
        if self.real_vocab_size is not None and self.real_vocab_size > self.vocab_size:
            raise _cross("model.real_vocab_size",
                         f"real_vocab_size={self.real_vocab_size} > vocab_size={self.vocab_size}")
        if self.fp8_param and not self.fp8:
            raise _cross("model.fp8_param", "fp8_param=true needs model.fp8 set (e4m3 or hybrid)")
        return self


class ParallelConfig(_Section):
    """Megatron-Core model parallelism. The data-parallel size is world_size / (TP * PP), derived at start-up."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    """TP: ranks each layer's weights are split over; must divide ``model.num_attention_heads`` and
    ``model.num_kv_heads``."""
    pipeline_model_parallel_size: int = Field(1, ge=1)
    """PP: pipeline stages the layers are split over; must divide ``model.num_layers``."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: nccl, gloo, or auto = nccl with CUDA, gloo without. The environment variable
    ``MEGATRON_AMIR_BACKEND`` overrides it."""
    timeout_s: float = Field(1800.0, gt=0)
    """Seconds a torch.distributed collective may wait before the job fails (the process groups' timeout; NCCL's
    watchdog kills the job past it). The other ranks wait in the rollout-batch broadcast while rank 0 alone generates,
    scores, syncs the weights and evaluates, so it must exceed the longest such stretch (torch's default is 600)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over the data-parallel ranks (Megatron's distributed optimizer). Saving its state needs
    CUDA: a CPU run with it cannot checkpoint the optimizer."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: split the norm and dropout activations along the sequence over the TP ranks. Needs
    tensor_model_parallel_size > 1 and a GPU (not supported on CPU)."""


# --------------------------------------------------------------------------------------------- algorithm
class AmirConfig(_Section):
    """The AMIR pairwise regularizer (docs/algorithms.md, "The AMIR pair term"). enabled=false gives plain GRPO."""

    enabled: bool = True
    """Add the AMIR pair loss lambda * L_pair to the GRPO loss; false = plain GRPO (the pair statistics are still
    measured, with lambda 0, for comparison)."""
    beta: float = Field(0.2, gt=0)
    """beta of the implicit reward s_i = beta * (lbar_theta(y_i) - lbar_ref(y_i)); the pair loss is the mean over pairs
    of -log sigmoid(s_w - s_l). The paper's default is 0.2."""
    margin: float = Field(0.5, ge=0)
    """A pair (w, l) forms only when r_w - r_l > margin (strict: ties never pair), in reward units. 0.5 with 0/1
    correctness rewards pairs each correct rollout with each incorrect one."""
    pair_mode: Literal["all", "top"] = "all"
    """Pairs each group contributes: all = every ordered pair over the margin; top = the best rollout (the first on
    ties) against each worse one."""
    max_pairs_per_group: Optional[int] = Field(None, ge=1)
    """Cap on the pairs of one group, keeping the largest reward gaps (ties broken by row order); null = no cap."""
    logprob_norm: Literal["mean", "sum"] = "mean"
    """lbar in the implicit reward: mean = the completion's summed token log-prob divided by its length
    (length-normalized, the paper's choice); sum = the summed log-prob."""
    reference_anchored: bool = False
    """Subtract the reference policy's lbar_ref (a frozen copy of the starting weights, loaded for this) in s_i; false =
    reference-free (lbar_ref = 0), the paper's default."""
    lambda_init: float = Field(0.01, ge=0)
    """lambda at the first step (the AMIR-GRPO reference code's 0.01), and the fixed lambda when ``adaptive_lambda`` is
    false. With the adaptive schedule it must lie in [lambda_min, lambda_max]. lambda is saved in checkpoints."""
    adaptive_lambda: bool = True
    """The AMIR-GRPO reference code's lambda schedule, once per optimizer update that has pairs: q = lambda * L_pair /
    max(1e-9, L_GRPO); q < ratio_low: lambda = min(lambda_max, lambda_up * lambda); q > ratio_high: lambda =
    max(lambda_min, lambda_down * lambda). As in the reference, lambda moves before it is applied to that update's
    loss. false = lambda stays lambda_init."""
    lambda_min: float = Field(0.005, ge=0)
    """Lower bound of the adaptive lambda (reference code: 0.005)."""
    lambda_max: float = Field(0.05, ge=0)
    """Upper bound of the adaptive lambda (reference code: 0.05)."""
    ratio_low: float = Field(0.30, ge=0)
    """The adaptive lambda grows when q = lambda * L_pair / L_GRPO is below this (reference code: 0.30)."""
    ratio_high: float = Field(0.70, ge=0)
    """The adaptive lambda shrinks when q is above this (reference code: 0.70)."""
    lambda_up: float = Field(1.25, gt=1)
    """Factor lambda is multiplied by when q < ratio_low, before clamping to lambda_max (reference code: 1.25)."""
    lambda_down: float = Field(0.8, gt=0, lt=1)
    """Factor lambda is multiplied by when q > ratio_high, before clamping to lambda_min (reference code: 0.8)."""

    @model_validator(mode="after")
    def _bounds(self) -> "AmirConfig":
        if self.lambda_min > self.lambda_max:
            raise _cross("algorithm.amir.lambda_min", f"lambda_min={self.lambda_min} > lambda_max={self.lambda_max}")
        if self.ratio_low > self.ratio_high:
            raise _cross("algorithm.amir.ratio_low", f"ratio_low={self.ratio_low} > ratio_high={self.ratio_high}")
        if self.enabled and self.adaptive_lambda and not self.lambda_min <= self.lambda_init <= self.lambda_max:
            # the rule only multiplies λ and clamps it when it moves: outside the band it can stay there (or at 0)
            raise _cross("algorithm.amir.lambda_init",
                         f"lambda_init={self.lambda_init} must lie in [lambda_min={self.lambda_min}, "
                         f"lambda_max={self.lambda_max}] when adaptive_lambda=true")
        return self


class AlgorithmConfig(_Section):
    """The RL objective: group advantages, the clipped policy loss and its aggregation, the optional KL term, the
    rollout/trainer importance correction, and the AMIR pair regularizer (``algorithm.amir``)."""

    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """Group-relative advantage of rollout i in its group: grpo = (r_i - mean) / (std + adv_eps) (GRPO, DeepSeekMath);
    drgrpo = r_i - mean, no std division (Dr. GRPO); rloo = r_i minus the mean of the other rollouts (RLOO). Groups
    whose rewards are all equal get advantage 0."""
    adv_eps: float = Field(1e-6, gt=0)
    """epsilon added to the standard deviation in the grpo advantage and in ``whiten_rewards``."""
    whiten_rewards: bool = False
    """Standardize the rewards over the whole global batch (all data-parallel ranks), (r - mean) / (std + adv_eps),
    before the group advantage estimator."""
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    """Per-token policy loss: ppo = the PPO/GRPO clipped surrogate on the token ratio rho_t = pi_theta / pi_old; gspo =
    the same surrogate on one ratio per sequence, exp(mean_t log rho_t) (GSPO; its paper pairs it with
    seq-mean-token-mean and clip ranges near 3e-4 / 4e-4)."""
    clip_eps_low: float = Field(0.2, gt=0)
    """epsilon_low: the ratio is clipped below at 1 - epsilon_low (binds for negative advantages)."""
    clip_eps_high: float = Field(0.2, gt=0)
    """epsilon_high: the ratio is clipped above at 1 + epsilon_high (binds for positive advantages). A value above
    clip_eps_low (e.g. 0.28) is DAPO's clip-higher."""
    dual_clip_c: Optional[float] = Field(None, gt=1)
    """Dual-clip constant c > 1: for negative advantages the token loss is capped at -A * c, so a huge ratio cannot blow
    it up (dual-clip PPO, Ye et al. 2020); null = off."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How token losses become the batch loss (weights from global counts, exact for any micro-batch split): token-mean
    = mean over all response tokens of the global batch (DAPO); seq-mean-token-mean = mean over sequences of each
    one's token mean (original GRPO, length-biased); seq-mean-token-sum = mean over sequences of token sums;
    seq-mean-token-sum-norm = token sums divided by sequences * loss_agg_max_len (Dr. GRPO)."""
    loss_agg_max_len: Optional[int] = Field(None, ge=1)
    """The constant length, in tokens, that seq-mean-token-sum-norm (Dr. GRPO) divides by; required by that mode, unused
    by the others (commonly rollout.max_new_tokens)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL(pi_theta || pi_ref) penalty, pi_ref = a frozen copy of the starting weights; 0 = no KL term (and
    no reference model unless ``amir.reference_anchored``)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimate from delta = log pi_theta - log pi_ref (clamped to +-20): k1 = delta (unbiased, can be
    negative); k2 = delta^2 / 2; k3 = exp(-delta) + delta - 1 (unbiased and non-negative; GRPO's). Schulman's
    approximations."""
    kl_in_reward: bool = False
    """false = the KL is a loss term kl_coef * sum_t w_t k(delta_t) with the policy loss's token weights (GRPO); true =
    a per-sequence penalty kl_coef * sum_t k(delta_t) subtracted from the reward before advantages (AMIR pairs still
    rank by the verifier rewards)."""
    reference_offload: bool = Field(False)
    """Keep the reference policy (KL, reference-anchored pairs) in host memory; it is copied to the device only for its
    log-prob pass."""
    tis_cap: Optional[float] = Field(None, gt=0)
    """Truncated importance sampling (TIS) cap C: each policy-gradient token weight is multiplied by min(exp(logp_old -
    logp_rollout), C), the trainer's recomputed log-prob against the rollout engine's, correcting the numeric
    mismatch between engine and trainer; null = off. Unset with rollout.fp8_rollout=true it becomes 2.0 (an explicit
    null is refused there)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch (each pass split into global_batch_size minibatches, one optimizer update each).
    After the first update the implicit rewards of the AMIR pairs come from a fresh no-grad forward of the current
    policy."""
    amir: AmirConfig = Field(default_factory=AmirConfig)
    """The AMIR pairwise regularizer."""


# --------------------------------------------------------------------------------------------- rollout
class RolloutConfig(_Section):
    """Sampling: the engine that generates G completions per prompt, its sampling parameters, the remote fleet and how
    new weights reach it."""

    engine: Literal["embedded", "vllm", "remote"] = "embedded"
    """Who samples: embedded = the in-process torch engine (the CPU default); vllm = vLLM in the trainer's process
    (GPU); remote = a fleet of HTTP servers speaking vLLM's API (stock ``vllm serve`` or ``megatron-amir serve``),
    listed in ``servers`` or ``discovery_file``."""
    group_size: int = Field(8, ge=2)
    """G, completions sampled per prompt (one GRPO group); the rollout batch is data.prompts_per_step * G sequences."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. The trainer recomputes its log-probs at the same temperature (log_softmax(logits / T)), so
    the importance ratio is 1 on-policy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample from the smallest set of tokens whose probability adds up to top_p; 1 = off. With
    filtering on, the engine samples from a distribution the trainer's log-probs do not filter."""
    top_k: int = Field(0, ge=0)
    """Sample from the k most likely tokens; 0 = off (same caveat as top_p)."""
    max_new_tokens: int = Field(128, ge=1)
    """Completion length limit in tokens; a completion that reaches it is cut (finish_reason length). Also the
    evaluation's limit unless eval.max_new_tokens is set."""
    servers: list[str] = Field(default_factory=list)
    """Base URLs (``http://host:port``) of the remote fleet's servers (engine=remote)."""
    discovery_file: Optional[str] = None
    """Text file listing the fleet's members, one base URL per line (written by ``python -m launch.fleet_member``);
    watched so servers can join and leave (engine=remote)."""
    use_router: bool = True
    """Put a vllm-router process (the vLLM project's router) in front of the fleet for load balancing, health checks and
    retries; false = the client sends requests to the servers round-robin itself."""
    router_policy: Literal["round_robin", "power_of_two", "cache_aware", "random"] = "round_robin"
    """vllm-router's routing policy: round_robin, power_of_two, cache_aware (prefix-cache affinity) or random."""
    token: Optional[str] = None
    """Bearer token the fleet's state-changing routes (weight updates) require; null = ``$MEGATRON_AMIR_TOKEN``. Never
    written to run directories or checkpoints."""
    request_timeout_s: float = Field(300.0, gt=0)
    """Seconds one HTTP request to the fleet may take (also the router's request timeout)."""
    weight_sync: Literal["file", "broadcast"] = "file"
    """Transport of new weights to the rollout engines (docs/weight_sync.md). Either way the trainer streams them
    bucket by bucket (weight_sync_bucket_mb) out of its sharded model, never gathering a whole copy. file: each bucket
    becomes one shard of a sha256-verified snapshot in weight_sync_dir, which every server then loads (remote fleet and
    vllm engine). broadcast (engine=remote only): each bucket is broadcast from the trainer's rank 0 into one group per
    server (gloo on CPU, NCCL on GPU) and loaded there before the next one arrives; a server that fails or dies
    mid-update leaves the rotation until an update reaches it whole. The embedded engine loads the buckets in
    process either way."""
    weight_sync_bucket_mb: int = Field(256, ge=1)
    """Bucket size of the weight stream in MiB: the most a rank holds beyond its model while weights are sent is about
    one bucket plus the largest single tensor."""
    weight_sync_address: str = "127.0.0.1"
    """weight_sync=broadcast: the address of the trainer's rank 0 that the servers connect to (one rendezvous port
    per server, picked free); loopback for a fleet on the same machine."""
    weight_sync_timeout_s: float = Field(120.0, gt=0)
    """weight_sync=broadcast: seconds a rendezvous or one bucket's broadcast may take before that server is counted
    as failed (it leaves the rotation; the trainer and the other servers go on)."""
    weight_sync_rollback: bool = True
    """weight_sync=broadcast (and the embedded engine): an update that stops part-way (the trainer died, a bucket timed
    out or was refused) leaves the engine serving the previous version. Embedded engines copy each weight to host
    memory (CPU RAM) before the update overwrites it and put the copies back on a failure; vLLM workers receive the
    whole update into host memory and load it only once it is complete. Cost during an update: host RAM for one model
    copy per embedded engine, and per vLLM worker (every tensor-parallel worker of a vLLM server receives the whole
    model: a 70B bf16 model served at TP 8 stages 8 × 140 GB on its node), plus the copy time (docs/weight_sync.md).
    false = no copy: an engine whose update stopped part-way holds a mix of two versions and is kept out of rotation
    (the embedded server answers 503) until a complete update has loaded."""
    weight_sync_dir: Optional[str] = None
    """Directory for weight snapshots; for a remote fleet it must be readable by the servers. null =
    ``<logging.dir>/weights`` (remote) or a temporary directory (vllm)."""
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """Log-probs the engine reports with each token (vLLM's ``--logprobs-mode``): processed_logprobs = under the
    distribution actually sampled from (after temperature and top-k/top-p); raw_logprobs = log_softmax(logits),
    before any sampling transformation."""
    fp8_rollout: bool = False
    """FP8 rollouts: the trainer quantizes the linear layers' weights in 128×128 blocks (e4m3 + float32
    ``weight_scale_inv``, DeepSeek-style block FP8) and every route to the engines carries that layout (the directory an
    engine starts from, snapshots, broadcasts; docs/weight_sync.md). vllm engine and vLLM fleets serve it with
    ``--quantization fp8`` (each member must start from an FP8 directory: ``python -m launch.fleet_seed --hf``); the
    embedded engine and embedded fleet servers dequantize it into their weights (simulated FP8: weights as vLLM holds
    them, activations unquantized). Turns TIS on (``algorithm.tis_cap`` 2.0 unless set). The vllm engine needs the
    attention, key/value and MLP widths divisible by 128 × ``vllm_tensor_parallel_size`` (vLLM's block shape)."""
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    """Tensor-parallel size of each vLLM engine or server."""
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (``--gpu-memory-utilization``); colocated with the trainer it must leave
    room for training."""
    vllm_sleep_level: Literal[0, 1, 2] = 0
    """engine=vllm: vLLM's sleep mode around the training phase (the engine gets ``enable_sleep_mode``), so a colocated
    engine gives its GPU memory to training. After the rollouts the engine sleeps; the weight sync wakes its weights,
    loads the new ones into them and then wakes the KV cache. 1 = weights offloaded to host memory (host RAM for one
    model copy), KV cache dropped; 2 = both dropped (the update refills the weights); 0 = off. Not with
    async_off_policy (the producer generates while the trainer trains)."""
    async_off_policy: bool = False
    """Asynchronous rollouts: a producer thread on rank 0 generates the batches of the next steps while the trainer
    trains; the batch of step s is sampled with the weights of version max(resume version, s - max_staleness), so a
    sample is at most max_staleness versions old. Needs algorithm.tis_cap (the off-policy correction, see
    docs/algorithms.md); false = synchronous (every step samples with the current weights)."""
    max_staleness: int = Field(0, ge=0)
    """How many weight versions a sample may lag behind the trainer; an older sample stops the step with an error.
    Synchronous: the tolerance for a server that missed an update (0 = every sample from the current weights).
    Asynchronous: how far generation runs ahead (k batches in flight while the trainer trains; 0 = the synchronous
    schedule, bit for bit)."""

    @model_validator(mode="after")
    def _weight_sync_wired(self) -> "RolloutConfig":
        # the colocated vllm engine loads snapshots through its own collective_rpc; only the fleet client broadcasts
        if self.weight_sync == "broadcast" and self.engine != "remote":
            raise _cross("rollout.weight_sync",
                         f"weight_sync=broadcast needs engine=remote (engine={self.engine!r} loads the weights "
                         "from the stream in process (embedded) or through a snapshot (vllm)); use weight_sync: file")
        if self.vllm_sleep_level and self.engine != "vllm":
            raise _cross("rollout.vllm_sleep_level",
                         f"vllm_sleep_level={self.vllm_sleep_level} needs engine=vllm (engine={self.engine!r} has no "
                         "colocated vLLM to put to sleep); use 0")
        if self.vllm_sleep_level and self.async_off_policy:
            raise _cross("rollout.vllm_sleep_level",
                         f"vllm_sleep_level={self.vllm_sleep_level} with async_off_policy=true: the producer generates "
                         "while the trainer trains, so the engine can never sleep; use 0")
        return self


# --------------------------------------------------------------------------------------------- data / reward
class SyntheticTaskConfig(_Section):
    """The built-in synthetic arithmetic task (``data.source=synthetic``): short prompts whose solutions are written-out
    steps ending in ``#### <answer>``."""

    kinds: list[Literal["add", "sub", "mul", "linear", "word"]] = Field(
        default_factory=lambda: ["add", "mul"], min_length=1)
    """Problem kinds, interleaved evenly: add, sub, mul (column-wise written steps), linear (solve a*x+b=c), word (short
    word problems)."""
    min_digits: int = Field(2, ge=1)
    """Fewest digits of an operand; <= max_digits."""
    max_digits: int = Field(3, ge=1)
    """Most digits of an operand."""
    num_train: int = Field(4000, ge=1)
    """Distinct training problems."""
    num_test: int = Field(300, ge=1)
    """Distinct held-out problems, disjoint from the training ones; drawn first from the seed's stream, so they do not
    change with num_train."""
    seed: int = 1234
    """Seed of the problem generator; both splits are deterministic in it."""
    restate_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of problems whose solution first restates the problem (``47+85= 7+5=12 4+8+1=13 #### 132``), picked
    per problem from its id and the seed, so the style cannot be told from the prompt: a model fine-tuned on the mix
    samples both styles for every prompt, the restated one a few tokens longer. The task variant of the length-bias
    study (with reward.style); add, sub and mul kinds only. 0 = the plain task."""

    @model_validator(mode="after")
    def _digits(self) -> "SyntheticTaskConfig":
        # synthetic.make_splits would raise on this only at data setup, on every rank
        if self.min_digits > self.max_digits:
            raise _cross("data.synthetic.min_digits",
                         f"min_digits={self.min_digits} > max_digits={self.max_digits}")
        # a restated linear or word prompt is not one word ending in '=', which is how reward.style recognizes it
        bad = sorted(set(self.kinds) - {"add", "sub", "mul"})
        if self.restate_fraction > 0 and bad:
            raise _cross("data.synthetic.restate_fraction",
                         f"restate_fraction={self.restate_fraction} needs kinds among add, sub, mul (got {bad})")
        return self


class DataConfig(_Section):
    """Training prompts: where the problems come from, how they become prompt text, how many per step."""

    source: Literal["synthetic", "jsonl", "parquet", "benchmark"] = "synthetic"
    """synthetic = the built-in task (``data.synthetic``); jsonl / parquet = problem records read from train_path (and
    test_path); benchmark = a named math benchmark read from a local file."""
    train_path: Optional[str] = None
    """Training problems: a JSONL or Parquet file of records with a prompt (or chat messages) and an answer; required
    for source=jsonl|parquet, and the benchmark file for source=benchmark."""
    test_path: Optional[str] = None
    """Held-out problems for evaluation, same format; null = none (the synthetic task has its own test split)."""
    benchmark: Optional[str] = None
    """Benchmark name for source=benchmark: math500, aime24, aime25, amc23, gsm8k, minerva or olympiadbench (aliases
    like math-500 are accepted). Read from local files only, never downloaded."""
    synthetic: SyntheticTaskConfig = Field(default_factory=SyntheticTaskConfig)
    """The synthetic task (source=synthetic)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts per RL step, each sampled rollout.group_size times; must be a multiple of the data-parallel size."""
    template: str = "plain"
    """How a problem becomes the prompt text (non-synthetic sources): plain, chat (the tokenizer's chat template),
    boxed, chat-boxed, gsm8k, or any format string containing ``{prompt}``."""
    max_prompt_tokens: int = Field(512, ge=1)
    """Prompts longer than this many tokens after templating are dropped, with a report (non-synthetic sources)."""
    shuffle_seed: int = 0
    """Seed of the epoch-wise prompt order (each epoch shuffles anew from it); the sampler's position is saved in
    checkpoints."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed record in train_path/test_path: error = stop with an error naming file:line and the field; skip =
    drop it and count it."""
    tokenizer_dir: Optional[str] = None
    """Tokenizer directory; wins over model.tokenizer. Both null = train (and cache) the sentencepiece demo tokenizer on
    the synthetic corpus."""


class RewardConfig(_Section):
    """The verifier that turns a completion and the reference answer into a scalar reward."""

    name: str = "math"
    """Reward function: a registered name (math = answer extraction + math-verify equivalence in a sandboxed worker
    pool; exact or synthetic = exact match of the extracted, normalized answer) or a dotted path ``module:function``
    returning a RewardResult or a list of floats."""
    correct_weight: float = Field(1.0, gt=0)
    """Reward of a correct answer: reward = correct_weight * 1[correct] + format_weight * 1[format ok]. The paper's
    reference code scores 2.0 for a correct answer and 0.5 for the strict format, with algorithm.amir.margin 2.0; the
    pair margin is in reward units, so scaling the reward changes which pairs form."""
    format_weight: float = Field(0.0, ge=0)
    """Bonus for a well-formed response (an answer could be extracted): reward = correct_weight * 1[correct] +
    format_weight * 1[format ok]; 0 = correctness only."""
    style: Literal["any", "restated", "direct"] = "any"
    """A response counts as correct only if it also has this style: restated = it begins by restating the problem (its
    first word ends with '='; see data.synthetic.restate_fraction), direct = it does not; any = no requirement. The
    length-bias study's verifier variant (correctness tied to the longer or the shorter style); exact and synthetic
    rewards only."""
    answer_form: Literal["any", "number"] = "any"
    """What the extracted answer may be (math reward): any = whatever math-verify finds equal to the gold (an expression
    such as ``86 - 0`` counts for 86, a loophole a policy learns to exploit); number = it must itself be a number
    (integer, decimal, fraction, scientific notation), then compared as before. The exact and synthetic rewards compare
    normalized strings, which is already number-only for numeric gold answers."""
    timeout_s: float = Field(5.0, gt=0)
    """CPU seconds one math-verify call may take in its sandbox worker (math reward); a timeout scores 0 and is counted.
    The wall-clock limit is a multiple of it."""
    num_workers: int = Field(2, ge=1)
    """Sandbox worker processes that verify answers in parallel (math reward)."""
    memory_limit_mb: int = Field(1024, ge=64)
    """Address-space limit (RLIMIT_AS) of each sandbox worker, in MiB (math reward)."""
    max_answer_chars: int = Field(2000, ge=16)
    """Extracted answers are cut to this many characters (responses to 8 times it before extraction), so a pathological
    output cannot stall the verifier."""

    @model_validator(mode="after")
    def _style_needs_exact(self) -> "RewardConfig":
        if self.style != "any" and self.name not in ("exact", "synthetic"):
            raise _cross("reward.style", f"style={self.style!r} is implemented by the exact/synthetic reward only, "
                                         f"not {self.name!r}")
        if self.answer_form != "any" and self.name != "math":
            raise _cross("reward.answer_form", f"answer_form={self.answer_form!r} is implemented by the math reward "
                                               f"only, not {self.name!r}")
        return self


# --------------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    """The optimizer (Megatron-Core Adam), the LR schedule and the RL step loop."""

    steps: int = Field(100, ge=1)
    """RL steps (generate a rollout batch, update, sync weights); a resumed run continues to this total."""
    lr: float = Field(1e-6, ge=0)
    """Peak learning rate of Adam."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate a linear or cosine decay ends at; <= lr."""
    lr_warmup_steps: int = Field(0, ge=0)
    """RL steps of linear warm-up from 0 to lr (the schedule counts optimizer updates: this times the updates per
    step)."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay from lr to min_lr over train.steps after the warm-up (Megatron's OptimizerParamScheduler): constant, linear
    or cosine."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay of Megatron's Adam (decoupled, AdamW style), constant over the run."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1 (first-moment decay)."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """Adam beta2 (second-moment decay)."""
    adam_eps: float = Field(1e-8, gt=0)
    """Adam epsilon, added to the denominator for numerical stability."""
    clip_grad: float = Field(1.0, ge=0)
    """Clip the global gradient L2 norm to this value; 0 = no clipping."""
    global_batch_size: Optional[int] = Field(None, ge=1)
    """Sequences per optimizer update; null = the whole rollout batch (one update per step). Must divide
    prompts_per_step * group_size and be a multiple of group_size (whole groups)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass on one data-parallel rank; must divide the global batch. Gradients accumulate
    over micro-batches, and the loss does not depend on the split."""
    seed: int = 1234
    """Seed of torch, Megatron's model-parallel RNG, the rollout sampling (varied per step) and evaluation."""
    deterministic: bool = True
    """Ask torch for deterministic algorithms (``torch.use_deterministic_algorithms(True, warn_only=True)``)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: groups whose rewards are all equal (no gradient) are replaced by fresh prompts for up to
    max_sampling_rounds rounds; the batch is then filled with the remaining groups, so its size stays fixed."""
    max_sampling_rounds: int = Field(3, ge=1)
    """Generation rounds per step with dynamic_sampling, the first included."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """Stop the run after this many optimizer updates in a row with a non-finite loss or gradient (each is skipped);
    several per step with minibatches."""
    logprob_chunk_size: Optional[int] = Field(None, ge=1)
    """Tokens per chunk of the vocab-parallel log-prob and entropy computation, bounding its fp32 temporaries to [chunk,
    vocab / TP]; null = one chunk."""

    @model_validator(mode="after")
    def _lr(self) -> "TrainConfig":
        # Megatron-Core's OptimizerParamScheduler asserts max_lr >= min_lr (whatever the decay style) when the
        # trainer builds it. lr_warmup_steps >= steps is allowed: the schedule stretches its decay past the warm-up
        # (Policy), and the warm-up runner reuses the RL config with its own step count.
        if self.min_lr > self.lr:
            raise _cross("train.min_lr", f"min_lr={self.min_lr} > lr={self.lr}: the LR schedule decays from lr "
                                         "down to min_lr")
        return self


class CheckpointConfig(_Section):
    """Where and how often the training state is saved, and where a run resumes from."""

    dir: str = "runs/default/checkpoints"
    """Checkpoint root: one directory per saved step, plus ``init`` (a converted model.hf_path) and ``reference`` (the
    starting weights of a randomly initialized run)."""
    save_interval: int = Field(50, ge=1)
    """Save every this many RL steps, and at the last step."""
    keep_last: int = Field(3, ge=1)
    """Step checkpoints to keep; older ones are deleted."""
    resume: str = "auto"
    """auto = resume from the newest good checkpoint in dir, if any; none = always start fresh; otherwise the path of
    the checkpoint to resume from."""


class LoggingConfig(_Section):
    """Run directory, metrics files and console output (rank 0)."""

    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, eval.jsonl, tensorboard/, eval/ results and, by default, weight
    snapshots."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<dir>/tensorboard`` (skipped with a warning when TensorBoard is not
    installed)."""
    jsonl: bool = True
    """Append one JSON line of metrics per step to ``<dir>/metrics.jsonl``."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python logging level of the trainer."""
    progress: bool = True
    """Show progress bars (training, warm-up, evaluation)."""


class EvalConfig(_Section):
    """Held-out evaluation during training, on the data section's test problems (rank 0)."""

    interval: int = Field(0, ge=0)
    """Evaluate every this many RL steps; 0 = never during training (``megatron-amir train --eval-at-end`` /
    ``--eval-at-start`` evaluate the final / starting weights)."""
    samples: int = Field(4, ge=1)
    """Completions sampled per problem (the k of pass@k and maj@k)."""
    temperature: float = Field(1.0, ge=0)
    """Temperature of the sampled evaluation (0 = greedy)."""
    greedy: bool = True
    """Also evaluate greedily (temperature 0, one sample per problem) and report greedy accuracy."""
    max_problems: Optional[int] = Field(None, ge=1)
    """Evaluate on the first this many held-out problems; null = all."""
    max_new_tokens: Optional[int] = Field(None, ge=1)
    """Completion length limit of evaluation; null = rollout.max_new_tokens."""


# --------------------------------------------------------------------------------------------- lora
class LoRAConfig(_Section):
    """LoRA adapters on the policy's Megatron layers (megatron_amir.model.lora; docs/lora.md). With enabled=true
    the base weights are frozen, only the adapters train, and the reference policy is the base model."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights (base frozen, adapters alone in the optimizer)."""
    rank: int = Field(16, ge=1)
    """r, the inner dimension of the adapters A [r, in] and B [out, r]."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the adapter output is multiplied by alpha / rank (the paper's reference code: alpha = rank =
    16)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability on the adapter's input (training only)."""
    target_modules: list[Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]] = Field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], min_length=1)
    """Megatron linear layers that get adapters (HF names: q/k/v_proj, o_proj, gate/up_proj, down_proj)."""

    @model_validator(mode="after")
    def _targets(self) -> "LoRAConfig":
        if len(set(self.target_modules)) != len(self.target_modules):
            raise _cross("lora.target_modules", f"a module is listed twice: {self.target_modules}")
        return self


class Config(_Section):
    """A whole run: one sub-section per concern. Load with ``load_config(path, overrides)``."""

    name: str = "run"
    """Run label, written with the resolved config to ``<logging.dir>/config.yaml`` (not used to name files or
    directories)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy architecture and where its starting weights come from."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """Advantages, policy loss, KL and the AMIR pair term."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Sampling engine and its parameters."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and held-out problems."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """The verifier that scores completions."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimizer, schedule, batch sizes, step loop."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Run directory and metrics."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation during training."""
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    """LoRA adapters on the policy (off by default: full fine-tuning)."""

    @property
    def rollout_batch_size(self) -> int:
        """Sequences generated per RL step: prompts_per_step * G."""
        return self.data.prompts_per_step * self.rollout.group_size

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        m, p, t = self.model, self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if m.num_attention_heads % tp:
            raise _cross("parallel.tensor_model_parallel_size",
                         f"TP={tp} must divide model.num_attention_heads={m.num_attention_heads}")
        if m.num_kv_heads % tp:
            raise _cross("parallel.tensor_model_parallel_size",
                         f"TP={tp} must divide model.num_kv_heads={m.num_kv_heads}")
        if m.num_layers % pp:
            raise _cross("parallel.pipeline_model_parallel_size",
                         f"PP={pp} must divide model.num_layers={m.num_layers}")
        if p.sequence_parallel and tp < 2:
            # Megatron-Core's ModelParallelConfig raises at model build otherwise (after data setup and process
            # groups). Checked here, not in ParallelConfig, so a bare ParallelConfig stays constructible.
            raise _cross("parallel.sequence_parallel",
                         f"sequence_parallel=true needs tensor_model_parallel_size > 1 (got {tp}): "
                         "it splits the sequence over the TP ranks")
        gbs = t.global_batch_size or self.rollout_batch_size
        if gbs % t.micro_batch_size:
            raise _cross("train.micro_batch_size",
                         f"micro_batch_size={t.micro_batch_size} must divide global batch size {gbs} sequences")
        if self.rollout_batch_size % gbs:
            raise _cross("train.global_batch_size",
                         f"global_batch_size={gbs} must divide the rollout batch "
                         f"prompts_per_step*group_size={self.rollout_batch_size}")
        if gbs % self.rollout.group_size:
            raise _cross("train.global_batch_size",
                         f"global_batch_size={gbs} must be a multiple of rollout.group_size="
                         f"{self.rollout.group_size} so every optimizer step sees whole groups")
        if self.algorithm.loss_agg_mode == "seq-mean-token-sum-norm" and self.algorithm.loss_agg_max_len is None:
            raise _cross("algorithm.loss_agg_max_len", "seq-mean-token-sum-norm needs algorithm.loss_agg_max_len")
        if self.data.source in ("jsonl", "parquet") and not self.data.train_path:
            raise _cross("data.train_path", f"data.source={self.data.source} needs data.train_path")
        if self.data.source == "benchmark" and not self.data.benchmark:
            raise _cross("data.benchmark", "data.source=benchmark needs data.benchmark")
        if m.fp8 and m.transformer_impl == "local":
            raise _cross("model.fp8", "FP8 needs model.transformer_impl=transformer_engine or auto")
        if self.rollout.async_off_policy and self.algorithm.tis_cap is None:
            raise _cross("algorithm.tis_cap",
                         "rollout.async_off_policy=true needs algorithm.tis_cap (e.g. 2.0): samples come from an older "
                         "policy and the truncated behaviour-policy weight is the off-policy correction")
        if self.rollout.fp8_rollout and self.algorithm.tis_cap is None:
            # FP8 rollouts sample from a quantized policy: the mismatch TIS corrects is large, so it is on by default
            if "tis_cap" in self.algorithm.model_fields_set:
                raise _cross("algorithm.tis_cap", "rollout.fp8_rollout=true needs algorithm.tis_cap (FP8 rollouts "
                                                  "sample from a quantized policy; TIS corrects the mismatch)")
            self.algorithm.tis_cap = FP8_DEFAULT_TIS_CAP
        if self.rollout.fp8_rollout and self.rollout.engine == "vllm":
            # vLLM's block FP8 layers need every merged or tensor-parallel part whole blocks (validate_fp8_block_shape)
            unit = 128 * self.rollout.vllm_tensor_parallel_size
            widths = {"model.num_attention_heads": m.num_attention_heads * m.kv_channels,
                      "model.num_kv_heads": m.num_kv_heads * m.kv_channels,
                      "model.ffn_hidden_size": m.ffn_hidden_size}
            for key, width in widths.items():
                if width % unit:
                    raise _cross(key, f"rollout.fp8_rollout with rollout.engine=vllm needs widths divisible by {unit} "
                                      f"(128 × vllm_tensor_parallel_size): this one is {width}")
        if self.rollout.engine == "remote" and not (self.rollout.servers or self.rollout.discovery_file):
            raise _cross("rollout.servers", "rollout.engine=remote needs rollout.servers or rollout.discovery_file")
        return self


FP8_DEFAULT_TIS_CAP = 2.0


class _CrossFieldError(ValueError):
    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key = key


def _cross(key: str, msg: str) -> _CrossFieldError:
    return _CrossFieldError(key, msg)


# --------------------------------------------------------------------------------------------- loading
def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names valid at the nested location ``path`` (for the did-you-mean hint)."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-after")))
        key = ".".join(str(x) for x in loc)
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _CrossFieldError):
            lines.append(f"  {ctx_err}")
            continue
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"  {key}: unknown key{hint} (allowed: {', '.join(known)})")
            continue
        msg = e["msg"]
        if e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key or '<root>'}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


class _YamlLoader(yaml.SafeLoader):
    """The one YAML loader for config files and override values, so ``lr: 1e-5`` in a file and ``train.lr=1e-5``
    on the command line give the same value. Its rules are those OmegaConf's dotlist parser applied to overrides
    before (YAML 1.1 safe loading, plus): ``1e-5``/``1.0e5`` are floats (plain YAML 1.1 reads them as strings, which
    only a float-typed field turned back into numbers: a free-form field such as ``model.rope_scaling`` kept the
    string), dates stay strings (a ``datetime.date`` cannot go into OmegaConf), and a key given twice in one mapping
    is an error (in a file, a second ``train:`` section silently replaced the first)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node):
        # before the merge keys (<<) are expanded, which may legitimately repeat keys given explicitly
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)  # the value: `1` and `01`, `true` and `yes` are one key
                if key in seen:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key_node.value!r}",
                                                            key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


_FLOAT_RE = re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)  # OmegaConf's float pattern (its override parser's)
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    """YAML text (a config file, or one override value) as plain data, by the rules of ``_YamlLoader``."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (YAML; None = defaults), apply ``a.b=c`` overrides, validate.

    The file and the override values are parsed by the same loader (``parse_yaml``): ``train.lr=1e-5`` is the
    float it is in a file, ``rollout.servers=[http://a:1]`` a list.
    """
    source = str(path) if path else "<defaults>"
    raw: Any = {}
    if path:
        try:
            raw = parse_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, binary junk
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except yaml.YAMLError as exc:  # carries line/column
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level (got {type(raw).__name__})")
    data = apply_overrides(raw, overrides)
    return config_from_dict(data, source + (f" with overrides {overrides}" if overrides else ""))


def apply_overrides(raw: dict[str, Any], overrides: Optional[list[str]]) -> dict[str, Any]:
    """``key.path=value`` overrides on plain config data. A value REPLACES what is there (a dict given for
    ``model.rope_scaling`` is not merged into the file's). Values are parsed by ``parse_yaml``, as config files
    are. Bad syntax raises ConfigError naming the override."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf = OmegaConf.create(raw)
    except OmegaConfBaseException as exc:  # a value OmegaConf cannot hold (e.g. a !!set)
        raise ConfigError(f"config data OmegaConf cannot hold: {exc}") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.path=value")
        key, text = ov.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(text)
            OmegaConf.update(conf, key, value, merge=False, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"cannot apply override {ov!r}: {exc}") from None
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot apply overrides {overrides}: {exc}") from None


def config_record(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data for files and logs (run dirs, checkpoints, ``config show``), with the
    rollout bearer token left out: a secret must not land in shared files (runs read $MEGATRON_AMIR_TOKEN)."""
    data = cfg.model_dump(mode="json")
    if data.get("rollout", {}).get("token") is not None:
        data["rollout"]["token"] = None
    return data


class _YamlDumper(yaml.SafeDumper):
    """Quotes every string ``_YamlLoader`` would read as a float (``'1e5'``, a short git hash ``'4520e81'``), so
    a dumped config loads back unchanged."""


_YamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def dump_config(cfg: Config) -> str:
    return yaml.dump(config_record(cfg), Dumper=_YamlDumper, sort_keys=False)


# --------------------------------------------------------------------------------------------- reference
REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python -m megatron_amir.config"
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _sections(model: type[BaseModel] = Config, path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(key path, section model) for ``model`` and every section below it, depth first in field order."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            out += _sections(field.annotation, f"{path}.{name}" if path else name)
    return out


def undocumented_fields(model: type[BaseModel] = Config) -> list[str]:
    """Key paths of the fields, in every section, that have no description."""
    return [f"{path}.{name}" if path else name
            for path, section in _sections(model)
            for name, field in section.model_fields.items()
            if not (field.description or "").strip()]


def _type_text(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        kinds = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is list:
        inner = args[0]
        return f"list of ({', '.join(map(str, get_args(inner)))})" if get_origin(inner) is Literal else \
            f"list of {_type_text(inner)}"
    if origin is dict:
        return "mapping"
    if _is_section(ann):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _field_type(field: Any) -> str:
    text = _type_text(field.annotation)
    for meta in field.metadata:  # the validation bounds, as annotated_types objects (Ge(ge=1), MinLen(...))
        for attr, sign in _BOUNDS.items():
            if getattr(meta, attr, None) is not None:
                text += f", {sign} {getattr(meta, attr)}"
        if getattr(meta, "min_length", None) is not None:
            text += f", at least {meta.min_length} item(s)"
    return text


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def config_reference(model: type[BaseModel] = Config) -> str:
    """docs/config.md: one table per section (key path, type, default, description), in field order. Raises
    ConfigError naming every field without a description."""
    missing = undocumented_fields(model)
    if missing:
        raise ConfigError(f"config fields without a description (add a docstring under each in "
                          f"megatron_amir/config.py): {', '.join(missing)}")
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated from megatron_amir/config.py; do not edit: run `" + REGENERATE + "` -->",
        "",
        "Every key of a run config, generated from the typed sections in "
        "[megatron_amir/config.py](../megatron_amir/config.py) by `" + REGENERATE + "` (or `megatron-amir config "
        "docs`); a test fails when this file is out of date. Keys are dotted YAML paths: set them in a config file "
        "([configs/](../configs/)) or as `key.path=value` overrides (`megatron-amir train CONFIG train.lr=1e-5`). "
        "`null` is YAML's null (unset). Unknown keys and out-of-range values are rejected at load, naming the key.",
    ]
    for path, section in _sections(model):
        lines += ["", f"## {path or 'top level'}", ""]
        if section.__doc__ and section.__doc__ is not BaseModel.__doc__:
            lines += [_cell(section.__doc__), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in section.model_fields.items():
            key = f"{path}.{name}" if path else name
            if _is_section(field.annotation):
                default = f"see [{key}](#{key.replace('.', '')})"
            else:
                default = "`" + json.dumps(field.get_default(call_default_factory=True)) + "`"
            lines.append(f"| `{key}` | {_cell(_field_type(field))} | {default} | {_cell(field.description)} |")
    return "\n".join(lines) + "\n"


def reference_arguments() -> argparse.ArgumentParser:
    """The options of the reference generator (shared by ``python -m megatron_amir.config`` and the CLI)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=str(REFERENCE_PATH), help="where to write it (default: docs/config.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the file differs from what would be generated")
    return p


def write_reference(out: str | Path, check: bool = False) -> int:
    """Write the reference to ``out`` atomically, or with ``check`` compare it; returns the exit code."""
    from megatron_amir.fileio import atomic_write_text

    text, out = config_reference(), Path(out)
    if check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            print(f"{out} is {'missing' if current is None else 'out of date'}; regenerate it with `{REGENERATE}`",
                  file=sys.stderr)
            return 1
        return 0
    atomic_write_text(out, text)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=REGENERATE, parents=[reference_arguments()],
                                description="Generate the config reference (docs/config.md) from the config sections.")
    args = p.parse_args(argv)
    try:
        return write_reference(args.out, check=args.check)
    except ConfigError as exc:
        print(f"{REGENERATE}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from megatron_amir.config import main as _main  # the imported module's classes, not a second __main__ copy

    sys.exit(_main())
