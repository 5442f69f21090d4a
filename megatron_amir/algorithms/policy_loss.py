"""Per-token policy-gradient losses (before aggregation), selectable by name.

``ppo`` — PPO/GRPO clipped surrogate with DAPO's decoupled clip range (arXiv 2503.14476) and optional
dual-clip (Ye et al., arXiv 1912.09729):
    ρ_t = exp(log π_θ − log π_old)
    ℓ_t = max(−A ρ_t, −A clip(ρ_t, 1−ε_low, 1+ε_high))
    dual-clip (A < 0 only): ℓ_t = min(ℓ_t, −A·c),  c > 1

``gspo`` — GSPO (arXiv 2507.18071): one importance ratio per sequence,
    s_i = exp( (1/|y_i|) Σ_t (log π_θ − log π_old) ),
used in its token form s_{i,t} = sg[s_i] · π_θ(y_t)/sg[π_θ(y_t)] (value s_i, gradient s_i ∇log π_θ(y_t)),
then the same clipped surrogate. Aggregated with ``seq-mean-token-mean`` this is exactly GSPO's
sequence objective; GSPO's paper uses tiny clip ranges (ε_low = 3e-4, ε_high = 4e-4).

TIS — truncated importance sampling for the rollout-engine / trainer mismatch (Yao et al., "Your
efficient RL framework secretly brings you off-policy RL training", 2025): the per-token loss is
multiplied by the detached weight min(exp(log π_old − log π_rollout), C).

Log-ratios are clamped to [−20, 20] before ``exp`` so extreme log-probs (−1e4) stay finite.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

_CLAMP = 20.0

# name -> fn(logp, old_logp, advantages[N], mask[N,T], *, clip_eps_low, clip_eps_high, dual_clip_c)
#         -> (per_token_loss[N,T], info: dict[str, Tensor] of detached per-token indicators / ratio)
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}


def register_policy_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def clipped_surrogate(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ℓ = max(−A ρ, −A clip(ρ, 1−ε_low, 1+ε_high)), then min(ℓ, −A c) where A < 0 if dual_clip_c.

    ``adv`` broadcasts against ``ratio`` (shape [N, 1] for per-sequence advantages).
    """
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(pg1, pg2)
    with torch.no_grad():
        info = {
            "clipped_low": (adv < 0) & (ratio < 1.0 - clip_eps_low),
            "clipped_high": (adv > 0) & (ratio > 1.0 + clip_eps_high),
        }
    if dual_clip_c is not None:
        pg3 = -adv * dual_clip_c
        loss = torch.where(adv < 0, torch.minimum(loss, pg3), loss)
        with torch.no_grad():
            info["dual_clipped"] = (adv < 0) & (ratio > dual_clip_c)
    return loss, info


@register_policy_loss("ppo")
def ppo_loss(logp, old_logp, advantages, mask, *, clip_eps_low, clip_eps_high, dual_clip_c=None):
    """Token-level ratio ρ_t = exp(logp − old_logp) in the clipped surrogate."""
    ratio = torch.exp((logp - old_logp).clamp(-_CLAMP, _CLAMP))
    loss, info = clipped_surrogate(ratio, advantages.unsqueeze(-1), clip_eps_low, clip_eps_high, dual_clip_c)
    info["ratio"] = ratio.detach()
    return loss, info


@register_policy_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, *, clip_eps_low, clip_eps_high, dual_clip_c=None):
    """Sequence ratio s_i = exp(mean_t(logp − old_logp)) in token form s_{i,t} = sg[s_i]·π/sg[π]."""
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp(min=1)
    seq_log_ratio = ((logp - old_logp) * m).sum(-1) / lengths
    log_ratio = logp - logp.detach() + seq_log_ratio.detach().clamp(-_CLAMP, _CLAMP).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    loss, info = clipped_surrogate(ratio, advantages.unsqueeze(-1), clip_eps_low, clip_eps_high, dual_clip_c)
    info["ratio"] = ratio.detach()
    return loss, info


def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Detached truncated importance weight min(exp(old_logp − rollout_logp), cap) per token."""
    with torch.no_grad():
        return torch.exp((old_logp - rollout_logp).clamp(-_CLAMP, _CLAMP)).clamp(max=cap)


def policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch to the registered loss ``name``; returns (per_token_loss[N,T], info)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"algorithm.policy_loss: unknown loss {name!r} (known: {sorted(POLICY_LOSSES)})")
    return POLICY_LOSSES[name](
        logp, old_logp, advantages, mask,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c,
    )
