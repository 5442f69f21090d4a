"""From a global rollout batch to per-row tensors the train step consumes, and the micro-batch loss.

``prepare_batch`` runs once per optimizer step on each data-parallel rank, on that rank's rows of the
global batch (whole groups: every row of a group on the same rank). It computes, with the global
normalizers all-reduced over ``dp_group`` (two small all-reduces of named float64 sums, ``allreduce_sums``),
in four steps: validation, advantages and token weights, pair coefficients, metrics:

- advantages[N] (registry ``advantages.ADVANTAGE_ESTIMATORS``; zero-variance groups -> 0),
- token_weights[N, T] such that the policy loss of the WHOLE global batch is Σ w·ℓ over every row of every
  micro-batch and rank (``aggregation.py``),
- the AMIR pair coefficients (formulas: ``amir.py``): pairs, implicit rewards s_i (no grad), c_i = ∂L_pair/∂ℓ̄_i,
  the proposed adaptive-λ update (used in this step, as the reference does; the caller commits it when the
  update succeeded), seq_coef[N] = λ·c_i,
- metrics (floats, identical on every rank).

``micro_batch_loss(logp, mb, cfg)`` on rows ``mb = prepared.select(idx)`` returns
    loss = Σ w_t·ℓ_t (·TIS) + kl_coef·Σ w_t·k(δ_t) + Σ_i seq_coef_i·ℓ̄_i(logp)
and the micro-batch losses are SUMMED over micro-batches and DP ranks to give the exact global loss
(if a data-parallel wrapper averages gradients over ranks, multiply each loss by the DP size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import torch

from .advantages import ADVANTAGE_ESTIMATORS, group_index, zero_variance_groups
from .aggregation import row_scale, weights_from_scale
from .amir import AmirState, PairStats, pair_statistics, seq_logprob
from .kl import kl_penalty, kl_reward_penalty
from .policy_loss import policy_loss, tis_weight

_ROW_FIELDS = (
    "advantages", "token_weights", "seq_coef", "old_logp", "response_mask", "ref_logp", "rollout_logp",
    "pg_weights", "pair_token_coef",
)


@dataclass
class PreparedBatch:
    """Per-row tensors for one optimizer step (rows of this DP rank). All float tensors share one dtype
    (float32, or float64 when old_logp is float64).

    advantages[N]; token_weights[N,T] global aggregation weights; seq_coef[N] = λ·c_i (detached);
    old_logp / ref_logp / rollout_logp [N,T]; response_mask[N,T] (float 0/1);
    pg_weights[N,T] = token_weights · TIS weight (None without TIS: the policy loss uses token_weights);
    pair_token_coef[N,T] = the coefficient of logp in the AMIR pair term, Σ_i seq_coef_i·ℓ̄_i(logp) =
    Σ pair_token_coef·logp: seq_coef_i·m_t/|y_i| (``mean``) or seq_coef_i·m_t (``sum``), built once per step
    (not per micro-batch); None when the step has no pair term (AMIR off, no pairs, or λ = 0) so plain GRPO
    pays nothing for it;
    metrics: floats for logging (same on every rank); amir_state: λ and its schedule after this step's
    adaptive update (the λ ``seq_coef`` uses), to be committed by the caller once the update is applied.
    """

    advantages: torch.Tensor
    token_weights: torch.Tensor
    seq_coef: torch.Tensor
    old_logp: torch.Tensor
    response_mask: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None
    pg_weights: Optional[torch.Tensor] = None
    pair_token_coef: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)
    amir_state: Optional[AmirState] = None

    def __len__(self) -> int:
        return int(self.advantages.shape[0])

    def select(self, index: Any) -> "PreparedBatch":
        """The rows ``index`` (slice, list, LongTensor or bool mask) as a new PreparedBatch."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long, device=self.advantages.device)
        kw = {f: (None if getattr(self, f) is None else getattr(self, f)[index]) for f in _ROW_FIELDS}
        return replace(self, **kw, metrics=dict(self.metrics))

    def to(self, device: Any) -> "PreparedBatch":
        kw = {f: (None if getattr(self, f) is None else getattr(self, f).to(device)) for f in _ROW_FIELDS}
        return replace(self, **kw)


