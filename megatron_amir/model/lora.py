"""LoRA adapters on the TP-sharded linear layers of a Megatron-Core GPTModel.

A LoRA layer computes, for input x, frozen base weight W [out, in] and adapters A [r, in], B [out, r],

    y = x W^T + s · (drop(x) A^T) B^T,      s = alpha / r,

which equals the dense layer with the merged weight W' = W + s · B A (dropout off). B starts at zero, so a
freshly wrapped model computes exactly what the base model computes.

Tensor parallelism (TP size t) keeps the sharded forward equal to the merged dense layer:

- column-parallel (``linear_qkv``, ``linear_fc1``; W sharded along the output, W_k = rows of W): A replicated,
  B sharded along the output like W (B_k = the same rows of B), so the local output
  x W_k^T + s (x A^T) B_k^T = x (W_k + s B_k A)^T is exactly the rows of the merged layer's output. Backward:
  the gradient of h = x A^T receives a partial sum B_k^T dy_k on every rank, so h passes through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce over TP backward): dA = (Σ_k B_k^T dy_k)^T x
  is the full gradient, identical on every TP rank.
- row-parallel (``linear_proj``, ``linear_fc2``; W sharded along the input, x sharded likewise): A sharded along
  the input (A_k = columns of A), B replicated. h = Σ_k x_k A_k^T = x A^T is formed by
  ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward), then y_lora = s h B^T is
  added after the base layer's all-reduce: y = Σ_k x_k W_k^T + s (x A^T) B^T = x (W + s B A)^T.
  dB = s dy^T h and dA_k = s (dy B)^T x_k need no further communication (dy and h are replicated).

Replicated adapters carry no ``tensor_model_parallel`` attribute, so Megatron's gradient-norm counts them once
(on TP rank 0) and their (identical) gradients need no reduction; sharded ones carry ``partition_dim`` like W.
With a gated MLP (SwiGLU) each rank's ``linear_fc1`` rows are [gate_k; up_k]; B of ``linear_fc1`` is then
checkpointed through the same swiglu sharded factory as the weight, so its full (gathered) rows line up with the
full weight's [gate; up] rows and ``merge_lora_state_dict`` can merge the gathered tensors.

The adapters are parameters ``lora_A`` / ``lora_B`` of the wrapped linear module itself (the instance's class is
swapped for a subclass that adds the adapter path), so every base name (``...linear_qkv.weight``) stays what the
checkpoints, the HF mapping and weight sync expect; adapters appear as ``...linear_qkv.lora_A`` / ``.lora_B``.
``adapters_disabled`` switches the adapter path off (the reference policy is the base model).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


# ------------------------------------------------------------------------------------------------ pure math
def lora_scaling(rank: int, alpha: float) -> float:
    """s = alpha / r (the original LoRA scaling; PEFT's default without rsLoRA)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return float(alpha) / rank


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · B A, shape [out, in] (A [r, in], B [out, r])."""
    return scaling * (lora_B @ lora_A)


def merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = W + s · B A, computed in float32 (or wider, if the inputs are) and returned in W's dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(wide) + lora_delta(lora_A.to(wide), lora_B.to(wide), scaling)).to(weight.dtype)


def unmerge_weight(merged: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W = W' − s · B A (the inverse of ``merge_weight``; exact in real arithmetic, rounding in W's dtype aside)."""
    wide = torch.promote_types(merged.dtype, torch.float32)
    return (merged.to(wide) - lora_delta(lora_A.to(wide), lora_B.to(wide), scaling)).to(merged.dtype)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling):
    """Dense LoRA layer y = x W^T + b + s (x A^T) B^T (no dropout): the reference the sharded layers must equal."""
    y = x @ weight.T + scaling * ((x @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Full (TP/PP-gathered) Megatron state dict with adapters -> the same names without adapters, every adapted
    ``<prefix>.weight`` replaced by ``merge_weight(W, A, B, s)``. A state dict without adapters passes unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.endswith(ADAPTER_SUFFIXES):
            continue
        if name.endswith(".weight") and name[: -len(".weight")] + ".lora_A" in state_dict:
            prefix = name[: -len(".weight")]
            t = merge_weight(t, state_dict[prefix + ".lora_A"], state_dict[prefix + ".lora_B"], scaling)
        out[name] = t
    return out


def adapter_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a (full) state dict."""
    return {k: v for k, v in state_dict.items() if k.endswith(ADAPTER_SUFFIXES)}


def kaiming_uniform_bound(fan_in: int) -> float:
    """PEFT's A init, kaiming_uniform_(a=sqrt(5)): U(-b, b) with b = gain·sqrt(3/fan_in), gain = sqrt(2/(1+5)),
    i.e. b = 1/sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in)


# ------------------------------------------------------------------------------------------------ layers
def _parallel_kind(module) -> str:
    """'column' or 'row' for Megatron's local or Transformer Engine linear layers."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    mode = getattr(module, "parallel_mode", None)  # TE layers: 'column' / 'row' (None: a duplicated layer)
    if mode in ("column", "row"):
        return mode
    raise TypeError(f"cannot put a LoRA adapter on {type(module).__name__}: not a column- or row-parallel linear")


class LoRAParallelLinear:
    """Mixin placed in front of the wrapped layer's own class (see ``add_lora``); adds the adapter path."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_scaling: float
    lora_kind: str  # "column" | "row"
    lora_dropout_p: float
    lora_enabled: bool
    lora_gated: bool  # linear_fc1 of a gated MLP: rows per rank are [gate_k; up_k]

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        # TE's LayerNormColumnParallelLinear normalizes its input inside the layer; the adapter must see the same
        # normalized input as the base GEMM (RMSNorm / LayerNorm with the layer's own norm weights)
        ln_w = getattr(self, "layer_norm_weight", None)
        if ln_w is None:
            return x
        w = ln_w + 1 if getattr(self, "zero_centered_gamma", False) else ln_w
        eps = float(getattr(self, "eps", 1e-5))
        if getattr(self, "normalization", "RMSNorm") == "RMSNorm":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
        return F.layer_norm(x, (x.shape[-1],), w, getattr(self, "layer_norm_bias", None), eps)

    def _lora_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.lora_dropout_p > 0):
            return x
        if self.lora_kind == "column":  # replicated input: the default generator is the same on every TP rank
            return F.dropout(x, self.lora_dropout_p, True)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():  # sharded input: independent masks per TP rank, as Megatron's dropout
            return F.dropout(x, self.lora_dropout_p, True)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter path s · (drop(x) A^T) B^T of this rank (output rows of its shard for column-parallel)."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        group = getattr(self, "tp_group", None)
        h = F.linear(self._lora_dropout(self._lora_input(x)), self.lora_A)
        if self.lora_kind == "column":
            h = copy_to_tensor_model_parallel_region(h, group=group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h, self.lora_B) * self.lora_scaling

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return out, bias
        return out + self.lora_forward(input_).to(out.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # marks the adapters replicated
        axes = {"lora_B": 0} if self.lora_kind == "column" else {"lora_A": 1}
        sd.update(make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axes, sharded_offsets,
            tp_group=getattr(self, "tp_group", None), dp_cp_group=metadata["dp_cp_group"],
        ))
        if self.lora_gated:
            sd[prefix + "lora_B"] = apply_swiglu_sharded_factory(
                sd[prefix + "lora_B"], sharded_offsets, metadata.get("singleton_local_shards", False),
                tp_group=getattr(self, "tp_group", None), dp_group=metadata["dp_cp_group"],
            )
        return sd


