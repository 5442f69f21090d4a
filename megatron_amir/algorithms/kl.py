"""KL(π_θ ‖ π_ref) per-token estimators (Schulman, "Approximating KL divergence", 2020).

With the log-ratio δ_t = log π_θ(y_t) − log π_ref(y_t) on tokens sampled from π_θ:

- ``k1`` = δ                       unbiased, high variance, can be negative
- ``k2`` = ½ δ²                    biased, low variance (its gradient is the true KL gradient on-policy)
- ``k3`` = exp(−δ) + δ − 1         unbiased, non-negative, low variance (GRPO / DeepSeekMath default)

δ is clamped to [−20, 20] before ``exp`` so extreme log-probs (−1e4) stay finite (as verl does).

Used either as a loss term ``kl_coef · Σ w_t k(δ_t)`` (same token weights as the policy loss) or, with
``kl_in_reward``, as a per-sequence reward penalty ``kl_coef · Σ_t m_t k(δ_t)`` before advantages.
"""

from __future__ import annotations

from typing import Callable

import torch

_CLAMP = 20.0

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_kl_estimator(name: str):
    def deco(fn):
        KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl_estimator("k1")
def _k1(delta: torch.Tensor) -> torch.Tensor:
    return delta


@register_kl_estimator("k2")
def _k2(delta: torch.Tensor) -> torch.Tensor:
    return 0.5 * delta * delta


@register_kl_estimator("k3")
def _k3(delta: torch.Tensor) -> torch.Tensor:
    return torch.exp(-delta) + delta - 1.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate k(δ), δ = clamp(logp − ref_logp, −20, 20). Differentiable in ``logp``."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"algorithm.kl_estimator: unknown estimator {estimator!r} (known: {sorted(KL_ESTIMATORS)})")
    delta = (logp - ref_logp).clamp(-_CLAMP, _CLAMP)
    return KL_ESTIMATORS[estimator](delta)


def kl_reward_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    kl_coef: float = 1.0,
) -> torch.Tensor:
    """Per-sequence penalty[N] = kl_coef · Σ_t m_t · k(δ_t), to subtract from the scalar rewards."""
    with torch.no_grad():
        m = response_mask.to(logp.dtype)
        return kl_coef * (kl_penalty(logp, ref_logp, estimator) * m).sum(-1)