def _check(name: str, t: Optional[torch.Tensor], shape: Sequence[int]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"prepare_batch: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"prepare_batch: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def allreduce_sums(sums: dict[str, torch.Tensor], group: Any) -> dict[str, float]:
    """Sum every named scalar over ``group`` (None: this rank only) in one packed float64 all-reduce.

    Packed in sorted-name order, so every rank must pass the same names (it does: they depend on the config).
    """
    names = sorted(sums)
    vec = torch.stack([sums[k].to(torch.float64) for k in names]) if names else torch.zeros(0, dtype=torch.float64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(names, vec.tolist()))


@dataclass
class _Rows:
    """This rank's validated inputs in the batch dtype ``dt`` (rewards float64), and the group layout."""

    mask: torch.Tensor
    old: torch.Tensor
    ref: Optional[torch.Tensor]
    rollout: Optional[torch.Tensor]
    policy: torch.Tensor  # log-probs of the current policy for the implicit rewards (default old)
    rewards: torch.Tensor
    gidx: torch.Tensor
    num_groups: int
    lengths: torch.Tensor
    valid: torch.Tensor


def _validate(rewards, group_ids, response_mask, old_logp, ref_logp, rollout_logp, policy_logp, cfg) -> _Rows:
    """Shapes, required inputs and finiteness, with errors naming the argument or config field."""
    if old_logp.dim() != 2:
        raise ValueError(f"prepare_batch: old_logp must be [N, T], got shape {tuple(old_logp.shape)}")
    n, t = old_logp.shape
    _check("rewards", rewards, (n,))
    _check("group_ids", group_ids, (n,))
    _check("response_mask", response_mask, (n, t))
    _check("ref_logp", ref_logp, (n, t))
    _check("rollout_logp", rollout_logp, (n, t))
    _check("policy_logp", policy_logp, (n, t))
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("prepare_batch: ref_logp is required when algorithm.kl_coef > 0")
    if cfg.amir.enabled and cfg.amir.reference_anchored and ref_logp is None:
        raise ValueError("prepare_batch: ref_logp is required when algorithm.amir.reference_anchored=true")
    if cfg.advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm.advantage: unknown estimator {cfg.advantage!r}")
    dt = torch.float64 if old_logp.dtype == torch.float64 else torch.float32  # bf16/fp16 are upcast
    dev = old_logp.device
    with torch.no_grad():
        logps = {k: None if x is None else x.detach().to(dt) for k, x in
                 (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp),
                  ("policy_logp", policy_logp))}
        for name, x in logps.items():
            if x is not None and not bool(torch.isfinite(x).all()):
                raise ValueError(f"prepare_batch: {name} has non-finite values (log-probs must be finite everywhere)")
        r = rewards.detach().to(device=dev, dtype=torch.float64)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("prepare_batch: rewards has non-finite values")
        mask = response_mask.to(dt)
        lengths = mask.sum(-1)
        gidx, num_groups = group_index(group_ids.to(dev))
    old = logps["old_logp"]
    return _Rows(mask=mask, old=old, ref=logps["ref_logp"], rollout=logps["rollout_logp"],
                 policy=old if logps["policy_logp"] is None else logps["policy_logp"], rewards=r, gidx=gidx,
                 num_groups=num_groups, lengths=lengths, valid=lengths > 0)


@dataclass
class _Weights:
    """Advantages and token weights of one step, and the per-token quantities the metrics need."""

    adv: torch.Tensor  # [N] in the batch dtype
    adv64: torch.Tensor  # [N] float64
    w: torch.Tensor  # token weights [N, T]
    w_row: Union[float, torch.Tensor]  # w = m·w_row
    pg_w: torch.Tensor  # w, times the TIS weight when on
    tis: Optional[torch.Tensor]
    kl_tok: Optional[torch.Tensor]
    zero_var: torch.Tensor  # [B] bool


