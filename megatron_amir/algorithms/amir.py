"""AMIR-GRPO's implicit pairwise regularizer (arXiv 2601.03661) in detached-coefficient form.

Inside each group (one prompt, G rollouts) every ordered pair (w, l) with r_w − r_l > margin is a
preference pair (strict: ties never pair). Modes: ``all`` (every such pair) and ``top`` (the best
rollout, first in row order on ties, against each worse one). ``max_pairs_per_group`` keeps the pairs
with the largest reward gaps (ties broken by row order). This is the reference code's
``_build_contrastive_pairs``.

Implicit reward s_i = β·(ℓ̄_θ(y_i) − ℓ̄_ref(y_i)), ℓ̄ = Σ_t m_t log π(y_t) / |y_i| (``mean``, the paper's
length normalization) or the plain sum (``sum``); the reference term is used only when
``reference_anchored`` (reference-free is the paper's default).

Pair loss L_pair = (1/P) Σ_{(w,l)} −log σ(s_w − s_l), P = number of pairs in the GLOBAL batch.

Coefficient form. L_pair depends on the policy only through the per-sequence scalars ℓ̄_θ(y_i), so
    c_i = ∂L_pair/∂ℓ̄_i = Σ_{(i,l)} −β σ(s_l − s_i)/P + Σ_{(w,i)} β σ(s_i − s_w)/P
and  ∇_θ L_pair = Σ_i c_i ∇_θ ℓ̄_θ(y_i).  With c_i computed once (no grad) from log-probs of the current
policy, every micro-batch adds Σ_{i∈mb} λ c_i ℓ̄_θ(y_i) to its loss; summed over micro-batches and DP
ranks this has exactly the gradient of λ·L_pair, needs no extra forward of pair members (the
reference code re-runs the policy on 2 sequences per pair) and applies once per optimizer step.

Adaptive λ (reference code): q = λ·L_pair / max(1e-9, L_GRPO); q < 0.30 → λ ← min(λ_max, 1.25 λ);
else q > 0.70 → λ ← max(λ_min, 0.8 λ). The reference updates λ *before* using it in the same step's
loss, and skips the update when a batch has no pairs; ``prepare_batch`` does the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


def seq_logprob(logp: torch.Tensor, response_mask: torch.Tensor, norm: str = "mean") -> torch.Tensor:
    """ℓ̄_i = Σ_t m_t logp_t / max(1, Σ_t m_t) (``mean``) or Σ_t m_t logp_t (``sum``). Shape [N]."""
    m = response_mask.to(logp.dtype)
    s = (logp * m).sum(-1)
    if norm == "mean":
        return s / m.sum(-1).clamp(min=1)
    if norm == "sum":
        return s
    raise ValueError(f"algorithm.amir.logprob_norm: unknown {norm!r} (known: 'mean', 'sum')")


def implicit_rewards(
    policy_logp: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    norm: str = "mean",
    ref_logp: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """s_i = β·(ℓ̄_θ(y_i) − ℓ̄_ref(y_i)); ℓ̄_ref = 0 when ``ref_logp`` is None (reference-free)."""
    s = seq_logprob(policy_logp, response_mask, norm)
    if ref_logp is not None:
        s = s - seq_logprob(ref_logp, response_mask, norm)
    return beta * s


def build_pairs(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.0,
    mode: str = "all",
    max_pairs_per_group: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs as row-index tensors (w_idx[P], l_idx[P]) with r_w − r_l > margin, same group.

    Vectorized over groups: rows are laid out in a [B, G_max] grid (row order kept inside a group),
    the [B, G_max, G_max] reward-gap matrix is masked by the pair rules and read back with nonzero().
    Pairs come out ordered by group, then winner, then loser position.
    """
    if mode not in ("all", "top"):
        raise ValueError(f"algorithm.amir.pair_mode: unknown {mode!r} (known: 'all', 'top')")
    n = rewards.numel()
    dev = rewards.device
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=dev)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if n == 0:
        return empty, empty
    _, gidx = torch.unique(group_ids, return_inverse=True)
    order = torch.argsort(gidx, stable=True)
    counts = torch.bincount(gidx)
    b, gmax = counts.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    gsorted = gidx[order]
    pos = torch.arange(n, device=dev) - starts[gsorted]
    slot = torch.full((b, gmax), -1, dtype=torch.long, device=dev)
    slot[gsorted, pos] = order
    filled = slot >= 0
    safe = slot.clamp(min=0)
    r = rewards.to(torch.float64)[safe]
    ok = filled & valid[safe]
    gap = r.unsqueeze(2) - r.unsqueeze(1)  # gap[b, w, l] = r_w - r_l
    cand = (gap > margin) & ok.unsqueeze(2) & ok.unsqueeze(1)
    if mode == "top":
        # the best valid rollout of each group; argmax returns the first maximum -> row-order tie-break
        top = torch.where(ok, r, torch.full_like(r, -float("inf"))).argmax(dim=1)
        is_top = torch.arange(gmax, device=dev).unsqueeze(0) == top.unsqueeze(1)
        cand = cand & is_top.unsqueeze(2)
    if max_pairs_per_group is not None:
        score = torch.where(cand, gap, torch.full_like(gap, -float("inf"))).flatten(1)
        ranked = torch.argsort(score, dim=1, descending=True, stable=True)
        rank = torch.empty_like(ranked)
        rank.scatter_(1, ranked, torch.arange(gmax * gmax, device=dev).expand(b, -1).contiguous())
        cand = cand & (rank < max_pairs_per_group).view(b, gmax, gmax)
    bi, wi, li = cand.nonzero(as_tuple=True)
    return slot[bi, wi], slot[bi, li]


