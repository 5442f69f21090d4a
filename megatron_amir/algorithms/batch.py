"""From a global rollout batch to per-row tensors the train step consumes, and the micro-batch loss.

``prepare_batch`` runs once per optimizer step on each data-parallel rank, on that rank's rows of the
global batch (whole groups: every row of a group on the same rank). It computes, with the global
normalizers all-reduced over ``dp_group`` (two small all-reduces of packed float64 vectors):

- advantages[N] (registry ``advantages.ADVANTAGE_ESTIMATORS``; zero-variance groups -> 0),
- token_weights[N, T] such that the policy loss of the WHOLE global batch is Σ w·ℓ over every row of every
  micro-batch and rank (``aggregation.py``),
- the AMIR pair coefficients: pairs, implicit rewards s_i (no grad), c_i = ∂L_pair/∂ℓ̄_i, the adaptive-λ
  update (before use, as the reference), seq_coef[N] = λ·c_i,
- metrics (floats, identical on every rank).

``micro_batch_loss(logp, mb, cfg)`` on rows ``mb = prepared.select(idx)`` returns
    loss = Σ w_t·ℓ_t (·TIS) + kl_coef·Σ w_t·k(δ_t) + Σ_i seq_coef_i·ℓ̄_i(logp)
and the micro-batch losses are SUMMED over micro-batches and DP ranks to give the exact global loss
(if a data-parallel wrapper averages gradients over ranks, multiply each loss by the DP size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from . import native
from .advantages import ADVANTAGE_ESTIMATORS, group_index, zero_variance_groups
from .aggregation import row_scale, weights_from_scale
from .amir import AmirState, pair_kernel_call, pair_statistics, seq_logprob
from .kl import kl_penalty, kl_reward_penalty
from .policy_loss import policy_loss, tis_weight, weighted_ppo_loss

_ROW_FIELDS = (
    "advantages", "token_weights", "seq_coef", "old_logp", "response_mask", "ref_logp", "rollout_logp",
    "pg_weights", "pair_coef",
)


@dataclass
class PreparedBatch:
    """Per-row tensors for one optimizer step (rows of this DP rank). All float tensors share one dtype
    (float32, or float64 when old_logp is float64).

    advantages[N]; token_weights[N,T] global aggregation weights; seq_coef[N] = λ·c_i (detached);
    old_logp / ref_logp / rollout_logp [N,T]; response_mask[N,T] (float 0/1);
    pg_weights[N,T] = token_weights · TIS weight (None without TIS: the policy loss uses token_weights);
    pair_coef[N,1] = κ_i, the AMIR pair term per unit of token weight: its per-token coefficient is
    ``pair_token_coef`` = token_weights·κ = seq_coef_i·m_t/|y_i| (``mean``) or seq_coef_i·m_t (``sum``),
    exactly a per-row multiple of w because every aggregation is a mask times a row factor; None when the
    step has no pair term (AMIR off, no pairs, or λ = 0) so plain GRPO pays nothing for it;
    metrics: floats for logging (same on every rank).
    """

    advantages: torch.Tensor
    token_weights: torch.Tensor
    seq_coef: torch.Tensor
    old_logp: torch.Tensor
    response_mask: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None
    pg_weights: Optional[torch.Tensor] = None
    pair_coef: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.advantages.shape[0])

    @property
    def pair_token_coef(self) -> Optional[torch.Tensor]:
        """[N, T] coefficient of logp in the pair term: Σ_i seq_coef_i·ℓ̄_i(logp) = Σ pair_token_coef·logp
        (formed on demand; the loss uses ``pair_coef``)."""
        return None if self.pair_coef is None else self.token_weights * self.pair_coef

    def select(self, index: Any) -> "PreparedBatch":
        """The rows ``index`` (slice, list, LongTensor or bool mask) as a new PreparedBatch."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long, device=self.advantages.device)
        kw = {}
        for f in _ROW_FIELDS:
            t = getattr(self, f)
            kw[f] = None if t is None else t[index]
        return PreparedBatch(**kw, metrics=dict(self.metrics))

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


