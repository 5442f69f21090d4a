"""GRPO-family pieces of megatron_amir.algorithms against independent float64 loop references.

The references below are written with Python loops over sequences and tokens (math on scalars, or
torch scalars where autograd is needed), never by re-running the vectorized code.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_amir.algorithms import (
    AmirState,
    compute_advantages,
    kl_penalty,
    kl_reward_penalty,
    micro_batch_loss,
    prepare_batch,
    reduce_micro_batch_stats,
    tis_weight,
)
from megatron_amir.config import AlgorithmConfig, AmirConfig

from algo_helpers import make_batch, random_split

torch.set_num_threads(1)
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def cfg_of(**kw):
    amir = kw.pop("amir", {"enabled": False})
    return AlgorithmConfig(amir=AmirConfig(**amir), **kw)


# ----------------------------------------------------------------------------------- loop references
def ref_advantages(rewards, group_ids, mask, estimator, eps):
    n = len(rewards)
    lens = [int(mask[i].sum()) for i in range(n)]
    out = [0.0] * n
    zero_var = 0
    groups = {}
    for i in range(n):
        if lens[i] > 0:
            groups.setdefault(int(group_ids[i]), []).append(i)
    for _, rows in groups.items():
        rs = [float(rewards[i]) for i in rows]
        G = len(rs)
        if max(rs) == min(rs):
            zero_var += 1
            continue
        mean = sum(rs) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (G - 1)) if G > 1 else 0.0
        for i, x in zip(rows, rs):
            if estimator == "grpo":
                out[i] = (x - mean) / (std + eps)
            elif estimator == "drgrpo":
                out[i] = x - mean
            else:
                others = [y for j, y in zip(rows, rs) if j != i]
                out[i] = x - sum(others) / len(others)
    return out, zero_var, len(groups)


def ref_token_loss(lp, old, A, el, eh, c):
    """One token of the clipped surrogate, on torch scalars (autograd-able)."""
    ratio = torch.exp((lp - old).clamp(-20, 20))
    clipped = ratio.clamp(1 - el, 1 + eh)
    loss = torch.maximum(-A * ratio, -A * clipped)
    if c is not None and A < 0:
        loss = torch.minimum(loss, torch.tensor(-A * c, dtype=lp.dtype))
    return loss


def ref_aggregate(tok_loss, mask, mode, max_len):
    """tok_loss: dict (i, t) -> scalar over response tokens; loops over sequences."""
    n, T = mask.shape
    seqs = [i for i in range(n) if int(mask[i].sum()) > 0]
    if mode == "token-mean":
        total = sum(tok_loss[(i, t)] for i in seqs for t in range(T) if mask[i, t])
        return total / sum(int(mask[i].sum()) for i in seqs)
    acc = 0.0
    for i in seqs:
        s = sum(tok_loss[(i, t)] for t in range(T) if mask[i, t])
        ln = int(mask[i].sum())
        if mode == "seq-mean-token-mean":
            acc = acc + s / ln
        elif mode == "seq-mean-token-sum":
            acc = acc + s
        else:
            acc = acc + s / max_len
    return acc / len(seqs)


def ref_kl(lp, ref, est):
    d = (lp - ref).clamp(-20, 20)
    if est == "k1":
        return d
    if est == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1


def ref_grpo_total(logp, old, A, mask, cfg, ref=None, rollout=None):
    """Whole-batch loss (policy + KL) by loops, as a torch scalar with autograd through ``logp``."""
    n, T = mask.shape
    tok = {}
    kl = {}
    if cfg.policy_loss == "gspo":
        seq_obj = {}
        for i in range(n):
            ts = [t for t in range(T) if mask[i, t]]
            if not ts:
                continue
            lr = sum(logp[i, t] - old[i, t] for t in ts) / len(ts)
            s = torch.exp(lr.clamp(-20, 20))
            seq_obj[i] = ref_token_loss(torch.log(s), torch.tensor(0.0, dtype=s.dtype), A[i],
                                        cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)
        assert cfg.loss_agg_mode == "seq-mean-token-mean"
        return sum(seq_obj.values()) / len(seq_obj)
    for i in range(n):
        for t in range(T):
            if not mask[i, t]:
                continue
            lt = ref_token_loss(logp[i, t], old[i, t], A[i], cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)
            if rollout is not None and cfg.tis_cap is not None:
                lt = lt * min(math.exp(max(-20, min(20, float(old[i, t] - rollout[i, t])))), cfg.tis_cap)
            tok[(i, t)] = lt
            if cfg.kl_coef > 0 and not cfg.kl_in_reward:
                kl[(i, t)] = ref_kl(logp[i, t], ref[i, t], cfg.kl_estimator)
    total = ref_aggregate(tok, mask, cfg.loss_agg_mode, cfg.loss_agg_max_len)
    if kl:
        total = total + cfg.kl_coef * ref_aggregate(kl, mask, cfg.loss_agg_mode, cfg.loss_agg_max_len)
    return total


def loss_and_grad(logp, prepared, cfg, split):
    lp = logp.clone().requires_grad_(True)
    total = 0.0
    stats = []
    for rows in split:
        idx = torch.tensor(rows)
        loss, st = micro_batch_loss(lp[idx], prepared.select(idx), cfg)
        loss.backward()
        total += float(loss.detach())
        stats.append(st)
    return total, lp.grad, stats


# ----------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_match_loop_reference(estimator, seed):
    rewards, gids, mask, _ = make_batch(seed, n_groups=5, G=5, reward_kind="multi")
    mask[3] = False  # a fully masked row must not enter its group's statistics
    adv, counts = compute_advantages(rewards, gids, mask.sum(-1) > 0, estimator, 1e-6)
    ref, zv, ng = ref_advantages(rewards, gids, mask, estimator, 1e-6)
    assert torch.allclose(adv, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    assert counts == {"num_groups": ng, "zero_variance_groups": zv}


def test_zero_variance_group_counted_and_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, counts = compute_advantages(rewards, gids, torch.ones(6, dtype=torch.bool), "rloo")
    assert counts["zero_variance_groups"] == 1 and counts["num_groups"] == 2
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert adv[3] < 0 and adv[4] > 0


def test_whitening_matches_reference():
    rewards, gids, mask, old = make_batch(5, reward_kind="multi")
    cfg = cfg_of(advantage="drgrpo", whiten_rewards=True)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState())
    valid = [i for i in range(len(rewards)) if mask[i].any()]
    rs = [float(rewards[i]) for i in valid]
    mu = sum(rs) / len(rs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (len(rs) - 1))
    white = rewards.clone()
    for i in valid:
        white[i] = (float(rewards[i]) - mu) / (sd + cfg.adv_eps)
    ref, _, _ = ref_advantages(white, gids, mask, "drgrpo", cfg.adv_eps)
    assert torch.allclose(pb.advantages, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------- policy loss + aggregation
CASES = [
    dict(loss_agg_mode=m, clip_eps_low=0.2, clip_eps_high=0.28) for m in MODES
] + [
    dict(loss_agg_mode="token-mean", dual_clip_c=3.0, clip_eps_low=0.1, clip_eps_high=0.1),
    dict(loss_agg_mode="seq-mean-token-mean", policy_loss="gspo", clip_eps_low=0.05, clip_eps_high=0.08),
    dict(loss_agg_mode="token-mean", kl_coef=0.1, kl_estimator="k3"),
    dict(loss_agg_mode="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k2"),
    dict(loss_agg_mode="seq-mean-token-sum", kl_coef=0.05, kl_estimator="k1"),
    dict(loss_agg_mode="token-mean", tis_cap=1.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_grad_match_loop_reference_any_split(case, seed):
    """Value and gradient of the summed micro-batch losses == whole-batch loop reference, for random
    row permutations and micro-batch sizes (ragged lengths, holes in the mask)."""
    cfg = cfg_of(loss_agg_max_len=12, **case)
    rewards, gids, mask, old = make_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    ref = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    rollout = old + 0.4 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(), ref_logp=ref, rollout_logp=rollout)
    # current policy moved away from old so that clipping (low, high, dual) is exercised
    logp = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    A, _, _ = ref_advantages(rewards, gids, mask, cfg.advantage, cfg.adv_eps)
    lp_ref = logp.clone().requires_grad_(True)
    expected = ref_grpo_total(lp_ref, old, A, mask, cfg, ref=ref, rollout=rollout)
    expected.backward()
    for split_seed in range(3):
        total, grad, _ = loss_and_grad(logp, pb, cfg, random_split(len(rewards), split_seed))
        assert abs(total - float(expected.detach())) < 1e-12
        assert torch.allclose(grad, lp_ref.grad, atol=1e-13, rtol=0)


def test_clip_fractions_match_loop_count():
    cfg = cfg_of(clip_eps_low=0.1, clip_eps_high=0.2, dual_clip_c=2.0)
    rewards, gids, mask, old = make_batch(7)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState())
    logp = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, _, stats = loss_and_grad(logp, pb, cfg, random_split(len(rewards), 4))
    red = reduce_micro_batch_stats(stats)
    A, _, _ = ref_advantages(rewards, gids, mask, "grpo", cfg.adv_eps)
    lo = hi = du = n = 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logp[i, t] - old[i, t]))
            n += 1
            lo += A[i] < 0 and r < 0.9
            hi += A[i] > 0 and r > 1.2
            du += A[i] < 0 and r > 2.0
    assert red["num_tokens"] == n
    assert red["clip_frac_low"] == pytest.approx(lo / n, abs=1e-12) and lo > 0
    assert red["clip_frac_high"] == pytest.approx(hi / n, abs=1e-12) and hi > 0
    assert red["dual_clip_frac"] == pytest.approx(du / n, abs=1e-12) and du > 0


def test_gradcheck_micro_batch_loss():
    cfg = cfg_of(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1, dual_clip_c=3.0,
                 amir={"enabled": True, "adaptive_lambda": False, "lambda_init": 0.5, "margin": 0.0})
    rewards, gids, mask, old = make_batch(11, n_groups=2, G=3, T=6)
    ref = old + 0.2
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(lam=0.5), ref_logp=ref)
    assert pb.pair_token_coef is not None
    logp = (old + 0.05 * torch.randn(old.shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: micro_batch_loss(x, pb, cfg)[0], (logp,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- KL, TIS
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_loop_and_gradcheck(est):
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    out = kl_penalty(lp, ref, est)
    for i in range(3):
        for t in range(5):
            d = float(lp[i, t] - ref[i, t])
            e = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1}[est]
            assert abs(float(out[i, t]) - e) < 1e-14
    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: kl_penalty(y, ref, est), (x,))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pen = kl_reward_penalty(lp, ref, mask, est, kl_coef=0.3)
    for i in range(3):
        e = 0.3 * sum(float(out[i, t]) for t in range(5) if mask[i, t])
        assert abs(float(pen[i]) - e) < 1e-14


def test_kl_in_reward_shapes_advantages():
    cfg = cfg_of(advantage="drgrpo", kl_coef=0.2, kl_in_reward=True, kl_estimator="k1")
    rewards, gids, mask, old = make_batch(3)
    ref = old - 0.3 * torch.rand(old.shape, dtype=torch.float64)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(), ref_logp=ref)
    shaped = rewards.clone()
    for i in range(len(rewards)):
        shaped[i] -= 0.2 * sum(float(old[i, t] - ref[i, t]) for t in range(old.shape[1]) if mask[i, t])
    A, _, _ = ref_advantages(shaped, gids, mask, "drgrpo", cfg.adv_eps)
    assert torch.allclose(pb.advantages, torch.tensor(A, dtype=torch.float64), atol=1e-12)
    # no KL loss term when the KL is in the reward
    loss, stats = micro_batch_loss(old.clone().requires_grad_(True), pb, cfg)
    assert "kl_loss" not in stats


def test_tis_weight_truncates():
    old = torch.tensor([[0.0, -1.0, -3.0]], dtype=torch.float64)
    roll = torch.tensor([[-1.0, -1.0, -0.5]], dtype=torch.float64)
    w = tis_weight(old, roll, 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, math.exp(-2.5)]], dtype=torch.float64))


# ----------------------------------------------------------------------------------- robustness
def test_fully_masked_rows_contribute_nothing():
    cfg = cfg_of(loss_agg_mode="seq-mean-token-mean", amir={"enabled": True, "margin": 0.0, "adaptive_lambda": False})
    rewards, gids, mask, old = make_batch(4)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    # add two fully masked rows: one inside an existing group with an extreme reward, one in its own group
    rewards2 = torch.cat([rewards, torch.tensor([5.0, -3.0], dtype=torch.float64)])
    gids2 = torch.cat([gids, torch.tensor([int(gids[0]), 999])])
    mask2 = torch.cat([mask, torch.zeros(2, mask.shape[1], dtype=torch.bool)])
    old2 = torch.cat([old, -torch.ones(2, old.shape[1], dtype=torch.float64)])
    pb2 = prepare_batch(rewards=rewards2, group_ids=gids2, response_mask=mask2, old_logp=old2, cfg=cfg,
                        amir_state=AmirState())
    logp = old + 0.2 * torch.randn(old.shape, dtype=torch.float64)
    logp2 = torch.cat([logp, torch.zeros(2, old.shape[1], dtype=torch.float64)])
    l1, g1, _ = loss_and_grad(logp, pb, cfg, [list(range(len(rewards)))])
    l2, g2, _ = loss_and_grad(logp2, pb2, cfg, random_split(len(rewards2), 1))
    assert abs(l1 - l2) < 1e-14
    assert torch.allclose(g2[: len(rewards)], g1, atol=1e-15, rtol=0)
    assert torch.equal(g2[len(rewards):], torch.zeros_like(g2[len(rewards):]))
    for k in ("num_sequences", "num_tokens", "num_groups", "pair_count", "zero_variance_groups"):
        assert pb.metrics[k] == pb2.metrics[k], k
    # the padded rows change the group grid, hence the float summation order: equal to rounding
    assert pb.metrics["pair_loss"] == pytest.approx(pb2.metrics["pair_loss"], rel=1e-14, abs=0)


def test_bf16_inputs_are_upcast():
    cfg = cfg_of(amir={"enabled": True, "margin": 0.0})
    rewards, gids, mask, old = make_batch(2, dtype=torch.bfloat16)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    assert pb.token_weights.dtype == torch.float32 and pb.old_logp.dtype == torch.float32
    pb32 = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old.float(), cfg=cfg,
                         amir_state=AmirState())
    lp = (old.float() + 0.1).to(torch.bfloat16).requires_grad_(True)
    loss, _ = micro_batch_loss(lp, pb, cfg)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad.float()).all()
    lp32 = lp.detach().float().requires_grad_(True)
    loss32, _ = micro_batch_loss(lp32, pb32, cfg)
    assert float(loss.detach()) == float(loss32.detach())  # bf16 path == explicit fp32 upcast of the same values


def test_extreme_logprobs_stay_finite():
    cfg = cfg_of(kl_coef=0.1, kl_estimator="k3", tis_cap=2.0, dual_clip_c=3.0,
                 amir={"enabled": True, "margin": 0.0, "reference_anchored": True})
    rewards, gids, mask, old = make_batch(6)
    old = torch.full_like(old, -1e4)
    old[::2] = 0.0
    ref = torch.zeros_like(old)
    rollout = torch.full_like(old, -1e4)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(), ref_logp=ref, rollout_logp=rollout)
    assert all(math.isfinite(v) for k, v in pb.metrics.items() if k != "q")
    for logp in (torch.full_like(old, -1e4), torch.zeros_like(old), old.clone()):
        _, grad, stats = loss_and_grad(logp, pb, cfg, random_split(len(rewards), 0))
        assert torch.isfinite(grad).all()
        assert all(torch.isfinite(v).all() for s in stats for v in s.values())


def test_bad_inputs_name_the_field():
    cfg = cfg_of()
    rewards, gids, mask, old = make_batch(0)
    with pytest.raises(ValueError, match="rewards"):
        prepare_batch(rewards=rewards[:-1], group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    with pytest.raises(ValueError, match="response_mask"):
        prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask[:, :-1], old_logp=old, cfg=cfg, amir_state=AmirState())
    with pytest.raises(ValueError, match="ref_logp"):
        prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg_of(kl_coef=0.1),
                      amir_state=AmirState())
    bad = old.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp"):
        prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=bad, cfg=cfg, amir_state=AmirState())
    with pytest.raises(ValueError, match="loss_agg_max_len"):
        prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old,
                      cfg=cfg_of(loss_agg_mode="seq-mean-token-sum-norm"), amir_state=AmirState())


def test_grpo_loss_ratio1_metric_equals_loss_at_old():
    cfg = cfg_of(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1, tis_cap=1.3)
    rewards, gids, mask, old = make_batch(9)
    ref = old - 0.1
    rollout = old + 0.2 * torch.randn(old.shape, dtype=torch.float64)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(), ref_logp=ref, rollout_logp=rollout)
    total, _, _ = loss_and_grad(old, pb, cfg, random_split(len(rewards), 2))
    assert pb.metrics["grpo_loss_ratio1"] == pytest.approx(total, abs=1e-13)


def test_select_forms_agree():
    cfg = cfg_of(amir={"enabled": True, "margin": 0.0})
    rewards, gids, mask, old = make_batch(1)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    a = pb.select([1, 3])
    b = pb.select(torch.tensor([1, 3]))
    m = torch.zeros(len(pb), dtype=torch.bool)
    m[[1, 3]] = True
    c = pb.select(m)
    for x in (b, c):
        assert torch.equal(a.token_weights, x.token_weights) and torch.equal(a.seq_coef, x.seq_coef)
    assert len(pb.select(slice(0, 5))) == 5


def test_every_policy_loss_goes_through_the_registry(monkeypatch):
    """micro_batch_loss takes the loss the registry holds under ``algorithm.policy_loss`` (``ppo`` included: no
    private fast path), so ``register_policy_loss`` replaces it for the training step."""
    from megatron_amir.algorithms import POLICY_LOSSES

    cfg = cfg_of(amir={"enabled": True, "margin": 0.0, "adaptive_lambda": False})
    rewards, gids, mask, old = make_batch(1)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    assert pb.pair_token_coef is not None
    calls = []
    builtin = POLICY_LOSSES["ppo"]

    def doubled(*args, **kw):
        calls.append(1)
        loss, info = builtin(*args, **kw)
        return 2.0 * loss, info

    lp = (old + 0.1).requires_grad_(True)
    base, base_stats = micro_batch_loss(lp, pb, cfg)
    monkeypatch.setitem(POLICY_LOSSES, "ppo", doubled)
    loss, stats = micro_batch_loss(lp, pb, cfg)
    assert calls == [1]
    assert float(stats["pg_loss"]) == pytest.approx(2.0 * float(base_stats["pg_loss"]), rel=1e-12)
    assert float(loss.detach()) == pytest.approx(float(base.detach()) + float(base_stats["pg_loss"]), rel=1e-12)