def _normalizer_sums(rows: _Rows, r_adv: torch.Tensor, zero_var: torch.Tensor, has_rows: torch.Tensor):
    vf = rows.valid.double()
    return {
        "tokens": rows.lengths.double().sum(), "seqs": vf.sum(),
        "groups": has_rows.double().sum(), "zero_variance_groups": zero_var.double().sum(),
        "reward_sum": (rows.rewards * vf).sum(), "adv_reward_sum": (r_adv * vf).sum(),
        "adv_reward_sq": (r_adv * r_adv * vf).sum(),
    }


def _advantages_and_weights(rows: _Rows, cfg: Any, dp_group: Any) -> tuple[_Weights, dict[str, float]]:
    """Advantages (registry ``ADVANTAGE_ESTIMATORS``; zero-variance groups -> 0) and the global token weights;
    all-reduces the normalizers (token / sequence counts, reward moments) and returns them too."""
    kl_tok = kl_penalty(rows.old, rows.ref, cfg.kl_estimator) if rows.ref is not None else None
    r_adv = rows.rewards
    if cfg.kl_coef > 0 and cfg.kl_in_reward:
        # the KL penalty shapes the advantages; pairs still use the verifier rewards (rankings)
        r_adv = r_adv - kl_reward_penalty(rows.old, rows.ref, rows.mask, cfg.kl_estimator, cfg.kl_coef).double()
    has_rows, zero_var = zero_variance_groups(r_adv, rows.gidx, rows.num_groups, rows.valid)
    g = allreduce_sums(_normalizer_sums(rows, r_adv, zero_var, has_rows), dp_group)
    if cfg.whiten_rewards:
        mu = g["adv_reward_sum"] / max(g["seqs"], 1.0)
        var = max(g["adv_reward_sq"] - g["seqs"] * mu * mu, 0.0) / max(g["seqs"] - 1.0, 1.0)
        r_adv = (r_adv - mu) / (math.sqrt(var) + cfg.adv_eps)
    adv64 = ADVANTAGE_ESTIMATORS[cfg.advantage](r_adv, rows.gidx, rows.num_groups, rows.valid, cfg.adv_eps)
    adv64 = torch.where(rows.valid & ~zero_var[rows.gidx], adv64, torch.zeros_like(adv64))
    w_row = row_scale(cfg.loss_agg_mode, rows.lengths, num_tokens=g["tokens"], num_seqs=g["seqs"],
                      max_len=cfg.loss_agg_max_len)
    w = weights_from_scale(rows.mask, w_row)
    tis = (tis_weight(rows.old, rows.rollout, cfg.tis_cap)
           if (rows.rollout is not None and cfg.tis_cap is not None) else None)
    weights = _Weights(adv=adv64.to(rows.old.dtype), adv64=adv64, w=w, w_row=w_row,
                       pg_w=w if tis is None else w * tis, tis=tis, kl_tok=kl_tok, zero_var=zero_var)
    return weights, g


def _implicit_reward_logprobs(rows: _Rows, lbar_mean: torch.Tensor, acfg: Any) -> torch.Tensor:
    """ℓ̄_θ(y_i) − ℓ̄_ref(y_i) (the reference term only when anchored): s_i / β. ``lbar_mean``: ℓ̄_θ (``mean``)."""
    s = lbar_mean if acfg.logprob_norm == "mean" else seq_logprob(rows.policy, rows.mask, "sum")
    if acfg.reference_anchored and rows.ref is not None:
        s = s - seq_logprob(rows.ref, rows.mask, acfg.logprob_norm)
    return s


