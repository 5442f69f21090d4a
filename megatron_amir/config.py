"""Typed configuration: one pydantic model per section, loaded from YAML with ``a.b=c`` overrides.

Loading (``load_config``) parses the file and every override value with one YAML loader (``_YamlLoader``),
merges with OmegaConf and validates with pydantic, so every error names the key path
(``algorithm.clip_eps_low``) and, for unknown keys, suggests the closest known one. Cross-field rules (TP divides
heads, PP divides layers, micro-batch divides global batch, min <= max pairs, ...) run at load, before any work
starts, and name the full dotted path of the field they blame (``data.synthetic.min_digits``).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    """Architecture of the policy (a Megatron-Core GPTModel). Field names follow HF config.json where possible."""

    arch: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"
    vocab_size: int = Field(512, ge=1)  # rows of the embedding (may be padded beyond the tokenizer)
    real_vocab_size: Optional[int] = Field(
        None, ge=1, description="ids >= this are padding rows, never sampled (default: the tokenizer's size)"
    )
    hidden_size: int = Field(64, ge=1)
    ffn_hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: Optional[int] = Field(None, ge=1, description="default hidden_size // num_attention_heads")
    max_position_embeddings: int = Field(2048, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: Optional[dict[str, Any]] = None  # HF-style, e.g. llama3 {"factor": 8, ...}
    norm_eps: float = Field(1e-5, gt=0)
    tie_word_embeddings: bool = False
    qkv_bias: Optional[bool] = None  # default: True for qwen2, False otherwise
    qk_norm: Optional[bool] = None  # default: True for qwen3, False otherwise
    init_method_std: float = Field(0.02, gt=0)
    # where the starting weights come from (ignored when resuming): hf_path = a Hugging Face model directory,
    # converted once into <checkpoint.dir>/init; load = a megatron-amir checkpoint (as --init-from, which wins);
    # neither = random init. The section must describe that model (checked field by field at start).
    hf_path: Optional[str] = None
    load: Optional[str] = None
    tokenizer: Optional[str] = None  # HF tokenizer dir; None = the tokenizer of the data section
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False

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
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    # data-parallel size is world_size / (TP * PP), derived at start-up
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    use_distributed_optimizer: bool = False
    sequence_parallel: bool = False


# --------------------------------------------------------------------------------------------- algorithm
class AmirConfig(_Section):
    """The AMIR pairwise regularizer (DESIGN.md section 1). enabled=false gives plain GRPO."""

    enabled: bool = True
    beta: float = Field(0.2, gt=0)
    margin: float = Field(0.5, ge=0, description="pair (w, l) only when r_w - r_l > margin")
    pair_mode: Literal["all", "top"] = "all"
    max_pairs_per_group: Optional[int] = Field(None, ge=1)
    logprob_norm: Literal["mean", "sum"] = "mean"  # mean = length-normalized (paper)
    reference_anchored: bool = False  # subtract the reference policy's normalized log-prob
    lambda_init: float = Field(0.01, ge=0)
    adaptive_lambda: bool = True
    lambda_min: float = Field(0.005, ge=0)
    lambda_max: float = Field(0.05, ge=0)
    ratio_low: float = Field(0.30, ge=0)
    ratio_high: float = Field(0.70, ge=0)
    lambda_up: float = Field(1.25, gt=1)
    lambda_down: float = Field(0.8, gt=0, lt=1)

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
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    adv_eps: float = Field(1e-6, gt=0)
    whiten_rewards: bool = False
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float = Field(0.2, gt=0)
    dual_clip_c: Optional[float] = Field(None, gt=1)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    loss_agg_max_len: Optional[int] = Field(None, ge=1, description="constant of seq-mean-token-sum-norm")
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False
    reference_offload: bool = Field(False, description="keep the reference policy (KL, reference-anchored pairs) in "
                                    "host memory; it is copied to the device only for its log-prob pass")
    tis_cap: Optional[float] = Field(None, gt=0, description="truncated importance sampling cap (rollout vs trainer)")
    ppo_epochs: int = Field(1, ge=1)
    amir: AmirConfig = Field(default_factory=AmirConfig)


# --------------------------------------------------------------------------------------------- rollout
class RolloutConfig(_Section):
    engine: Literal["embedded", "vllm", "remote"] = "embedded"
    group_size: int = Field(8, ge=2, description="G, rollouts per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(128, ge=1)
    servers: list[str] = Field(default_factory=list)  # http://host:port
    discovery_file: Optional[str] = None
    use_router: bool = True
    router_policy: Literal["round_robin", "power_of_two", "cache_aware", "random"] = "round_robin"
    token: Optional[str] = None  # bearer token for state-changing routes; default from $MEGATRON_AMIR_TOKEN
    request_timeout_s: float = Field(300.0, gt=0)
    weight_sync: Literal["file", "nccl"] = "file"
    weight_sync_dir: Optional[str] = None
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    fp8_rollout: bool = False
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    async_off_policy: bool = False  # reserved: must stay false (the trainer samples with its current weights)
    max_staleness: int = Field(0, ge=0, description="a sample older than this many weight versions stops the step")

    @model_validator(mode="after")
    def _weight_sync_wired(self) -> "RolloutConfig":
        # the trainer syncs through weight_sync snapshots only; a value it would silently ignore is refused
        if self.weight_sync != "file":
            raise _cross("rollout.weight_sync",
                         f"weight_sync={self.weight_sync!r} is not wired into the trainer (it syncs through "
                         "weight_sync snapshots loaded with collective_rpc); use weight_sync: file")
        return self

    @model_validator(mode="after")
    def _synchronous(self) -> "RolloutConfig":
        if self.async_off_policy:
            raise _cross("rollout.async_off_policy",
                         "async_off_policy=true is not implemented: the trainer is synchronous (every step "
                         "samples with the current weights; TIS corrects engine/trainer numerics, tis_cap)")
        return self


# --------------------------------------------------------------------------------------------- data / reward
class SyntheticTaskConfig(_Section):
    kinds: list[Literal["add", "sub", "mul", "linear", "word"]] = Field(
        default_factory=lambda: ["add", "mul"], min_length=1)
    min_digits: int = Field(2, ge=1)
    max_digits: int = Field(3, ge=1)
    num_train: int = Field(4000, ge=1)
    num_test: int = Field(300, ge=1)
    seed: int = 1234

    @model_validator(mode="after")
    def _digits(self) -> "SyntheticTaskConfig":
        # synthetic.make_splits would raise on this only at data setup, on every rank
        if self.min_digits > self.max_digits:
            raise _cross("data.synthetic.min_digits",
                         f"min_digits={self.min_digits} > max_digits={self.max_digits}")
        return self


class DataConfig(_Section):
    source: Literal["synthetic", "jsonl", "parquet", "benchmark"] = "synthetic"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    benchmark: Optional[str] = None  # math500 | aime24 | aime25 | amc23 | gsm8k | minerva | olympiadbench
    synthetic: SyntheticTaskConfig = Field(default_factory=SyntheticTaskConfig)
    prompts_per_step: int = Field(16, ge=1)
    template: str = "plain"  # plain | chat | a template name from megatron_amir.data.templates
    max_prompt_tokens: int = Field(512, ge=1)
    shuffle_seed: int = 0
    on_bad_record: Literal["error", "skip"] = "error"
    tokenizer_dir: Optional[str] = None  # None: train/cache the sentencepiece demo tokenizer


class RewardConfig(_Section):
    name: str = "math"  # registry name or dotted path module:function
    format_weight: float = Field(0.0, ge=0)
    timeout_s: float = Field(5.0, gt=0)
    num_workers: int = Field(2, ge=1)
    memory_limit_mb: int = Field(1024, ge=64)
    max_answer_chars: int = Field(2000, ge=16)


# --------------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="sequences per optimizer step (default: the whole rollout batch)"
    )
    micro_batch_size: int = Field(8, ge=1)
    seed: int = 1234
    deterministic: bool = True
    dynamic_sampling: bool = False
    max_sampling_rounds: int = Field(3, ge=1)
    max_consecutive_nonfinite: int = Field(3, ge=1, description="optimizer updates in a row (several per step with minibatches)")
    logprob_chunk_size: Optional[int] = Field(None, ge=1, description="sequence chunk for vocab-parallel log-probs")

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
    dir: str = "runs/default/checkpoints"
    save_interval: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: str = "auto"  # auto | none | a checkpoint directory


class LoggingConfig(_Section):
    dir: str = "runs/default"
    tensorboard: bool = True
    jsonl: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress: bool = True


class EvalConfig(_Section):
    interval: int = Field(0, ge=0)  # 0 = only at the end
    samples: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    greedy: bool = True
    max_problems: Optional[int] = Field(None, ge=1)
    max_new_tokens: Optional[int] = Field(None, ge=1)


class Config(_Section):
    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

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
        if self.rollout.engine == "remote" and not (self.rollout.servers or self.rollout.discovery_file):
            raise _cross("rollout.servers", "rollout.engine=remote needs rollout.servers or rollout.discovery_file")
        return self


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