def _allreduce(vec: torch.Tensor, group: Any) -> torch.Tensor:
    if group is None:
        return vec
    import torch.distributed as dist

    dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return vec


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
    """Advantages, global token weights, AMIR coefficients and metrics for one optimizer step.

    cfg: ``AlgorithmConfig``. ``policy_logp`` (default ``old_logp``): no-grad log-probs of the CURRENT
    policy for the implicit rewards s_i — pass a fresh forward for later optimizer steps on the same
    rollouts (the first step has π_θ = π_old). ``update_lambda=False`` recomputes without moving λ.
    ``pair_metrics=True`` computes pair statistics even with AMIR disabled (for GRPO baselines).
    """
    if old_logp.dim() != 2:
        raise ValueError(f"prepare_batch: old_logp must be [N, T], got shape {tuple(old_logp.shape)}")
    n, t = old_logp.shape
    _check("rewards", rewards, (n,))
    _check("group_ids", group_ids, (n,))
    _check("response_mask", response_mask, (n, t))
    _check("ref_logp", ref_logp, (n, t))
    _check("rollout_logp", rollout_logp, (n, t))
    _check("policy_logp", policy_logp, (n, t))
    acfg = cfg.amir
    dt = torch.float64 if old_logp.dtype == torch.float64 else torch.float32  # bf16/fp16 are upcast
    dev = old_logp.device
    kl_as_loss = cfg.kl_coef > 0 and not cfg.kl_in_reward
    kl_as_reward = cfg.kl_coef > 0 and cfg.kl_in_reward
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("prepare_batch: ref_logp is required when algorithm.kl_coef > 0")
    if acfg.enabled and acfg.reference_anchored and ref_logp is None:
        raise ValueError("prepare_batch: ref_logp is required when algorithm.amir.reference_anchored=true")
    if cfg.advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm.advantage: unknown estimator {cfg.advantage!r}")

    with torch.no_grad():
        mask = response_mask.to(dt)
        old = old_logp.detach().to(dt)
        ref = None if ref_logp is None else ref_logp.detach().to(dt)
        rollout = None if rollout_logp is None else rollout_logp.detach().to(dt)
        pol = None if policy_logp is None else policy_logp.detach().to(dt)
        for name, x in (("old_logp", old), ("ref_logp", ref), ("rollout_logp", rollout), ("policy_logp", pol)):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise ValueError(f"prepare_batch: {name} has non-finite values (log-probs must be finite everywhere)")
        r_raw = rewards.detach().to(device=dev, dtype=torch.float64)
        if not bool(torch.isfinite(r_raw).all()):
            raise ValueError("prepare_batch: rewards has non-finite values")
        pol = old if pol is None else pol
        group_ids = group_ids.to(dev)
        lengths = mask.sum(-1)
        valid = lengths > 0

        kl_tok = kl_penalty(old, ref, cfg.kl_estimator) if ref is not None else None
        r_adv = r_raw
        if kl_as_reward:
            # the KL penalty shapes the advantages; pairs still use the verifier rewards (rankings)
            r_adv = r_raw - kl_reward_penalty(old, ref, mask, cfg.kl_estimator, cfg.kl_coef).double()

        gidx, num_groups = group_index(group_ids)
        has_rows, zero_var = zero_variance_groups(r_adv, gidx, num_groups, valid)
        do_pairs = acfg.enabled or pair_metrics
        lbar_mean = seq_logprob(pol, mask, "mean")
        if do_pairs:
            # pair sums and per-row coefficients in one host call (torch grid without a C compiler);
            # the sums enter all-reduce 2
            s = lbar_mean if acfg.logprob_norm == "mean" else seq_logprob(pol, mask, "sum")
            if acfg.reference_anchored and ref is not None:
                s = s - seq_logprob(ref, mask, acfg.logprob_norm)
            lens = lengths if (acfg.enabled and acfg.logprob_norm == "mean") else None
            kernel = (native.pair_kernel() if (dev.type == "cpu" and acfg.max_pairs_per_group is None
                                               and r_raw.is_contiguous()) else None)
            if kernel is not None:
                # every input was built above as the kernel wants it (host, contiguous, float64 r, int64 gidx,
                # bool valid, s and lengths in dt): skip pair_statistics' conversions, and reuse its buffers
                pairs = pair_kernel_call(kernel, n, num_groups, gidx, r_raw, valid, s, lens, acfg.beta, acfg.margin,
                                         acfg.pair_mode == "top", True)
            else:
                pairs = pair_statistics(
                    r_raw, gidx, valid, s, beta=acfg.beta, num_groups=num_groups, margin=acfg.margin,
                    mode=acfg.pair_mode, max_pairs_per_group=acfg.max_pairs_per_group, lengths=lens,
                )
        vf = valid.double()
        # ---- all-reduce 1: everything that only needs rewards and masks
        red1 = _allreduce(torch.stack([
            lengths.double().sum(), vf.sum(),
            has_rows.double().sum(), zero_var.double().sum(),
            (r_raw * vf).sum(), (r_adv * vf).sum(), (r_adv * r_adv * vf).sum(),
        ]), dp_group).tolist()
        g_tokens, g_seqs, g_groups, g_zero_var, g_rsum, g_radv_sum, g_radv_sq = red1

        if cfg.whiten_rewards:
            mu = g_radv_sum / max(g_seqs, 1.0)
            var = max(g_radv_sq - g_seqs * mu * mu, 0.0) / max(g_seqs - 1.0, 1.0)
            r_adv = (r_adv - mu) / (math.sqrt(var) + cfg.adv_eps)
        adv64 = ADVANTAGE_ESTIMATORS[cfg.advantage](r_adv, gidx, num_groups, valid, cfg.adv_eps)
        adv64 = torch.where(valid & ~zero_var[gidx], adv64, torch.zeros_like(adv64))
        adv = adv64.to(dt)

        w_row = row_scale(cfg.loss_agg_mode, lengths, num_tokens=g_tokens, num_seqs=g_seqs,
                          max_len=cfg.loss_agg_max_len)  # w = m·r
        w = weights_from_scale(mask, w_row)
        tis = tis_weight(old, rollout, cfg.tis_cap) if (rollout is not None and cfg.tis_cap is not None) else None
        pg_w = w if tis is None else w * tis

        # L_GRPO at ratio 1 (π_θ = π_old): the value micro_batch_loss's policy+KL terms take at logp = old_logp;
        # the clipped surrogate of every registered loss equals −A there (dual-clip too).
        grpo_local = -(adv * pg_w.sum(-1)).sum()
        if kl_as_loss:
            grpo_local = grpo_local + cfg.kl_coef * (w * kl_tok).sum()

        # correct-vs-incorrect: rollouts above / below their group's mean reward (verifier rewards)
        cnt = torch.zeros(num_groups, dtype=torch.float64, device=dev).index_add_(0, gidx, vf)
        gmean = torch.zeros_like(cnt).index_add_(0, gidx, r_raw * vf) / cnt.clamp(min=1)
        above = (valid & (r_raw > gmean[gidx])).double()
        below = (valid & (r_raw < gmean[gidx])).double()
        lbar_mean = lbar_mean.double()
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        # ---- all-reduce 2: pair sums and the sums that need advantages / weights
        pair_sums = pairs.sums if do_pairs else torch.zeros(4, dtype=torch.float64, device=dev)
        red2 = _allreduce(torch.cat([pair_sums, torch.stack([
            grpo_local.double(),
            (lbar_mean * above).sum(), above.sum(), (lbar_mean * below).sum(), below.sum(),
            (lengths.double() * above).sum(), (lengths.double() * below).sum(),
            (kl_tok * mask).double().sum() if kl_tok is not None else zero,
            (tis * mask).double().sum() if tis is not None else zero,
            adv64.abs().sum(),
        ])]), dp_group).tolist()
        (g_pairs, g_pair_sum, g_acc, g_margin, g_grpo, g_lab, g_nab, g_lbe, g_nbe, g_len_ab, g_len_be,
         g_kl, g_tis, g_adv_abs) = red2

        metrics: dict[str, float] = {
            "num_sequences": g_seqs,
            "num_tokens": g_tokens,
            "num_groups": g_groups,
            "zero_variance_groups": g_zero_var,
            "reward_mean": g_rsum / max(g_seqs, 1.0),
            "advantage_abs_mean": g_adv_abs / max(g_seqs, 1.0),
            "grpo_loss_ratio1": g_grpo,
            "logprob_mean_above": g_lab / g_nab if g_nab else float("nan"),
            "logprob_mean_below": g_lbe / g_nbe if g_nbe else float("nan"),
            "logprob_gap_correct_incorrect": (g_lab / g_nab - g_lbe / g_nbe) if (g_nab and g_nbe) else float("nan"),
            "response_len_above": g_len_ab / g_nab if g_nab else float("nan"),
            "response_len_below": g_len_be / g_nbe if g_nbe else float("nan"),
        }
        if ref is not None:
            metrics["kl"] = g_kl / max(g_tokens, 1.0)
        if tis is not None:
            metrics["tis_weight_mean"] = g_tis / max(g_tokens, 1.0)

        seq_coef = None
        pair_coef = None
        if do_pairs:
            pair_loss = g_pair_sum / g_pairs if g_pairs > 0 else 0.0
            q = float("nan")
            if acfg.enabled and acfg.adaptive_lambda and update_lambda and g_pairs > 0:
                _sync_rule(amir_state, acfg)
                q = amir_state.update(pair_loss, g_grpo)  # λ moves BEFORE it is applied (reference order)
            metrics.update({
                "pair_count": g_pairs,
                "pair_accuracy": g_acc / g_pairs if g_pairs > 0 else float("nan"),
                "pair_margin": g_margin / g_pairs if g_pairs > 0 else float("nan"),
                "pair_loss": pair_loss,
                "q": q,
            })
            if acfg.enabled:
                lam = float(amir_state.lam)
                metrics["lambda"] = lam
                if g_pairs > 0 and lam != 0.0:
                    f = lam * acfg.beta / g_pairs
                    row, col = pairs.views()  # coef_sum [N]; coef_norm (``mean``) or coef_sum (``sum``) as [N, 1]
                    if row.dtype != dt:
                        row, col = row.to(dt), col.to(dt)
                    seq_coef = row * f  # λ·c_i = λβ·coef_sum_i/P
                    # per token f·col_i·m_t = seq_coef_i·m_t/|y_i| (mean) or seq_coef_i·m_t (sum) = w_t·κ_i
                    pair_coef = col * (f / w_row) if isinstance(w_row, float) else col * (f / w_row).unsqueeze(-1)
        if seq_coef is None:
            seq_coef = torch.zeros(n, dtype=dt, device=dev)

    return PreparedBatch(
        advantages=adv, token_weights=w, seq_coef=seq_coef, old_logp=old, response_mask=mask,
        ref_logp=ref, rollout_logp=rollout, pg_weights=None if tis is None else pg_w, pair_coef=pair_coef,
        metrics=metrics,
    )