def pair_loss_sum(s: torch.Tensor, w_idx: torch.Tensor, l_idx: torch.Tensor) -> torch.Tensor:
    """Σ_pairs −log σ(s_w − s_l) (divide by the global P for L_pair). Differentiable in ``s``."""
    return F.softplus(-(s[w_idx] - s[l_idx])).sum()


def pair_coefficients(
    s: torch.Tensor, w_idx: torch.Tensor, l_idx: torch.Tensor, beta: float, num_pairs: float
) -> torch.Tensor:
    """c_i = ∂L_pair/∂ℓ̄_i (detached), L_pair = Σ −log σ(s_w − s_l) / num_pairs, s = β ℓ̄ + const.

    d/dd [−log σ(d)] = −σ(−d), d = s_w − s_l, ∂d/∂ℓ̄_w = β, ∂d/∂ℓ̄_l = −β.
    """
    with torch.no_grad():
        c = torch.zeros_like(s)
        if w_idx.numel() == 0 or num_pairs <= 0:
            return c
        g = torch.sigmoid(-(s[w_idx] - s[l_idx])) * (beta / float(num_pairs))
        c.index_add_(0, w_idx, -g)
        c.index_add_(0, l_idx, g)
        return c


@dataclass
class AmirState:
    """λ of the pair term and its schedule; ``state_dict()`` goes into the training checkpoint.

    Defaults are the reference code's constants (λ₀ = 0.01, [0.005, 0.05], ratio band [0.30, 0.70],
    ×1.25 / ×0.8). ``step`` counts applied updates (optimizer steps that had pairs).
    """

    lam: float = 0.01
    step: int = 0
    lambda_min: float = 0.005
    lambda_max: float = 0.05
    ratio_low: float = 0.30
    ratio_high: float = 0.70
    lambda_up: float = 1.25
    lambda_down: float = 0.8
    last_q: float = float("nan")

    @classmethod
    def from_config(cls, amir_cfg: Any) -> "AmirState":
        """From an ``AmirConfig`` (megatron_amir.config)."""
        return cls(
            lam=float(amir_cfg.lambda_init),
            lambda_min=float(amir_cfg.lambda_min),
            lambda_max=float(amir_cfg.lambda_max),
            ratio_low=float(amir_cfg.ratio_low),
            ratio_high=float(amir_cfg.ratio_high),
            lambda_up=float(amir_cfg.lambda_up),
            lambda_down=float(amir_cfg.lambda_down),
        )

    def update(self, pair_loss: float, grpo_loss: float) -> float:
        """Apply the reference rule once; returns q = λ·L_pair / max(1e-9, L_GRPO) (with the old λ).

        A non-positive GRPO loss makes the denominator 1e-9, so q is huge and λ shrinks (as in the reference).
        """
        q = self.lam * float(pair_loss) / max(1e-9, float(grpo_loss))
        if q < self.ratio_low:
            self.lam = min(self.lambda_max, self.lam * self.lambda_up)
        elif q > self.ratio_high:
            self.lam = max(self.lambda_min, self.lam * self.lambda_down)
        self.step += 1
        self.last_q = q
        return q

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "lam": float(self.lam), "step": int(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("lam", "step"):
            if key not in state:
                raise KeyError(f"AmirState.load_state_dict: missing key {key!r} (got {sorted(state)})")
        lam = float(state["lam"])
        if not lam >= 0 or lam == float("inf"):
            raise ValueError(f"AmirState.load_state_dict: lam must be finite and >= 0, got {lam}")
        self.lam = lam
        self.step = int(state["step"])