def _local_metric_sums(rows: _Rows, wts: _Weights, lbar_mean: torch.Tensor, cfg: Any) -> dict[str, torch.Tensor]:
    """This rank's sums behind the step metrics (all-reduced with the pair sums)."""
    # L_GRPO at ratio 1 (π_θ = π_old): the value micro_batch_loss's policy+KL terms take at logp = old_logp;
    # the clipped surrogate of every registered loss equals −A there (dual-clip too)
    grpo = -(wts.adv * wts.pg_w.sum(-1)).sum()
    if cfg.kl_coef > 0 and not cfg.kl_in_reward:
        grpo = grpo + cfg.kl_coef * (wts.w * wts.kl_tok).sum()
    # correct-vs-incorrect: rollouts above / below their group's mean reward (verifier rewards)
    vf, r = rows.valid.double(), rows.rewards
    cnt = torch.zeros(rows.num_groups, dtype=torch.float64, device=r.device).index_add_(0, rows.gidx, vf)
    gmean = torch.zeros_like(cnt).index_add_(0, rows.gidx, r * vf) / cnt.clamp(min=1)
    above = (rows.valid & (r > gmean[rows.gidx])).double()
    below = (rows.valid & (r < gmean[rows.gidx])).double()
    lbar = lbar_mean.double()
    lengths = rows.lengths.double()
    out = {
        "grpo_loss": grpo, "adv_abs_sum": wts.adv64.abs().sum(),
        "lbar_above": (lbar * above).sum(), "n_above": above.sum(), "len_above": (lengths * above).sum(),
        "lbar_below": (lbar * below).sum(), "n_below": below.sum(), "len_below": (lengths * below).sum(),
    }
    if wts.kl_tok is not None:
        out["kl_sum"] = (wts.kl_tok * rows.mask).double().sum()
    if wts.tis is not None:
        out["tis_sum"] = (wts.tis * rows.mask).double().sum()
    return out