def _sync_rule(state: AmirState, acfg: Any) -> None:
    """The config is the source of truth for the schedule's constants (λ itself lives in the state)."""
    state.lambda_min, state.lambda_max = float(acfg.lambda_min), float(acfg.lambda_max)
    state.ratio_low, state.ratio_high = float(acfg.ratio_low), float(acfg.ratio_high)
    state.lambda_up, state.lambda_down = float(acfg.lambda_up), float(acfg.lambda_down)


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
    stats: dict[str, torch.Tensor] = {}
    if cfg.policy_loss == "ppo":
        # fused path: value and analytic gradient in one pass; the pair term rides along as a linear term
        # Σ w_t·κ_i·logp_t (its weights are the token weights; TIS reweights only the policy loss)
        loss, info = weighted_ppo_loss(
            lp, mb.old_logp, mb.advantages, pg_w, mb.pair_coef,
            pair_weights=None if mb.pg_weights is None else mb.token_weights,
            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c,
        )
        stats["pg_loss"] = info["pg_value"]
        if mb.pair_coef is not None:
            stats["pair_term"] = info["linear_value"]
    else:
        per_tok, info = policy_loss(
            cfg.policy_loss, lp, mb.old_logp, mb.advantages, mask,
            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c,
        )
        pg = (pg_w * per_tok).sum()
        loss = pg
        stats["pg_loss"] = pg.detach()
        if mb.pair_coef is not None:
            # Σ_i seq_coef_i ℓ̄_i(logp) = Σ_{i,t} (seq_coef_i m_t / |y_i|) logp_t = Σ w_t κ_i logp_t: linear in logp,
            # exact gradient
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
