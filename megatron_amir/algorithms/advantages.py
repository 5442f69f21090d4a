"""Group-relative advantage estimators (outcome rewards, one scalar per rollout).

For a group g of G_g valid rollouts with rewards r_i, mean r̄_g and unbiased std σ_g:

- ``grpo``   (DeepSeekMath, arXiv 2402.03300):  A_i = (r_i − r̄_g) / (σ_g + eps)
- ``drgrpo`` (Dr. GRPO, arXiv 2503.20783):      A_i = r_i − r̄_g                (no std division)
- ``rloo``   (RLOO, arXiv 2402.14740):          A_i = r_i − mean_{j≠i} r_j = G_g/(G_g−1)·(r_i − r̄_g)

A group whose valid rewards are all equal ("zero-variance group") carries no learning signal: its
advantages are set to exactly 0 (also removing float noise) and it is counted in the metrics.
Rows with no response token (``valid = False``) get advantage 0 and do not enter group statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

# name -> fn(rewards[N], group_index[N], num_groups, valid[N] bool, eps) -> advantages[N]
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}


def register_advantage_estimator(name: str):
    def deco(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids[N] to dense indices 0..B-1 (order of first sorted id). Returns (index, B)."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def _group_moments(rewards, gidx, num_groups, valid):
    v = valid.to(rewards.dtype)
    cnt = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, gidx, v)
    s1 = torch.zeros_like(cnt).index_add_(0, gidx, rewards * v)
    mean = s1 / cnt.clamp(min=1)
    dev = (rewards - mean[gidx]) * v
    return cnt, mean, dev


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, gidx, num_groups, valid, eps):
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased (as torch.std in TRL / verl)."""
    cnt, _, dev = _group_moments(rewards, gidx, num_groups, valid)
    var = torch.zeros_like(cnt).index_add_(0, gidx, dev * dev) / (cnt - 1).clamp(min=1)
    return dev / (var.sqrt()[gidx] + eps)


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards, gidx, num_groups, valid, eps):
    """A_i = r_i − mean_g."""
    _, _, dev = _group_moments(rewards, gidx, num_groups, valid)
    return dev


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, gidx, num_groups, valid, eps):
    """A_i = r_i − mean of the other valid rollouts of the group = G/(G−1)·(r_i − mean_g); 0 if G = 1."""
    cnt, _, dev = _group_moments(rewards, gidx, num_groups, valid)
    scale = torch.where(cnt > 1, cnt / (cnt - 1).clamp(min=1), torch.zeros_like(cnt))
    return dev * scale[gidx]


def zero_variance_groups(rewards, gidx, num_groups, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group flags: (has_valid_rows[B], zero_variance[B]) where zero variance = max == min over valid rows."""
    big = torch.finfo(rewards.dtype).max
    hi = torch.full((num_groups,), -big, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((num_groups,), big, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, gidx, torch.where(valid, rewards, torch.full_like(rewards, -big)), "amax")
    lo = lo.scatter_reduce(0, gidx, torch.where(valid, rewards, torch.full_like(rewards, big)), "amin")
    has = torch.zeros(num_groups, dtype=torch.bool, device=rewards.device)
    has = has.index_put((gidx[valid],), torch.ones_like(gidx[valid], dtype=torch.bool))
    return has, has & (hi == lo)


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    valid: torch.Tensor,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Advantages[N] (float64) with zero-variance groups and invalid rows set to 0, plus group counts."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm.advantage: unknown estimator {estimator!r} (known: {sorted(ADVANTAGE_ESTIMATORS)})")
    r = rewards.to(torch.float64)
    gidx, b = group_index(group_ids)
    adv = ADVANTAGE_ESTIMATORS[estimator](r, gidx, b, valid, eps)
    has, zv = zero_variance_groups(r, gidx, b, valid)
    adv = torch.where(valid & ~zv[gidx], adv, torch.zeros_like(adv))
    return adv, {"num_groups": int(has.sum()), "zero_variance_groups": int(zv.sum())}
