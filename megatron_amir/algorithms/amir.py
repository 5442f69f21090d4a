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

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import native


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


_DENSE_MAX_ROWS = 1024  # N x N masks up to ~1M entries; beyond that the per-group grid is cheaper


def build_pairs(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.0,
    mode: str = "all",
    max_pairs_per_group: Optional[int] = None,
    dense: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs as row-index tensors (w_idx[P], l_idx[P]) with r_w − r_l > margin, same group.

    Torch front end of ``pairs_numpy`` (the indices come back on ``rewards.device``).
    """
    n = rewards.numel()
    v = np.ones(n, dtype=bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
    w, l = pairs_numpy(
        rewards.detach().cpu().double().numpy(), group_ids.detach().cpu().numpy(), v,
        margin=margin, mode=mode, max_pairs_per_group=max_pairs_per_group, dense=dense,
    )
    dev = rewards.device
    return torch.from_numpy(w).to(dev), torch.from_numpy(l).to(dev)


def pairs_numpy(
    r: np.ndarray,
    group_ids: np.ndarray,
    valid: np.ndarray,
    *,
    margin: float = 0.0,
    mode: str = "all",
    max_pairs_per_group: Optional[int] = None,
    dense: Optional[bool] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (w_idx, l_idx) as int64 arrays. Rewards, ids and the validity mask are tiny per-sequence
    arrays, so the pair bookkeeping runs on the host in float64 (a few microseconds; no device launches).

    Two vectorized layouts with identical results (``dense=None`` picks by size): an N×N same-group
    mask (fastest for the usual few hundred rows per rank) or a [B, G_max, G_max] per-group grid (memory
    linear in N). ``max_pairs_per_group`` keeps the largest gaps, ties broken by (winner, loser) row order.
    """
    if mode not in ("all", "top"):
        raise ValueError(f"algorithm.amir.pair_mode: unknown {mode!r} (known: 'all', 'top')")
    r = np.asarray(r, dtype=np.float64)
    n = r.shape[0]
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    if dense is None:
        dense = n <= _DENSE_MAX_ROWS
    fn = _pairs_dense if dense else _pairs_grid
    w, l = fn(r, np.asarray(group_ids), np.asarray(valid, dtype=bool), margin, mode, max_pairs_per_group)
    return w.astype(np.int64, copy=False), l.astype(np.int64, copy=False)


def _pairs_dense(r, group_ids, valid, margin, mode, cap):
    n = r.shape[0]
    same = (group_ids[:, None] == group_ids[None, :]) & valid[:, None] & valid[None, :]
    gap = r[:, None] - r[None, :]  # gap[w, l] = r_w - r_l
    cand = same & (gap > margin)
    if mode == "top":
        # w is its group's top rollout iff no valid same-group row beats it or ties it earlier in row order
        idx = np.arange(n)
        beats = (gap < 0) | ((gap == 0) & (idx[None, :] < idx[:, None]))  # [w, j]: j beats w
        cand &= (valid & ~(same & beats).any(1))[:, None]
    w, l = np.nonzero(cand)
    if cap is not None and w.size:
        # rank candidates inside each group by gap (desc), ties by (w, l) row order: two stable sorts
        _, g = np.unique(group_ids, return_inverse=True)
        g = g.reshape(-1)[w]
        o1 = np.argsort(-gap[w, l], kind="stable")
        order = o1[np.argsort(g[o1], kind="stable")]
        gs = g[order]
        counts = np.bincount(gs)
        starts = np.cumsum(counts) - counts
        rank = np.arange(order.size) - starts[gs]
        keep = np.sort(order[rank < cap])
        w, l = w[keep], l[keep]
    return w, l


def _pairs_grid(r, group_ids, valid, margin, mode, cap):
    _, gidx = np.unique(group_ids, return_inverse=True)
    gidx = gidx.reshape(-1)
    counts = np.bincount(gidx)
    b, gmax = counts.size, int(counts.max())
    slot, ok = _group_slots(gidx, valid, counts)
    rg = np.where(ok, r[np.maximum(slot, 0)], np.nan)
    gap = rg[:, :, None] - rg[:, None, :]  # gap[b, w, l] = r_w - r_l
    with np.errstate(invalid="ignore"):
        cand = gap > margin
    if mode == "top":
        # the best valid rollout of each group; argmax returns the first maximum -> row-order tie-break
        top = np.where(ok, rg, -np.inf).argmax(axis=1)
        cand &= (np.arange(gmax)[None, :] == top[:, None])[:, :, None]
    if cap is not None:
        score = np.where(cand, gap, -np.inf).reshape(b, -1)
        ranked = np.argsort(-score, axis=1, kind="stable")
        rank = np.empty_like(ranked)
        np.put_along_axis(rank, ranked, np.broadcast_to(np.arange(gmax * gmax), (b, gmax * gmax)), axis=1)
        cand &= (rank < cap).reshape(b, gmax, gmax)
    bi, wi, li = np.nonzero(cand)
    return slot[bi, wi], slot[bi, li]


def pair_terms_numpy(
    s: np.ndarray, w: np.ndarray, l: np.ndarray, beta: float
) -> tuple[float, float, float, np.ndarray]:
    """Host-side pair sums for implicit rewards s[N] (float64): (Σ −log σ(d), #(d > 0), Σ d, g) with
    d = s_w − s_l and g = β·σ(−d) per pair (the unnormalized coefficient magnitudes)."""
    d = s[w] - s[l]
    return (
        float(np.logaddexp(0.0, -d).sum()),
        float((d > 0).sum()),
        float(d.sum()),
        beta * np.exp(-np.logaddexp(0.0, d)),  # σ(−d), overflow-free
    )


def coefficients_from_terms(g: np.ndarray, w: np.ndarray, l: np.ndarray, n: int, num_pairs: float) -> np.ndarray:
    """c_i = (Σ_{(w,i)} g − Σ_{(i,l)} g) / P: the loser side gets +βσ(−d)/P, the winner side −βσ(−d)/P."""
    return (np.bincount(l, g, minlength=n) - np.bincount(w, g, minlength=n)) / float(num_pairs)


@dataclass
class PairStats:
    """One rank's pair sums for implicit rewards s (tensors on the rewards' device).

    ``sums`` = [P, Σ −log σ(d), #(d > 0), Σ d] over this rank's pairs (d = s_w − s_l), and ``coef_sum[N]`` =
    Σ_{(w,i)} σ(−d) − Σ_{(i,l)} σ(−d), so that c_i = β·coef_sum_i / P_global. ``coef_norm[N]`` =
    coef_sum_i / max(1, |y_i|) when lengths were given (the per-token coefficient of the ``mean`` norm).
    Both live in ``rows`` (one [k, N] tensor, so a caller scales them in one op), accumulated in float64 and
    stored in the dtype of ``s`` (float32 or float64).
    """

    sums: torch.Tensor
    rows: torch.Tensor  # [1, N] = coef_sum, or [2, N] = (coef_sum, coef_norm)
    _views: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows[0], rows[-1] as an [N, 1] column): the per-sequence and the per-token coefficient rows."""
        return self._views if self._views is not None else (self.rows[0], self.rows[-1].unsqueeze(1))

    @property
    def coef_sum(self) -> torch.Tensor:
        return self.rows[0]

    @property
    def coef_norm(self) -> Optional[torch.Tensor]:
        return self.rows[1] if self.rows.shape[0] > 1 else None


_FLOATS = (torch.float64, torch.float32)


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
    lengths: Optional[torch.Tensor] = None,
) -> PairStats:
    """Pairs of rewards ``r[N]`` inside groups ``gidx[N]`` (dense 0..B-1) and their terms under implicit rewards
    ``β·s[N]``. Same pairs as ``pairs_numpy``, same sums as ``pair_terms_numpy`` + ``coefficients_from_terms``;
    with ``lengths[N]`` also ``coef_norm`` = coef_sum / max(1, length).

    Without a cap this is one call of the C kernel ``pair_kernel.c`` (``native.py``; on the host, so CUDA
    inputs are copied over, a few hundred numbers) or, when that cannot be built, the torch grid
    ``_pair_statistics_torch``. With a cap the pairs are ranked on the host first (``pairs_numpy``).
    """
    if mode not in ("all", "top"):
        raise ValueError(f"algorithm.amir.pair_mode: unknown {mode!r} (known: 'all', 'top')")
    if max_pairs_per_group is None:
        kernel = native.pair_kernel()
        if kernel is not None:
            return _pair_statistics_native(kernel, r, gidx, valid, s, beta, num_groups, margin, mode, lengths)
    n, dev = r.shape[0], r.device
    s_dtype = s.dtype if s.dtype in _FLOATS else torch.float64
    r, s = r.to(torch.float64), s.to(torch.float64) * beta
    if n == 0:
        sums, coef = torch.zeros(4, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.float64, device=dev)
    elif max_pairs_per_group is not None:
        w, l = pairs_numpy(r.cpu().numpy(), gidx.cpu().numpy(), valid.cpu().numpy(), margin=margin, mode=mode,
                           max_pairs_per_group=max_pairs_per_group)
        loss_sum, correct, margin_sum, sig = pair_terms_numpy(s.cpu().numpy(), w, l, 1.0)
        sums = torch.tensor([float(w.size), loss_sum, correct, margin_sum], dtype=torch.float64, device=dev)
        coef = torch.from_numpy(coefficients_from_terms(sig, w, l, n, 1.0)).to(dev)
    else:
        sums, coef = _pair_statistics_torch(r, gidx, valid, s, num_groups, margin, mode)
    rows = [coef] if lengths is None else [coef, coef / lengths.to(device=dev, dtype=torch.float64).clamp(min=1)]
    return PairStats(sums, torch.stack(rows).to(s_dtype))


def _host(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``t`` as C-contiguous host memory of one of ``dtypes`` (the first when converting); no copy when it is."""
    if not t.is_cpu or t.dtype not in dtypes or not t.is_contiguous():
        t = t.detach().to(device="cpu", dtype=t.dtype if t.dtype in dtypes else dtypes[0]).contiguous()
    return t


