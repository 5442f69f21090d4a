"""AMIR-GRPO's implicit pairwise regularizer (arXiv 2601.03661) in detached-coefficient form.

Inside each group (one prompt, G rollouts) every ordered pair (w, l) with r_w − r_l > margin is a
preference pair (strict: ties never pair). Modes: ``all`` (every such pair) and ``top`` (the best
rollout, first in row order on ties, against each worse one). ``max_pairs_per_group`` keeps the pairs
with the largest reward gaps; on equal gaps the pair enumerated first wins, pairs being enumerated with
the rows in reward-descending order (stable), so the pair whose winner has the higher reward. This is the
reference code's ``_build_contrastive_pairs``: rewards [1, 2, 0], margin 0.5, cap 2 keep (1, 2) and (1, 0).

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
loss, and skips the update when a batch has no pairs; ``prepare_batch`` does the same, but only
proposes the new λ (``AmirState.proposed``): the trainer commits it once the optimizer step succeeded.

Everything here is torch on the inputs' device; float64 loop references live in tests/test_amir.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
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


@dataclass
class _Grid:
    """Rows laid out on a [B, G_max] grid: ``slot[b, k]`` = row index (``n`` for padding), ``ok`` = a valid row.
    ``view``: the trainer's layout (rows [k·G, (k+1)·G) form group k, kept in row order): the grid is a view."""

    slot: torch.Tensor
    ok: torch.Tensor
    n: int
    view: bool

    def take(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """x[N] on the grid (padding cells read ``fill``; ``ok`` masks them)."""
        return x.view(self.slot.shape) if self.view else torch.cat([x, x.new_full((1,), fill)])[self.slot]

    def outer(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """x_w − x_l on the [B, G, G] cells (w, l) for x[N] (padding cells read ``fill``)."""
        if self.view:  # straight from the rows: no [B, G] copy
            b, g = self.slot.shape
            return x.view(b, g, 1) - x.view(b, 1, g)
        xg = self.take(x, fill)
        return xg.unsqueeze(2) - xg.unsqueeze(1)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values back to rows [N] (padding dropped; rows that are not valid get what their cell holds)."""
        if self.view:
            return x.reshape(self.n)
        out = x.new_zeros(self.n + 1).scatter_(0, self.slot.reshape(-1), x.reshape(-1))
        return out[: self.n]


def _group_grid(gidx: torch.Tensor, valid: torch.Tensor, num_groups: int, r: Optional[torch.Tensor] = None) -> _Grid:
    """The grid of groups ``gidx[N]`` (dense 0..B-1). With ``r``: each group's cells in the reference code's
    enumeration order, reward descending, ties (and invalid rows, last) in row order."""
    n, dev = gidx.shape[0], gidx.device
    layout = _contiguous_layout(n, num_groups, dev) if n % num_groups == 0 else None
    if layout is not None and torch.equal(gidx, layout[0]):
        grid = _Grid(layout[1], valid.reshape(num_groups, -1), n, True)
    else:
        counts = torch.bincount(gidx, minlength=num_groups)
        order = torch.argsort(gidx, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        g_sorted = gidx[order]
        pos = torch.arange(n, device=dev) - starts[g_sorted]
        slot = torch.full((num_groups, int(counts.max())), n, dtype=torch.long, device=dev)
        slot[g_sorted, pos] = order
        grid = _Grid(slot, torch.cat([valid, valid.new_zeros(1)])[slot], n, False)
    if r is not None:
        key = torch.where(grid.ok, grid.take(r), -math.inf)
        perm = torch.sort(key, dim=1, descending=True, stable=True).indices
        grid = _Grid(grid.slot.gather(1, perm), grid.ok.gather(1, perm), n, False)
    return grid


@functools.lru_cache(maxsize=16)
def _contiguous_layout(n: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(group index, slot grid) of the trainer's layout (G = n / b rows per group), built once per shape; read-only."""
    rows = torch.arange(n, device=device)
    return rows // (n // b), rows.view(b, -1)


@functools.lru_cache(maxsize=16)
def _nan(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim NaN, built once (a Python NaN in ``torch.where`` makes a new tensor on every call); read-only."""
    return torch.tensor(math.nan, dtype=dtype, device=device)


def _candidates(r: torch.Tensor, valid: torch.Tensor, grid: _Grid, margin: float, mode: str,
                cap: Optional[int]) -> torch.Tensor:
    """cand[b, w, l]: (w, l) is a kept pair of group b (cells of ``grid``); ``valid[N]``: rows that may pair."""
    r = torch.where(valid, r, _nan(r.dtype, r.device))  # invalid rows and padding: NaN never wins or loses
    gap = grid.outer(r, math.nan)  # gap[b, w, l] = r_w − r_l
    cand = gap > margin
    if mode == "top":
        # the best valid rollout of each group; argmax returns the first maximum -> row-order tie-break
        rg = grid.take(r, math.nan)
        top = torch.where(grid.ok, rg, -math.inf).argmax(dim=1)
        cand &= (torch.arange(rg.shape[1], device=r.device) == top.unsqueeze(1)).unsqueeze(2)
    if cap is not None:
        # cells are in reward-descending order (``_group_grid`` with r), so flattening (w, l) enumerates the pairs
        # as the reference code does; a stable sort by gap then keeps, on equal gaps, the earlier-enumerated pair
        b, gmax = gap.shape[0], gap.shape[1]
        score = torch.where(cand, gap, -math.inf).reshape(b, -1)
        ranked = torch.sort(score, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(gmax * gmax, device=r.device).expand(b, -1))
        cand &= (rank < cap).view(b, gmax, gmax)
    return cand


def _check_mode(mode: str) -> None:
    if mode not in ("all", "top"):
        raise ValueError(f"algorithm.amir.pair_mode: unknown {mode!r} (known: 'all', 'top')")


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

    Same pairs as ``pair_statistics`` uses; for inspection and tests (the training step needs only the sums).
    """
    _check_mode(mode)
    n, dev = rewards.numel(), rewards.device
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e
    valid = torch.ones(n, dtype=torch.bool, device=dev) if valid is None else valid.to(device=dev, dtype=torch.bool)
    uniq, gidx = torch.unique(group_ids.to(dev), return_inverse=True)
    r = rewards.detach().to(torch.float64)
    grid = _group_grid(gidx, valid, int(uniq.numel()), r if max_pairs_per_group is not None else None)
    bi, wi, li = torch.nonzero(_candidates(r, valid, grid, margin, mode, max_pairs_per_group), as_tuple=True)
    return grid.slot[bi, wi], grid.slot[bi, li]


@dataclass
class PairStats:
    """One rank's pair sums (tensors on the rewards' device, float64).

    ``sums`` = {"pairs": P, "pair_loss_sum": Σ −log σ(d), "pair_correct": #(d > 0), "pair_margin_sum": Σ d}
    over this rank's pairs (d = s_w − s_l); ``coef_sum[N]`` = Σ_{(w,i)} σ(−d) − Σ_{(i,l)} σ(−d), so that
    c_i = β·coef_sum_i / P_global.
    """

    sums: dict[str, torch.Tensor]
    coef_sum: torch.Tensor


def pair_statistics(
    r: torch.Tensor,
    gidx: torch.Tensor,
    valid: torch.Tensor,
    s: torch.Tensor,
    *,
    beta: float = 1.0,
    num_groups: Optional[int] = None,
    margin: float = 0.0,
    mode: str = "all",
    max_pairs_per_group: Optional[int] = None,
) -> PairStats:
    """Pairs of rewards ``r[N]`` inside groups ``gidx[N]`` (dense 0..B-1) and their terms under implicit rewards
    β·``s[N]``, as masked reductions over a [B, G_max, G_max] grid of (winner, loser) cells, on ``r``'s device.
    """
    _check_mode(mode)
    n, dev = r.shape[0], r.device
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        return PairStats({k: zero for k in _PAIR_SUMS}, torch.zeros(0, dtype=torch.float64, device=dev))
    b = int(num_groups) if num_groups is not None else int(gidx.max()) + 1
    # (every op here is a separate small kernel call, whose fixed cost dominates at [B, G, G] sizes: hence no
    # detach on tensors that need no grad, and each product reused)
    r = (r.detach() if r.requires_grad else r).to(torch.float64)
    s = (s.detach() if s.requires_grad else s).to(device=dev, dtype=torch.float64) * beta
    grid = _group_grid(gidx, valid, b, r if max_pairs_per_group is not None else None)
    cand = _candidates(r, valid, grid, margin, mode, max_pairs_per_group)
    d = grid.outer(s)  # d[b, w, l] = s_w − s_l, so d.mT = −d
    c = cand.to(torch.float64)
    log_sig = F.logsigmoid(d)
    dc = d * c  # d on the pairs, 0 elsewhere: a pair is correct iff dc > 0
    sums = dict(zip(_PAIR_SUMS, (c.sum(), -(log_sig * c).sum(), (dc > 0).sum(dtype=torch.float64), dc.sum())))
    g = log_sig.mT.exp() * c  # σ(−d[b,w,l]) = σ(d[b,l,w]) on every pair (w, l)
    coef = (g - g.mT).sum(1)  # Σ_w g[b,w,i] − Σ_l g[b,i,l]: losers +, winners −
    return PairStats(sums, grid.put(coef))


_PAIR_SUMS = ("pairs", "pair_loss_sum", "pair_correct", "pair_margin_sum")


def pair_loss_sum(s: torch.Tensor, w_idx: torch.Tensor, l_idx: torch.Tensor) -> torch.Tensor:
    """Σ_pairs −log σ(s_w − s_l) (divide by the global P for L_pair). Differentiable in ``s``."""
    return F.softplus(-(s[w_idx] - s[l_idx])).sum()


def pair_coefficients(
    s: torch.Tensor,
    w_idx: torch.Tensor,
    l_idx: torch.Tensor,
    beta: float,
    num_pairs: float,
    diff: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """c_i = ∂L_pair/∂ℓ̄_i (detached), L_pair = Σ −log σ(s_w − s_l) / num_pairs, s = β ℓ̄ + const.

    On an explicit pair list (``build_pairs``); ``pair_statistics`` forms the same sums on the group grid.

    d/dd [−log σ(d)] = −σ(−d), d = s_w − s_l, ∂d/∂ℓ̄_w = β, ∂d/∂ℓ̄_l = −β. ``diff``: precomputed s_w − s_l.
    """
    with torch.no_grad():
        c = torch.zeros_like(s)
        if w_idx.numel() == 0 or num_pairs <= 0:
            return c
        d = s[w_idx] - s[l_idx] if diff is None else diff
        g = torch.sigmoid(-d) * (beta / float(num_pairs))
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

    def proposed(self, pair_loss: float, grpo_loss: float) -> "AmirState":
        """The state after one application of the reference rule (``self`` is unchanged); its ``last_q`` is
        q = λ·L_pair / max(1e-9, L_GRPO) with the old λ.

        A non-positive GRPO loss makes the denominator 1e-9, so q is huge and λ shrinks (as in the reference).
        """
        q = self.lam * float(pair_loss) / max(1e-9, float(grpo_loss))
        lam = self.lam
        if q < self.ratio_low:
            lam = min(self.lambda_max, lam * self.lambda_up)
        elif q > self.ratio_high:
            lam = max(self.lambda_min, lam * self.lambda_down)
        return replace(self, lam=lam, step=self.step + 1, last_q=q)

    def update(self, pair_loss: float, grpo_loss: float) -> float:
        """Apply the rule in place (``proposed`` + commit); returns q."""
        new = self.proposed(pair_loss, grpo_loss)
        self.lam, self.step, self.last_q = new.lam, new.step, new.last_q
        return new.last_q

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
