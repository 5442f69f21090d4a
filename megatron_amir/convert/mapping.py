"""The one HF <-> Megatron-Core name/layout mapping (converters and trainer -> rollout weight sync use it).

A model family is a small declarative table of ``ParamMapping`` objects (idea from Megatron-Bridge's
``param_mapping.py``; written here from scratch). Each mapping ties one Megatron-Core GPTModel parameter to
one or more Hugging Face tensors and knows how to move between the two layouts:

- ``DirectMapping``   same tensor, new name (norms, ``o_proj`` -> ``linear_proj``, ``down_proj`` -> ``linear_fc2``).
- ``VocabMapping``    embedding / output layer: rows padded with zeros to the padded vocabulary on import,
                      padding rows removed on export.
- ``QKVMapping``      separate q/k/v (weights or biases) <-> fused ``linear_qkv`` in Megatron's grouped layout.
- ``GatedMLPMapping`` ``gate_proj`` and ``up_proj`` <-> ``linear_fc1`` = cat([gate; up], dim 0).

Layouts (nh = attention heads, ng = query groups = KV heads, d = head dim, H = hidden):

    HF      q [nh*d, H], k [ng*d, H], v [ng*d, H]
    mcore   linear_qkv [ng * (nh/ng + 2) * d, H], ordered per query group g:
            [q heads g*nh/ng ... (g+1)*nh/ng - 1, k_g, v_g]

Tensor parallelism: Megatron splits column-parallel weights (linear_qkv, linear_fc1, embedding, output layer)
into TP contiguous blocks of dim 0 and row-parallel ones (linear_proj, linear_fc2) along dim 1; norms are
replicated. Because TP divides ng, a TP rank's linear_qkv block holds whole query groups, so the same
``to_hf`` applied to one rank's shard yields that rank's contiguous slice (dim 0) of each of q, k, v; a rank's
linear_fc1 block is cat([gate_r; up_r]) (Megatron's swiglu sharding), so ``to_hf`` yields gate_r and up_r.
Concatenating the per-rank HF pieces along ``tp_axis`` in rank order gives the full HF tensor
(``gather_tp_shards``). Pipeline stages number their layers locally from 0; pass ``layer_offset``
(first global layer of the stage) to get global HF names.

Megatron names differ between the local layer spec and the Transformer Engine spec only in the two
pre-norms, which TE fuses into the following linear layer (``TE_FUSED_NORMS``); both spellings are accepted
on the way in, ``spec`` picks the spelling on the way out.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from megatron_amir.config import ModelConfig

LAYER = "{L}"  # placeholder for the layer index in name templates

# local-spec name -> Transformer-Engine-spec name (TE fuses the pre-norm into the next linear layer)
TE_FUSED_NORMS = {
    "decoder.layers.{L}.input_layernorm.weight": "decoder.layers.{L}.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.{L}.pre_mlp_layernorm.weight": "decoder.layers.{L}.mlp.linear_fc1.layer_norm_weight",
}
SPECS = ("local", "te")
TIED_HF_OUTPUT = "lm_head.weight"
HF_DERIVED_SUFFIX = ".rotary_emb.inv_freq"


class MappingError(ValueError):
    """A tensor does not fit the mapping (unknown name, wrong shape, missing piece); the message names it."""


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple * tp`` >= vocab_size (Megatron's make-vocab-size-divisible-by rule)."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape(LAYER), r"(\d+)") + "$")


def _fill(template: str, layer: Optional[int]) -> str:
    return template.replace(LAYER, str(layer)) if LAYER in template else template


def _check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise MappingError(f"shape mismatch for tensor '{name}': got {tuple(t.shape)}, expected {tuple(shape)}")


# ------------------------------------------------------------------------------------------------ mappings
@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter <-> HF tensor(s). ``mcore`` / ``hf`` are name templates with ``{L}``."""

    mcore: str
    hf: tuple[str, ...]
    tp_axis: Optional[int] = None  # Megatron's TP split dim (also the HF pieces' split dim); None = replicated

    def hf_shapes(self, cfg: ModelConfig, vocab_size: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def to_mcore(self, tensors: Sequence[torch.Tensor], cfg: ModelConfig, vocab_size: int) -> torch.Tensor:
        """HF tensors (in ``hf`` order, full size) -> the full (TP-gathered) Megatron tensor."""
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        """Megatron tensor, full or one TP rank's shard -> HF tensors in ``hf`` order (shards likewise).

        Vocabulary padding is not removed here (a shard cannot know); see ``strip_vocab``.
        """
        raise NotImplementedError

    def mcore_rows(self, cfg: ModelConfig, vocab_size: int) -> list[tuple[Optional[int], int, int]]:
        """``to_mcore`` as a list of row ranges: (HF piece index or None for zero rows, first row, row count).

        Concatenating those dim-0 rows in order gives the full Megatron tensor (a 1-D tensor has one element
        per row), so a writer can copy the bytes straight from the HF files without building the tensor.
        """
        raise NotImplementedError

    def tp_shard(self, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """TP rank ``rank``'s block of the full Megatron tensor, as that rank's module holds it."""
        if self.tp_axis is None:
            return tensor
        return tensor.chunk(tp, dim=self.tp_axis)[rank]

    def mcore_name(self, spec: str = "local") -> str:
        if spec not in SPECS:
            raise ValueError(f"unknown layer spec {spec!r}; expected one of {SPECS}")
        return TE_FUSED_NORMS.get(self.mcore, self.mcore) if spec == "te" else self.mcore

    def mcore_param(self, layer: Optional[int], spec: str = "local") -> str:
        """The concrete Megatron parameter name of ``layer`` (None for non-layer tensors)."""
        return _fill(self.mcore_name(spec), layer)

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore


@dataclass(frozen=True)
class DirectMapping(ParamMapping):
    """Same tensor under another name."""

    shape: Callable[[ModelConfig], tuple[int, ...]] = field(default=lambda cfg: ())

    def hf_shapes(self, cfg, vocab_size):
        return [self.shape(cfg)]

    def to_mcore(self, tensors, cfg, vocab_size):
        (t,) = tensors
        return t

    def mcore_rows(self, cfg, vocab_size):
        shape = self.shape(cfg)
        return [(0, 0, shape[0] if shape else 1)]

    def to_hf(self, tensor, cfg):
        return [tensor]


@dataclass(frozen=True)
class VocabMapping(ParamMapping):
    """Embedding / output rows [vocab, H]: zero rows appended up to ``cfg.vocab_size`` (the padded size).

    Zero rows give padded tokens logit 0; consumers computing softmax over the padded vocabulary must mask
    rows >= the original vocabulary size (recorded in the checkpoint metadata).
    """

    tp_axis: Optional[int] = 0

    def hf_shapes(self, cfg, vocab_size):
        return [(vocab_size, cfg.hidden_size)]

    def to_mcore(self, tensors, cfg, vocab_size):
        (t,) = tensors
        pad = cfg.vocab_size - t.shape[0]
        if pad < 0:
            raise MappingError(f"'{self.hf[0]}' has {t.shape[0]} rows > padded vocab size {cfg.vocab_size}")
        if pad == 0:
            return t
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)

    def mcore_rows(self, cfg, vocab_size):
        rows = [(0, 0, vocab_size)]
        return rows + [(None, 0, cfg.vocab_size - vocab_size)] if cfg.vocab_size > vocab_size else rows

    def to_hf(self, tensor, cfg):
        return [tensor]


def strip_vocab(tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop padding rows of a full (TP-gathered) embedding / output tensor."""
    return tensor[:vocab_size]


@dataclass(frozen=True)
class QKVMapping(ParamMapping):
    """q, k, v projections (weights [*, H] or biases [*]) <-> Megatron's grouped ``linear_qkv``.

    mcore = stack over groups g of [q_g (nh/ng heads); k_g; v_g], each head d rows.
    """

    tp_axis: Optional[int] = 0

    def hf_shapes(self, cfg, vocab_size):
        d, tail = cfg.kv_channels, self._tail(cfg)
        return [(cfg.num_attention_heads * d, *tail), (cfg.num_kv_heads * d, *tail), (cfg.num_kv_heads * d, *tail)]

    def _tail(self, cfg) -> tuple[int, ...]:
        return () if self.mcore.endswith(".bias") else (cfg.hidden_size,)

    def to_mcore(self, tensors, cfg, vocab_size):
        q, k, v = tensors
        ng, d = cfg.num_kv_heads, cfg.kv_channels
        per_group = cfg.num_attention_heads // ng
        tail = q.shape[1:]
        qkv = torch.cat(
            [q.reshape(ng, per_group, d, *tail), k.reshape(ng, 1, d, *tail), v.reshape(ng, 1, d, *tail)], dim=1
        )
        return qkv.reshape(ng * (per_group + 2) * d, *tail)

    def mcore_rows(self, cfg, vocab_size):
        ng, d = cfg.num_kv_heads, cfg.kv_channels
        per_group = cfg.num_attention_heads // ng
        q_rows = per_group * d
        return [row for g in range(ng) for row in ((0, g * q_rows, q_rows), (1, g * d, d), (2, g * d, d))]

    def to_hf(self, tensor, cfg):
        d = cfg.kv_channels
        per_group = cfg.num_attention_heads // cfg.num_kv_heads
        tail = tensor.shape[1:]
        rows = (per_group + 2) * d
        if tensor.shape[0] % rows:
            raise MappingError(
                f"'{self.mcore}' has {tensor.shape[0]} rows, not a multiple of (heads/groups + 2) * head_dim = {rows}"
            )
        grouped = tensor.reshape(-1, per_group + 2, d, *tail)  # [groups on this shard, per_group + 2, d, ...]
        q, k, v = grouped.split([per_group, 1, 1], dim=1)
        return [x.reshape(-1, *tail).contiguous() for x in (q, k, v)]


@dataclass(frozen=True)
class GatedMLPMapping(ParamMapping):
    """gate_proj [F, H] and up_proj [F, H] <-> linear_fc1 = cat([gate; up]) [2F, H] (per TP shard as well)."""

    tp_axis: Optional[int] = 0

    def hf_shapes(self, cfg, vocab_size):
        return [(cfg.ffn_hidden_size, cfg.hidden_size)] * 2

    def to_mcore(self, tensors, cfg, vocab_size):
        gate, up = tensors
        return torch.cat([gate, up], dim=0)

    def mcore_rows(self, cfg, vocab_size):
        return [(0, 0, cfg.ffn_hidden_size), (1, 0, cfg.ffn_hidden_size)]

    def tp_shard(self, tensor, rank, tp):
        # Megatron's swiglu layout per rank: cat([gate_r; up_r]), not rows [r*2F/tp, (r+1)*2F/tp) of the full one.
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)

    def to_hf(self, tensor, cfg):
        if tensor.shape[0] % 2:
            raise MappingError(f"'{self.mcore}' has an odd number of rows {tensor.shape[0]}; expected [gate; up]")
        gate, up = tensor.chunk(2, dim=0)
        return [gate.contiguous(), up.contiguous()]


# ------------------------------------------------------------------------------------------------ tables
_H = lambda cfg: (cfg.hidden_size,)  # noqa: E731
_D = lambda cfg: (cfg.kv_channels,)  # noqa: E731


def decoder_table(*, qkv_bias: bool, qk_norm: bool, tied: bool) -> list[ParamMapping]:
    """The Llama-style decoder shared by every supported family; flags add the optional tensors."""
    p, m = "model.layers.{L}.", "decoder.layers.{L}."
    table: list[ParamMapping] = [
        VocabMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        DirectMapping(m + "input_layernorm.weight", (p + "input_layernorm.weight",), shape=_H),
        QKVMapping(m + "self_attention.linear_qkv.weight",
                   tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")),
        DirectMapping(m + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), tp_axis=1,
                      shape=lambda c: (c.hidden_size, c.num_attention_heads * c.kv_channels)),
        DirectMapping(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), shape=_H),
        GatedMLPMapping(m + "mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
        DirectMapping(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), tp_axis=1,
                      shape=lambda c: (c.hidden_size, c.ffn_hidden_size)),
        DirectMapping("decoder.final_layernorm.weight", ("model.norm.weight",), shape=_H),
    ]
    if qkv_bias:
        table.append(QKVMapping(m + "self_attention.linear_qkv.bias",
                                tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")))
    if qk_norm:
        table.append(DirectMapping(m + "self_attention.q_layernorm.weight", (p + "self_attn.q_norm.weight",), shape=_D))
        table.append(DirectMapping(m + "self_attention.k_layernorm.weight", (p + "self_attn.k_norm.weight",), shape=_D))
    if not tied:
        table.append(VocabMapping("output_layer.weight", ("lm_head.weight",)))
    return table


@dataclass(frozen=True)
class Family:
    """A supported HF architecture: names, HF config checks and config.json extras, and its table."""

    arch: str  # ModelConfig.arch
    hf_architectures: tuple[str, ...]  # config.json "architectures"
    hf_model_type: str  # config.json "model_type"
    hf_config_class: str  # transformers class that fills config defaults
    check_hf_config: Callable[[dict], None] = lambda cfg: None  # raise ValueError on unsupported features
    hf_config_extras: Callable[[ModelConfig], dict] = lambda cfg: {}  # family keys for config.json

    def table(self, cfg: ModelConfig) -> list[ParamMapping]:
        return decoder_table(qkv_bias=cfg.use_qkv_bias, qk_norm=cfg.use_qk_norm, tied=cfg.tie_word_embeddings)


FAMILIES: dict[str, Family] = {}
_FAMILY_MODULES = ("llama", "qwen2", "qwen3", "mistral")


def register_family(family: Family) -> Family:
    FAMILIES[family.arch] = family
    return family


def _load_families() -> None:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"megatron_amir.convert.{mod}")


def supported_architectures() -> list[str]:
    _load_families()
    return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_arch(arch: str) -> Family:
    _load_families()
    if arch not in FAMILIES:
        raise ValueError(f"unsupported model.arch {arch!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[arch]


def family_for_hf_config(config: dict) -> Family:
    """Pick the family from config.json ``architectures`` (or ``model_type``)."""
    _load_families()
    archs = config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs) or (not archs and config.get("model_type") == fam.hf_model_type):
            return fam
    got = archs or config.get("model_type")
    raise ValueError(f"unsupported architecture {got!r}; supported: {', '.join(supported_architectures())}")


# ------------------------------------------------------------------------------------------------ lookups
@dataclass
class ModelMapping:
    """The mapping table of one model, with name lookups both ways."""

    cfg: ModelConfig
    table: list[ParamMapping]

    def __post_init__(self):
        self._by_mcore = []
        for mp in self.table:
            for spec in SPECS:
                self._by_mcore.append((_template_regex(mp.mcore_name(spec)), mp))
        self._by_hf = {}
        for mp in self.table:
            for i, h in enumerate(mp.hf):
                self._by_hf[h] = (mp, i)
        self._hf_regex = [(_template_regex(h), h) for h in self._by_hf]

    def layers(self) -> range:
        return range(self.cfg.num_layers)

    def find_mcore(self, name: str) -> tuple[ParamMapping, Optional[int]]:
        """Mapping and layer index of a concrete Megatron name (local or TE spelling)."""
        for rx, mp in self._by_mcore:
            mt = rx.match(name)
            if mt:
                return mp, (int(mt.group(1)) if mt.groups() else None)
        raise MappingError(f"no mapping for Megatron parameter '{name}' (arch {self.cfg.arch})")

    def find_hf(self, name: str) -> tuple[ParamMapping, int, Optional[int]]:
        """Mapping, position in its ``hf`` tuple, and layer index of a concrete HF name."""
        for rx, tmpl in self._hf_regex:
            mt = rx.match(name)
            if mt:
                mp, i = self._by_hf[tmpl]
                return mp, i, (int(mt.group(1)) if mt.groups() else None)
        raise MappingError(f"no mapping for Hugging Face tensor '{name}' (arch {self.cfg.arch})")

    def expected_hf_names(self) -> list[str]:
        names = []
        for mp in self.table:
            layers = self.layers() if mp.per_layer else [None]
            names += [_fill(h, layer) for layer in layers for h in mp.hf]
        return names

    def expected_mcore_names(self, spec: str = "local") -> list[str]:
        out = []
        for mp in self.table:
            layers = self.layers() if mp.per_layer else [None]
            out += [_fill(mp.mcore_name(spec), layer) for layer in layers]
        return out

    def hf_shapes(self, vocab_size: int) -> dict[str, tuple[int, ...]]:
        """Full HF tensor shapes by name (vocab_size = original, unpadded)."""
        shapes = {}
        for mp in self.table:
            for layer in self.layers() if mp.per_layer else [None]:
                for h, s in zip(mp.hf, mp.hf_shapes(self.cfg, vocab_size)):
                    shapes[_fill(h, layer)] = tuple(s)
        return shapes


def model_mapping(cfg: ModelConfig) -> ModelMapping:
    """The (cached) mapping of a model config; per-tensor callers such as weight sync reuse the compiled table."""
    return _cached_mapping(cfg.model_dump_json())


@functools.lru_cache(maxsize=16)
def _cached_mapping(cfg_json: str) -> ModelMapping:
    cfg = ModelConfig.model_validate_json(cfg_json)
    return ModelMapping(cfg, family_for_arch(cfg.arch).table(cfg))


# ------------------------------------------------------------------------------------------------ conversions
def _is_skipped_mcore(name: str, cfg: ModelConfig) -> bool:
    # _extra_state holds TE/FP8 metadata (None for the local spec), not weights; rotary buffers are derived;
    # with tied embeddings the last pipeline stage keeps a copy of the embedding as output_layer.weight.
    return (
        name.endswith("._extra_state")
        or "rotary_pos_emb" in name
        or (cfg.tie_word_embeddings and name == "output_layer.weight")
    )


def mcore_to_hf_named_tensors(
    state_dict: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    *,
    vocab_size: Optional[int] = None,
    layer_offset: int = 0,
    strict: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (TP-gathered) Megatron tensors -> (HF name, HF tensor), in state-dict order.

    vocab_size: original vocabulary; padding rows beyond it are dropped (None: keep all rows).
    layer_offset: global index of this state dict's layer 0 (its pipeline stage's first layer).
    strict: every expected Megatron parameter of the layers present must be there (tied/untied included).
    """
    mm = model_mapping(model_cfg)
    seen = set()
    for name, tensor in state_dict.items():
        if tensor is None or _is_skipped_mcore(name, model_cfg):
            continue
        mp, layer = mm.find_mcore(name)
        seen.add(name)
        glayer = None if layer is None else layer + layer_offset
        for h, t in zip(mp.hf, mp.to_hf(tensor, model_cfg)):
            if isinstance(mp, VocabMapping) and vocab_size is not None:
                t = strip_vocab(t, vocab_size)
            yield _fill(h, glayer), t
    if strict:
        _check_complete_mcore(mm, seen, state_dict)


def _check_complete_mcore(mm: ModelMapping, seen: set[str], state_dict) -> None:
    # Every layer present must be whole; the non-layer tensors are only required when the state dict holds all
    # layers (PP = 1): a pipeline stage holds the embedding (first) or final norm / output layer (last) only.
    layers = {mm.find_mcore(n)[1] for n in seen} - {None}
    whole_model = layers == set(mm.layers())
    missing = []
    for mp in mm.table:
        if not mp.per_layer and not whole_model:
            continue
        for layer in sorted(layers) if mp.per_layer else [None]:
            if all(_fill(mp.mcore_name(s), layer) not in state_dict for s in SPECS):
                missing.append(_fill(mp.mcore, layer))
    if missing:
        raise MappingError(f"Megatron state dict lacks {len(missing)} tensor(s), e.g. {missing[:4]}")


def mcore_tp_shard_to_hf(
    name: str, shard: torch.Tensor, model_cfg: ModelConfig, *, layer_offset: int = 0
) -> list[tuple[str, torch.Tensor, Optional[int]]]:
    """One TP rank's Megatron shard -> [(HF name, HF shard, tp_axis)].

    Concatenating the shards of all TP ranks (in rank order) along tp_axis gives the full HF tensor
    (``gather_tp_shards``); tp_axis None means the tensor is replicated (take any rank's).
    """
    mp, layer = model_mapping(model_cfg).find_mcore(name)
    glayer = None if layer is None else layer + layer_offset
    return [(_fill(h, glayer), t, mp.tp_axis) for h, t in zip(mp.hf, mp.to_hf(shard, model_cfg))]


def gather_tp_shards(shards: Sequence[torch.Tensor], tp_axis: Optional[int]) -> torch.Tensor:
    return shards[0] if tp_axis is None else torch.cat(list(shards), dim=tp_axis)


def check_hf_shapes(mp: ParamMapping, hf_tensors: Sequence, cfg: ModelConfig, vocab_size: int,
                    layer: Optional[int]) -> None:
    """Every HF piece (anything with ``.shape``) has the shape the config implies; the error names the tensor."""
    for h, t, s in zip(mp.hf, hf_tensors, mp.hf_shapes(cfg, vocab_size)):
        _check_shape(_fill(h, layer), t, s)


def hf_to_mcore_tensor(
    mp: ParamMapping, hf_tensors: Sequence[torch.Tensor], cfg: ModelConfig, vocab_size: int, layer: Optional[int]
) -> torch.Tensor:
    """Check the HF pieces' shapes (naming the tensor) and build the full Megatron tensor."""
    check_hf_shapes(mp, hf_tensors, cfg, vocab_size, layer)
    return mp.to_mcore(hf_tensors, cfg, vocab_size)


def group_hf_tensors(
    hf_tensors: Iterable[tuple[str, Any]], model_cfg: ModelConfig
) -> Iterator[tuple[ParamMapping, Optional[int], list]]:
    """Stream (HF name, value) -> (mapping, layer, values in ``mapping.hf`` order), as soon as all the pieces of
    one Megatron parameter have arrived (so at most one layer's q/k/v or gate/up waits). Values are passed
    through untouched (tensors, or references to tensors in files).

    Raises MappingError on an unknown name, a layer out of range, a duplicate, or pieces missing at the end.
    """
    mm = model_mapping(model_cfg)
    pending: dict[tuple[int, Optional[int]], dict[int, Any]] = {}
    for name, t in hf_tensors:
        if model_cfg.tie_word_embeddings and name == TIED_HF_OUTPUT:
            continue  # transformers' state_dict() lists the tied output weight; it is the embedding
        if name.endswith(HF_DERIVED_SUFFIX):
            continue  # older checkpoints store RoPE inverse frequencies; Megatron recomputes them
        mp, i, layer = mm.find_hf(name)
        if layer is not None and layer >= model_cfg.num_layers:
            raise MappingError(f"tensor '{name}' has layer {layer} >= num_layers={model_cfg.num_layers}")
        key = (id(mp), layer)
        parts = pending.setdefault(key, {})
        if i in parts:
            raise MappingError(f"tensor '{name}' appears twice")
        parts[i] = t
        if len(parts) == len(mp.hf):
            del pending[key]
            yield mp, layer, [parts[j] for j in range(len(mp.hf))]
    if pending:
        missing = []
        for (mid, layer), parts in pending.items():
            mp = next(m for m in mm.table if id(m) == mid)
            missing += [_fill(h, layer) for j, h in enumerate(mp.hf) if j not in parts]
        raise MappingError(f"missing Hugging Face tensor(s): {sorted(missing)[:8]}")


def hf_to_mcore_named_tensors(
    hf_tensors: Iterable[tuple[str, torch.Tensor]], model_cfg: ModelConfig, *, vocab_size: int, spec: str = "local"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) -> (Megatron name, full Megatron tensor), emitting a parameter as soon as all
    its HF pieces have arrived (so at most one layer's q/k/v or gate/up waits in memory).

    vocab_size: original vocabulary (rows of embed_tokens / lm_head); model_cfg.vocab_size is the padded one.
    Raises MappingError on an unknown name, a shape mismatch, or pieces missing at the end.
    """
    for mp, layer, parts in group_hf_tensors(hf_tensors, model_cfg):
        yield mp.mcore_param(layer, spec), hf_to_mcore_tensor(mp, parts, model_cfg, vocab_size, layer)