_buffers = threading.local()  # pair_kernel_call(reuse_buffers=True): (n, k, dtype) -> (sums, rows, views), per thread


def _outputs(n: int, k: int, dtype: torch.dtype, reuse: bool):
    if reuse:
        cache = getattr(_buffers, "by_shape", None)
        if cache is None:
            cache = _buffers.by_shape = {}
        out = cache.get((n, k, dtype))
        if out is None:
            if len(cache) > 8:  # varying batch shapes: keep a few, not one per shape ever seen
                cache.clear()
            rows = torch.empty(k, n, dtype=dtype)
            out = cache[(n, k, dtype)] = (torch.empty(4, dtype=torch.float64), rows, (rows[0], rows[-1].unsqueeze(1)))
        return out
    return torch.empty(4, dtype=torch.float64), torch.empty(k, n, dtype=dtype), None


def _pair_statistics_native(kernel, r, gidx, valid, s, beta, num_groups, margin, mode, lengths) -> PairStats:
    dev, n = r.device, r.shape[0]
    r, gidx, valid = _host(r, (torch.float64,)), _host(gidx, (torch.int64,)), _host(valid, (torch.bool,))
    s = _host(s, _FLOATS)
    b = int(num_groups) if num_groups is not None else (int(gidx.max()) + 1 if n else 0)
    if lengths is not None:
        lengths = _host(lengths, _FLOATS)
    st = pair_kernel_call(kernel, n, b, gidx, r, valid, s, lengths, float(beta), float(margin), mode == "top", False)
    return st if dev.type == "cpu" else PairStats(st.sums.to(dev), st.rows.to(dev))


