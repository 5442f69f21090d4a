"""A compact decoder-only transformer for the Llama / Qwen2 / Qwen3 / Mistral families, built from an
HF ``config.json`` dict and holding parameters under the exact Hugging Face names (``model.layers.0.
self_attn.q_proj.weight`` ...), so it loads what vLLM and transformers load.

nanoGPT-sized on purpose: one attention, one MLP, RMSNorm, RoPE and a preallocated KV cache, which the
embedded rollout engine drives (prefill once, then one token per step). Family differences:

* llama   : optional ``attention_bias`` (q/k/v/o) and ``mlp_bias``; RoPE types default / linear / llama3.
* qwen2   : q/k/v projections always have a bias, o_proj none.
* qwen3   : RMSNorm over each head of q and k (``q_norm`` / ``k_norm``) before RoPE; explicit ``head_dim``.
* mistral : optional sliding-window attention (``sliding_window``).

Batched prompts of different lengths are left-padded; each row carries its own positions (counted from
its first real token) and a key mask, so a padded row computes exactly what it would compute alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
_ARCH_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}


class HFConfigError(ValueError):
    """An HF config.json that this model cannot represent; the message names the field."""


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: Optional[int]
    hidden_act: str
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        if not isinstance(cfg, Mapping):
            raise HFConfigError(f"hf_config must be a dict (config.json), got {type(cfg).__name__}")
        family = cfg.get("model_type")
        if family is None:
            archs = cfg.get("architectures") or []
            family = next((_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY), None)
        if family not in SUPPORTED_FAMILIES:
            raise HFConfigError(f"model_type={family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise HFConfigError(f"hf_config is missing '{key}' (model_type={family})")
            return cfg[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise HFConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x used rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta") or 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in ("default", "linear", "llama3"):
                raise HFConfigError(f"rope_scaling type {rtype!r} is not supported (default, linear, llama3)")
            scaling = None if rtype == "default" else {**scaling, "rope_type": rtype}
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTS:
            raise HFConfigError(f"hidden_act={act!r} is not supported ({', '.join(_ACTS)})")

        attention_bias = bool(cfg.get("attention_bias") or False)
        sliding = None
        if family == "mistral":
            sliding = cfg.get("sliding_window")
        elif family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            raise HFConfigError(f"use_sliding_window=true is not supported for {family} (per-layer windows)")
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias") or False),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            hidden_act=act,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/d), j < d/2, with HF's 'linear' (divide by factor) and 'llama3' scaling.

    llama3: wavelengths above original_max/low_freq_factor are divided by ``factor``; below
    original_max/high_freq_factor kept; in between interpolated with s = (orig/wavelen - low)/(high - low):
    (1 - s) * f/factor + s * f.
    """
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = args.rope_scaling
    if sc is None:
        return inv.float()
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":
        return (inv / factor).float()
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    orig = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    s = (orig / wavelen - low) / (high - low)
    smoothed = (1 - s) * scaled / factor + s * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF (non-interleaved) rotary embedding: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1].

    x: [B, H, q, d]; cos/sin: [B, 1, q, d].
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like HF."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def fuse(self) -> None:
        """Concatenate q/k/v weights (and biases) into one matrix: one matmul instead of three. Derived
        from the HF-named parameters, never saved; CausalLM refreshes it after every load or move."""
        self._qkv_w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()
        self._qkv_b = (torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).detach()
                       if self.a.qkv_bias else None)

    def forward(self, x, cos, sin, cache: "KVCache", layer: int, mask: torch.Tensor) -> torch.Tensor:
        a = self.a
        B, q, _ = x.shape
        nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        qkv = F.linear(x, self._qkv_w, self._qkv_b)
        qh = qkv[..., :nq].view(B, q, a.num_heads, a.head_dim)
        kh = qkv[..., nq : nq + nkv].view(B, q, a.num_kv_heads, a.head_dim)
        vh = qkv[..., nq + nkv :].view(B, q, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if a.qk_norm:
            qh, kh = self.q_norm(qh), self.k_norm(kh)
        qh = apply_rope(qh.transpose(1, 2), cos, sin)
        kh = apply_rope(kh.transpose(1, 2), cos, sin)
        k_all, v_all = cache.append(layer, kh, vh)
        rep = a.num_heads // a.num_kv_heads
        if rep > 1:
            # grouped-query attention without copying the cache: query head h uses KV head h // rep
            # (HF's repeat_interleave), so fold the rep query heads of each KV head into the query axis
            S = k_all.shape[2]
            qh = qh.reshape(B, a.num_kv_heads, rep * q, a.head_dim)
            if q > 1:  # one query row per sequence broadcasts over the rep heads as it is
                mask = mask.unsqueeze(2).expand(B, 1, rep, q, S).reshape(B, 1, rep * q, S)
        out = F.scaled_dot_product_attention(qh, k_all, v_all, attn_mask=mask)
        out = out.reshape(B, a.num_heads, q, a.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, q, a.num_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.act = _ACTS[a.hidden_act]
        self.inter = a.intermediate_size

    def fuse(self) -> None:
        """gate and up projections as one matmul (derived, like Attention.fuse)."""
        self._gu_w = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach()
        self._gu_b = torch.cat([self.gate_proj.bias, self.up_proj.bias]).detach() if self.gate_proj.bias is not None else None

    def forward(self, x):
        gu = F.linear(x, self._gu_w, self._gu_b)
        return self.down_proj(self.act(gu[..., : self.inter]) * gu[..., self.inter :])


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class KVCache:
    """Preallocated keys/values [B, kv_heads, capacity, head_dim] per layer plus, per slot, the token's
    position (-1 = empty or padding). Appending writes the next ``q`` slots of every row."""

    def __init__(self, a: ModelArgs, batch: int, capacity: int, device, dtype):
        shape = (batch, a.num_kv_heads, capacity, a.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.num_layers)]
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.length = 0  # slots filled (same for every row)
        self.capacity = capacity
        self._pending = 0

    def reserve(self, positions: torch.Tensor) -> None:
        """Record the positions of the next q slots ([B, q], -1 for padding) before the layers append."""
        q = positions.shape[1]
        if self.length + q > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {q} > capacity {self.capacity}")
        self.pos[:, self.length : self.length + q] = positions
        self._pending = q

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, e = self.length, self.length + k.shape[2]
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (drop finished sequences from the batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.pos = self.pos.index_select(0, rows)


class CausalLM(nn.Module):
    """``XForCausalLM`` of the supported families, HF parameter names, KV-cached forward."""

    def __init__(self, hf_config: Mapping[str, Any]):
        super().__init__()
        self.args = a = ModelArgs.from_hf_config(hf_config)
        self.model = Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        self.refresh_fused()

    def rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of position * inv_freq for positions [0, length) (grown by doubling, kept per dtype)."""
        tab = getattr(self, "_rope", None)
        if tab is None or tab[0].shape[0] < length or tab[0].dtype != dtype or tab[0].device != self.inv_freq.device:
            n = max(length, 2 * (tab[0].shape[0] if tab is not None else 256))
            freqs = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope = tab = (emb.cos().to(dtype), emb.sin().to(dtype))
        return tab

    def refresh_fused(self) -> None:
        """Rebuild the fused q/k/v and gate/up matrices from the HF-named parameters."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def release_fused(self) -> None:
        """Free the fused copies (the engine's sleep mode); ``refresh_fused`` rebuilds them."""
        for layer in self.model.layers:
            layer.self_attn._qkv_w = layer.self_attn._qkv_b = None
            layer.mlp._gu_w = layer.mlp._gu_b = None

    def _apply(self, fn, *args, **kwargs):
        # .to(device/dtype) replaces the parameters: the fused copies must follow
        out = super()._apply(fn, *args, **kwargs)
        self.refresh_fused()
        return out

    # ------------------------------------------------------------------ weights
    def expected_names(self) -> set[str]:
        names = set(self.state_dict().keys())
        if self.args.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names

    @torch.no_grad()
    def load_hf_state_dict(self, named_tensors, strict: bool = True, refresh: bool = True) -> list[str]:
        """Copy HF-named tensors in place (dtype/device converted); returns the names loaded.

        With ``strict`` every expected parameter must be present. Unknown names and shape mismatches
        raise; ``lm_head.weight`` of a tied model and rotary ``inv_freq`` buffers are ignored. ``refresh=False``
        leaves the fused q/k/v and gate/up copies stale (a caller loading in parts calls ``refresh_fused`` once).
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        todo = []
        # check everything first, then copy: a rejected update must leave the weights (and their version) whole
        for name, t in items:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            if name not in params:
                raise KeyError(f"unexpected weight {name!r} for a {self.args.family} model")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}")
            todo.append((name, t))
        loaded = [name for name, _ in todo]
        if strict:
            missing = self.expected_names() - set(loaded)
            if missing:
                raise KeyError(f"missing weights: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
        for name, t in todo:
            p = params[name]
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        if refresh:
            self.refresh_fused()
        return loaded

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.args, batch, capacity, p.device, p.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                logits_rows: str = "all") -> torch.Tensor:
        """tokens, positions: [B, q] (position -1 marks a left-padding slot). Appends to ``cache``
        (a fresh one sized q if None) and returns logits [B, q, V] (``logits_rows='last'``: [B, V])."""
        a = self.args
        B, q = tokens.shape
        if cache is None:
            cache = self.new_cache(B, q)
        cache.reserve(positions)
        kpos = cache.pos[:, : cache.length + q]  # [B, S]
        qpos = positions
        # Query at position p sees keys at positions 0..p of its own row (padding keys have pos -1 and
        # are excluded); a padding query sees only itself so softmax never meets an all-masked row.
        if q == 1 and a.sliding_window is None:
            mask = (kpos >= 0)[:, None, :]  # decoding one real token: every earlier key is visible
        else:
            mask = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])
        if a.sliding_window is not None:
            mask &= kpos[:, None, :] > qpos[:, :, None] - a.sliding_window
        pad_q = qpos < 0
        if q > 1 and bool(pad_q.any()):
            own = torch.zeros_like(mask)
            idx = torch.arange(q, device=tokens.device)
            own[:, idx, cache.length + idx] = True
            mask = torch.where(pad_q[:, :, None], own, mask)
        # additive float mask (0 / -inf): SDPA's CPU kernels are faster with it than with a bool mask
        dt = self.lm_head.weight.dtype
        mask = torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None]

        cos, sin = self.rope_tables(int(qpos.max()) + 1, dt)
        idx = qpos.clamp(min=0)
        cos, sin = cos[idx][:, None], sin[idx][:, None]  # [B, 1, q, d]

        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, mask)
        cache.commit()
        if logits_rows == "last":
            x = x[:, -1]
        return self.lm_head(self.model.norm(x))