def _pair_coefficients(
    rows: _Rows, pairs: PairStats, g: dict[str, float], state: AmirState, acfg: Any,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """seq_coef[N] = λ·c_i = λβ·coef_sum_i/P and pair_token_coef[N, T], the coefficient of logp in
    Σ_i seq_coef_i·ℓ̄_i(logp): seq_coef_i·m_t/|y_i| for ``mean``, seq_coef_i·m_t for ``sum``; (None, None) when the
    step has no pair term (no pairs, or λ = 0)."""
    if g["pairs"] <= 0 or state.lam == 0.0:
        return None, None
    seq_coef = (pairs.coef_sum * (state.lam * acfg.beta / g["pairs"])).to(rows.old.dtype)
    per_row = seq_coef / rows.lengths.clamp(min=1) if acfg.logprob_norm == "mean" else seq_coef
    return seq_coef, rows.mask * per_row.unsqueeze(-1)


def _metrics(g: dict[str, float], rows: _Rows, wts: _Weights) -> dict[str, float]:
    def ratio(a: str, b: str) -> float:
        return g[a] / g[b] if g[b] else float("nan")

    metrics = {
        "num_sequences": g["seqs"],
        "num_tokens": g["tokens"],
        "num_groups": g["groups"],
        "zero_variance_groups": g["zero_variance_groups"],
        "reward_mean": g["reward_sum"] / max(g["seqs"], 1.0),
        "advantage_abs_mean": g["adv_abs_sum"] / max(g["seqs"], 1.0),
        "grpo_loss_ratio1": g["grpo_loss"],
        "logprob_mean_above": ratio("lbar_above", "n_above"),
        "logprob_mean_below": ratio("lbar_below", "n_below"),
        "logprob_gap_correct_incorrect": ratio("lbar_above", "n_above") - ratio("lbar_below", "n_below"),
        "response_len_above": ratio("len_above", "n_above"),
        "response_len_below": ratio("len_below", "n_below"),
    }
    if rows.ref is not None:
        metrics["kl"] = g["kl_sum"] / max(g["tokens"], 1.0)
    if wts.tis is not None:
        metrics["tis_weight_mean"] = g["tis_sum"] / max(g["tokens"], 1.0)
    if "pairs" in g:
        p = g["pairs"]
        metrics.update({
            "pair_count": p,
            "pair_accuracy": g["pair_correct"] / p if p > 0 else float("nan"),
            "pair_margin": g["pair_margin_sum"] / p if p > 0 else float("nan"),
            "pair_loss": g["pair_loss_sum"] / p if p > 0 else 0.0,
        })
    return metrics


def prepare_batch(
    *,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    old_logp: torch.Tensor,
    cfg: Any,
    amir_state: AmirState,
    ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    dp_group: Any = None,
    policy_logp: Optional[torch.Tensor] = None,
    update_lambda: bool = True,
    pair_metrics: bool = False,
) -> PreparedBatch:
    """Advantages, global token weights, AMIR coefficients and metrics for one optimizer step. No side effects:
    ``amir_state`` is read, never changed; the λ this step uses is in ``PreparedBatch.amir_state``, for the
    caller to commit when the update succeeded.

    cfg: ``AlgorithmConfig``. ``policy_logp`` (default ``old_logp``): no-grad log-probs of the CURRENT
    policy for the implicit rewards s_i — pass a fresh forward for later optimizer steps on the same
    rollouts (the first step has π_θ = π_old). ``update_lambda=False`` recomputes without moving λ.
    ``pair_metrics=True`` computes pair statistics even with AMIR disabled (for GRPO baselines).
    """
    rows = _validate(rewards, group_ids, response_mask, old_logp, ref_logp, rollout_logp, policy_logp, cfg)
    acfg = cfg.amir
    do_pairs = acfg.enabled or pair_metrics
    with torch.no_grad():
        wts, g = _advantages_and_weights(rows, cfg, dp_group)  # all-reduce 1: normalizers
        lbar_mean = seq_logprob(rows.policy, rows.mask, "mean")
        local = _local_metric_sums(rows, wts, lbar_mean, cfg)
        pairs = None
        if do_pairs:
            s = _implicit_reward_logprobs(rows, lbar_mean, acfg)
            pairs = pair_statistics(rows.rewards, rows.gidx, rows.valid, s,
                                    beta=acfg.beta, num_groups=rows.num_groups, margin=acfg.margin,
                                    mode=acfg.pair_mode, max_pairs_per_group=acfg.max_pairs_per_group)
            local.update(pairs.sums)
        g.update(allreduce_sums(local, dp_group))  # all-reduce 2: pair sums and the metrics' sums
        metrics = _metrics(g, rows, wts)
        # the config is the source of truth for the schedule's constants (λ itself lives in the state)
        state = replace(amir_state, lambda_min=float(acfg.lambda_min), lambda_max=float(acfg.lambda_max),
                        ratio_low=float(acfg.ratio_low), ratio_high=float(acfg.ratio_high),
                        lambda_up=float(acfg.lambda_up), lambda_down=float(acfg.lambda_down))
        seq_coef = pair_token_coef = None
        if do_pairs:
            metrics["q"] = float("nan")
            if acfg.enabled and acfg.adaptive_lambda and update_lambda and g["pairs"] > 0:
                state = state.proposed(metrics["pair_loss"], g["grpo_loss"])  # λ moves BEFORE it is applied
                metrics["q"] = state.last_q
        if acfg.enabled:
            metrics["lambda"] = float(state.lam)
            seq_coef, pair_token_coef = _pair_coefficients(rows, pairs, g, state, acfg)
        if seq_coef is None:
            seq_coef = torch.zeros(rows.old.shape[0], dtype=rows.old.dtype, device=rows.old.device)
    return PreparedBatch(
        advantages=wts.adv, token_weights=wts.w, seq_coef=seq_coef, old_logp=rows.old, response_mask=rows.mask,
        ref_logp=rows.ref, rollout_logp=rows.rollout, pg_weights=None if wts.tis is None else wts.pg_w,
        pair_token_coef=pair_token_coef, metrics=metrics, amir_state=state,
    )


def micro_batch_loss(
    logp: torch.Tensor,
    mb: PreparedBatch,
    cfg: Any,
    *,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = Σ pg_w·ℓ(logp) + kl_coef·Σ w·k(logp, ref) + Σ_i seq_coef_i·ℓ̄_i(logp) for the rows of ``mb``.

    ``logp`` [n, T] carries the gradient (bf16/fp16 are upcast to the batch dtype). Stats (detached
    0-dim tensors): pg_loss, kl_loss, pair_term (summable), and over this micro-batch's response
    tokens: clip_frac_low / clip_frac_high / dual_clip_frac, ratio_mean, kl, entropy (if given),
    num_tokens — combine micro-batches with ``reduce_micro_batch_stats``.
    """
    if logp.shape != mb.old_logp.shape:
        raise ValueError(f"micro_batch_loss: logp has shape {tuple(logp.shape)}, batch rows have {tuple(mb.old_logp.shape)}")
    lp = logp if logp.dtype == mb.old_logp.dtype else logp.to(mb.old_logp.dtype)
    mask = mb.response_mask
    pg_w = mb.token_weights if mb.pg_weights is None else mb.pg_weights
    per_tok, info = policy_loss(
        cfg.policy_loss, lp, mb.old_logp, mb.advantages, mask,
        clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c,
    )
    pg = (pg_w * per_tok).sum()
    loss = pg
    stats: dict[str, torch.Tensor] = {"pg_loss": pg.detach()}
    if mb.pair_token_coef is not None:
        # Σ_i seq_coef_i ℓ̄_i(logp) = Σ_{i,t} pair_token_coef_{i,t} logp_t: linear in logp, exact gradient (TIS
        # reweights only the policy loss, not the pair term)
        pair = (mb.pair_token_coef * lp).sum()
        loss = loss + pair
        stats["pair_term"] = pair.detach()
    kl_tok = None
    if cfg.kl_coef > 0 and not cfg.kl_in_reward:
        if mb.ref_logp is None:
            raise ValueError("micro_batch_loss: ref_logp is required when algorithm.kl_coef > 0")
        kl_tok = kl_penalty(lp, mb.ref_logp, cfg.kl_estimator)
        kl_loss = cfg.kl_coef * (mb.token_weights * kl_tok).sum()
        loss = loss + kl_loss
        stats["kl_loss"] = kl_loss.detach()
    with torch.no_grad():
        ntok = mask.sum()
        denom = ntok.clamp(min=1)
        stats["num_tokens"] = ntok
        stats["clip_frac_low"] = (info["clipped_low"] * mask).sum() / denom
        stats["clip_frac_high"] = (info["clipped_high"] * mask).sum() / denom
        if "dual_clipped" in info:
            stats["dual_clip_frac"] = (info["dual_clipped"] * mask).sum() / denom
        stats["ratio_mean"] = (info["ratio"] * mask).sum() / denom
        if kl_tok is not None:
            stats["kl"] = (kl_tok.detach() * mask).sum() / denom
        elif mb.ref_logp is not None:
            stats["kl"] = (kl_penalty(lp.detach(), mb.ref_logp, cfg.kl_estimator) * mask).sum() / denom
        if entropy is not None:
            stats["entropy"] = (entropy.detach().to(mask.dtype) * mask).sum() / denom
    return loss, stats


_SUMMED = ("pg_loss", "kl_loss", "pair_term", "num_tokens")


def reduce_micro_batch_stats(stats_list: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Combine micro-batch stats: loss terms and num_tokens are summed, per-token means are averaged
    weighted by num_tokens (so the result is the mean over all response tokens). Local to this rank."""
    out: dict[str, float] = {}
    total = sum(float(s["num_tokens"]) for s in stats_list)
    keys = {k for s in stats_list for k in s}
    for k in sorted(keys):
        vals = [(float(s[k]), float(s["num_tokens"])) for s in stats_list if k in s]
        if k in _SUMMED:
            out[k] = sum(v for v, _ in vals)
        else:
            wsum = sum(c for _, c in vals)
            out[k] = sum(v * c for v, c in vals) / wsum if wsum > 0 else float("nan")
    out["num_tokens"] = total
    return out