def pair_kernel_call(kernel, n: int, b: int, gidx: torch.Tensor, r: torch.Tensor, valid: torch.Tensor,
                     s: torch.Tensor, lengths: Optional[torch.Tensor], beta: float, margin: float, top: bool,
                     reuse_buffers: bool) -> PairStats:
    """The C kernel on inputs that are already host, C-contiguous [n] tensors of the right dtypes: r float64,
    gidx int64 (in [0, b)), valid bool, s and lengths (or None) float32 or float64. No conversion, no check
    beyond the kernel's own group-index bound: ``prepare_batch`` builds exactly such inputs and calls this
    directly, since in a training step ``pair_statistics``' argument handling costs more than the kernel
    (docs/benchmarks.md). Returns c_i (and c_i / |y_i|) in s's dtype. ``reuse_buffers``: write into per-thread
    buffers that the next such call overwrites (for a caller that consumes the result at once, as
    ``prepare_batch`` does), saving two allocations."""
    sums, rows, views = _outputs(n, 1 if lengths is None else 2, s.dtype, reuse_buffers)
    s32 = s.dtype is torch.float32
    rc = kernel(n, b, gidx.data_ptr(), r.data_ptr(), valid.data_ptr(), s.data_ptr(), s32, beta,
                None if lengths is None else lengths.data_ptr(), lengths is not None and lengths.dtype is torch.float32,
                margin, top, sums.data_ptr(), rows.data_ptr(), s32)
    if rc != 0:
        raise ValueError(f"pair_statistics: group index out of range [0, {b})" if rc == -1
                         else f"pair_statistics: native kernel failed (code {rc})")
    return PairStats(sums, rows, views)