_CLASSES: dict[type, type] = {}


def _lora_class(base_cls: type) -> type:
    if base_cls not in _CLASSES:
        _CLASSES[base_cls] = type(f"LoRA{base_cls.__name__}", (LoRAParallelLinear, base_cls), {})
    return _CLASSES[base_cls]


def _tp_rank_size(module) -> tuple[int, int]:
    group = getattr(module, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return group.rank(), group.size()


def add_lora(module, *, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0, gated: bool = False):
    """Turn one column/row-parallel linear into its LoRA version in place (adapters A, B added; base untouched).

    Init, independent of the TP layout: the full A [r, in] from U(-1/sqrt(in), 1/sqrt(in)) drawn with a CPU
    generator seeded by ``seed`` (each rank keeps its slice for row-parallel), B = 0.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if isinstance(module, LoRAParallelLinear):
        raise ValueError(f"{type(module).__name__} already has LoRA adapters")
    kind = _parallel_kind(module)
    tp_rank, tp = _tp_rank_size(module)
    weight = module.weight
    out_local, in_local = weight.shape
    in_full = in_local * tp if kind == "row" else in_local
    gen = torch.Generator().manual_seed(seed)
    bound = kaiming_uniform_bound(in_full)
    a_full = torch.empty(rank, in_full).uniform_(-bound, bound, generator=gen)
    a = a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local] if kind == "row" else a_full
    b = torch.zeros(out_local, rank)
    module.lora_A = torch.nn.Parameter(a.to(weight.device, weight.dtype).contiguous())
    module.lora_B = torch.nn.Parameter(b.to(weight.device, weight.dtype))
    if kind == "column":
        set_tensor_model_parallel_attributes(module.lora_B, True, 0, 1)
    else:
        set_tensor_model_parallel_attributes(module.lora_A, True, 1, 1)
    module.lora_scaling = lora_scaling(rank, alpha)
    module.lora_kind = kind
    module.lora_dropout_p = float(dropout)
    module.lora_enabled = True
    module.lora_gated = bool(gated)
    module.__class__ = _lora_class(type(module))
    return module


def _layer_seed(seed: int, layer_number: int, target: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{layer_number}.{target}".encode())) % (2**63)


def apply_lora(model, lora_cfg, *, seed: int = 0) -> list[str]:
    """Put adapters on ``lora_cfg.target_modules`` of every transformer layer of a GPTModel chunk (this pipeline
    stage's layers), freeze everything else; returns the wrapped modules' names. The per-layer init seed uses the
    GLOBAL layer number, so any PP/TP layout draws the same adapters."""
    for target in lora_cfg.target_modules:
        if target not in TARGET_MODULES:
            raise ValueError(f"lora.target_modules: unknown module {target!r} (choose from {', '.join(TARGET_MODULES)})")
    if getattr(getattr(model, "config", None), "sequence_parallel", False):
        raise ValueError("lora.enabled=true with parallel.sequence_parallel=true is not supported (the adapter path "
                         "has no sequence-parallel all-gather / reduce-scatter)")
    for p in model.parameters():
        p.requires_grad_(False)
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    names = []
    for i, layer in enumerate(model.decoder.layers):
        for target in lora_cfg.target_modules:
            lin = getattr(getattr(layer, _PARENT[target]), target)
            add_lora(lin, rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                     seed=_layer_seed(seed, layer.layer_number, target), gated=gated and target == "linear_fc1")
            names.append(f"decoder.layers.{i}.{_PARENT[target]}.{target}")
    return names


def lora_modules(modules: Iterable[torch.nn.Module]) -> Iterator[LoRAParallelLinear]:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, LoRAParallelLinear):
                yield sub


def adapter_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for sub in lora_modules(modules) for p in (sub.lora_A, sub.lora_B)]


@contextlib.contextmanager
def adapters_disabled(modules: Iterable[torch.nn.Module]):
    """Run the base model: every adapter path off inside the block (restored on exit, also on error)."""
    subs = list(lora_modules(modules))
    before = [s.lora_enabled for s in subs]
    for s in subs:
        s.lora_enabled = False
    try:
        yield
    finally:
        for s, b in zip(subs, before):
            s.lora_enabled = b



class AdaptersOffReference:
    """Reference policy of a LoRA policy: the same model chunks with every adapter off, i.e. the frozen base
    weights the run started from (B = 0 at the start). Holds no weights of its own."""

    def __init__(self, policy):
        self._policy = policy

    def compute_logprobs(self, tokens, micro_batch_size=None, temperature: float = 1.0, lengths=None):
        with adapters_disabled(self._policy.modules()):
            return self._policy.compute_logprobs(tokens, micro_batch_size, temperature, lengths)

    def load(self, path) -> None:
        raise RuntimeError(f"a LoRA policy's reference is its own base model with the adapters off; it loads no "
                           f"weights (asked to load {path})")