def _pair_statistics_torch(r, gidx, valid, s, num_groups, margin, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of the C kernel (float64 ``r``, ``s`` with β applied): every pair sum as a masked
    reduction over [B, G_max, G_max] grids, a view when groups are contiguous and equal-sized."""
    n, dev = r.shape[0], r.device
    b = int(num_groups) if num_groups is not None else int(gidx.max()) + 1
    slot = None
    if n % b == 0 and torch.equal(gidx, _contiguous_groups(n, b, gidx.device)):
        rg, sg, ok = r.view(b, -1), s.view(b, -1), valid.view(b, -1)
    else:
        g_np = gidx.cpu().numpy()
        slot_np, ok_np = _group_slots(g_np, valid.cpu().numpy(), np.bincount(g_np))
        slot, ok = torch.from_numpy(slot_np).to(dev), torch.from_numpy(ok_np).to(dev)
        rows = slot.clamp(min=0)  # padding cells read row 0; ``ok`` masks them
        rg, sg = r[rows], s[rows]
    rg = torch.where(ok, rg, _nan(dev))  # invalid rows and padding: NaN never wins or loses a comparison
    cand = (rg.unsqueeze(2) - rg.unsqueeze(1)) > margin  # cand[b, w, l]: r_w − r_l > margin
    if mode == "top":
        # the best valid rollout of each group; argmax returns the first maximum -> row-order tie-break
        top = torch.where(ok, rg, -math.inf).argmax(dim=1)
        cand &= (torch.arange(rg.shape[1], device=dev) == top.unsqueeze(1)).unsqueeze(2)
    d = sg.unsqueeze(2) - sg.unsqueeze(1)  # d[b, w, l] = s_w − s_l, so d.mT = −d
    c = cand.to(torch.float64)
    log_sig = F.logsigmoid(d)
    sums = torch.stack([
        c.sum(), -(log_sig * c).sum(), (cand & (d > 0)).sum(dtype=torch.float64), (d * c).sum(),
    ])
    g = log_sig.mT.exp() * c  # σ(−d[b,w,l]) = σ(d[b,l,w]) on every pair (w, l)
    coef = (g - g.mT).sum(1)  # Σ_w g[b,w,i] − Σ_l g[b,i,l]: losers +, winners −
    if slot is None:
        return sums, coef.view(n)
    flat = torch.zeros(n, dtype=torch.float64, device=dev)
    flat[slot[ok]] = coef[ok]
    return sums, flat


@functools.lru_cache(maxsize=4)
def _nan(device: torch.device) -> torch.Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=16)
def _contiguous_groups(n: int, b: int, device: torch.device) -> torch.Tensor:
    """The group index of the trainer's layout: rows [k·G, (k+1)·G) form group k (G = n / b)."""
    return torch.arange(n, device=device) // (n // b)


def _group_slots(gidx: np.ndarray, valid: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row index of every (group, position) cell (-1 for padding) and whether the cell is a valid row."""
    n = gidx.shape[0]
    order = np.argsort(gidx, kind="stable")
    starts = np.cumsum(counts) - counts
    gsorted = gidx[order]
    slot = np.full((counts.size, int(counts.max())), -1, dtype=np.int64)
    slot[gsorted, np.arange(n) - starts[gsorted]] = order
    ok = slot >= 0
    ok[ok] = valid[slot[ok]]
    return slot, ok


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

    Torch form (any device); ``prepare_batch`` uses the host twin ``pair_terms_numpy`` +
    ``coefficients_from_terms`` (same formula, float64).

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
