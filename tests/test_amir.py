"""AMIR pair term: pairs, implicit rewards, coefficient form, adaptive λ, length bias.

References are float64 Python loops written here (pairs by enumeration as in the reference code's
``_build_contrastive_pairs``; the pair loss −log σ(s_w − s_l) on torch scalars for autograd).
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from megatron_amir.algorithms import (
    AmirState,
    build_pairs,
    micro_batch_loss,
    pair_coefficients,
    pair_loss_sum,
    pair_statistics,
    prepare_batch,
    seq_logprob,
)
from megatron_amir.config import AlgorithmConfig, AmirConfig

import algo_helpers
from algo_helpers import random_split

torch.set_num_threads(1)


make_batch = functools.partial(algo_helpers.make_batch, G=6, T=9, grades=(0.0, 0.2, 0.5, 0.9, 1.0))


def cfg_of(amir=None, **kw):
    return AlgorithmConfig(amir=AmirConfig(**(amir or {})), **kw)


# ------------------------------------------------------------------------------ loop references
def ref_pairs(rewards, gids, mask, margin, mode, cap):
    groups = {}
    for i in range(len(rewards)):
        if mask[i].any():
            groups.setdefault(int(gids[i]), []).append(i)
    pairs = []
    for rows in groups.values():
        r = {i: float(rewards[i]) for i in rows}
        order = sorted(rows, key=lambda i: -r[i])  # reward descending, ties in row order (stable)
        if mode == "all":
            cand = [(r[order[a]] - r[order[b]], order[a], order[b])
                    for a in range(len(order)) for b in range(a + 1, len(order))
                    if r[order[a]] - r[order[b]] > margin]
        else:
            top = order[0]
            cand = [(r[top] - r[l], top, l) for l in order[1:] if r[top] - r[l] > margin]
        if cap is not None and len(cand) > cap:
            cand = sorted(cand, key=lambda x: -x[0])[:cap]  # stable: ties keep enumeration order
        pairs += [(w, l) for _, w, l in cand]
    return pairs


def ref_lbar(logp, mask, i, norm):
    ts = [t for t in range(mask.shape[1]) if mask[i, t]]
    s = sum(logp[i, t] for t in ts)
    return s / len(ts) if norm == "mean" else s


def ref_pair_loss(logp, mask, pairs, beta, norm, ref=None):
    """L_pair = mean over pairs of −log σ(s_w − s_l), torch scalars (autograd through logp)."""
    def s(i):
        v = ref_lbar(logp, mask, i, norm)
        if ref is not None:
            v = v - ref_lbar(ref, mask, i, norm)
        return beta * v
    total = 0.0
    for w, l in pairs:
        total = total + (-F.logsigmoid(s(w) - s(l)))
    return total / len(pairs)


def ref_grpo_tokenmean_ratio1(rewards, gids, mask):
    """GRPO loss at ratio 1 with token-mean aggregation and grpo advantages, by loops."""
    groups = {}
    for i in range(len(rewards)):
        if mask[i].any():
            groups.setdefault(int(gids[i]), []).append(i)
    tot, ntok = 0.0, 0
    for rows in groups.values():
        rs = [float(rewards[i]) for i in rows]
        mu = sum(rs) / len(rs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (len(rs) - 1))
        for i, x in zip(rows, rs):
            a = 0.0 if max(rs) == min(rs) else (x - mu) / (sd + 1e-6)
            ln = int(mask[i].sum())
            tot += -a * ln
    for i in range(len(rewards)):
        ntok += int(mask[i].sum())
    return tot / ntok


def ref_lambda_rule(lam, pair_loss, grpo_loss):
    q = lam * pair_loss / max(1e-9, grpo_loss)
    if q < 0.30:
        return min(0.05, lam * 1.25)
    if q > 0.70:
        return max(0.005, lam * 0.8)
    return lam


def grad_of_split(logp, pb, cfg, split):
    lp = logp.clone().requires_grad_(True)
    for rows in split:
        idx = torch.tensor(rows)
        loss, _ = micro_batch_loss(lp[idx], pb.select(idx), cfg)
        loss.backward()
    return lp.grad


# ------------------------------------------------------------------------------ pairs
@pytest.mark.parametrize("mode", ["all", "top"])
@pytest.mark.parametrize("cap", [None, 1, 3])
@pytest.mark.parametrize("margin", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_pairs_match_loop_reference(mode, cap, margin, seed):
    rewards, gids, mask, _ = make_batch(seed, reward_kind="multi")
    mask[2] = False
    # shuffle rows so groups are interleaved (the builder must not rely on contiguous groups)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seed))
    rewards, gids, mask = rewards[perm], gids[perm], mask[perm]
    w, l = build_pairs(rewards, gids, mask.any(-1), margin=margin, mode=mode, max_pairs_per_group=cap)
    got = sorted(zip(w.tolist(), l.tolist()))
    exp = sorted(ref_pairs(rewards, gids, mask, margin, mode, cap))
    assert got == exp
    assert all(float(rewards[a] - rewards[b]) > margin for a, b in got)


def test_ties_never_pair_and_all_equal_groups_give_nothing():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    gids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    w, l = build_pairs(rewards, gids, margin=0.0, mode="all")
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    w, l = build_pairs(rewards, gids, margin=0.0, mode="top")
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 2), (0, 3)]  # first of the tied best rollouts


def test_cap_prefers_the_pair_whose_winner_has_the_higher_reward():
    """The reference code enumerates pairs with the rows in reward-descending order and keeps the largest gaps
    by a stable sort: on equal gaps the pair with the better winner stays. Rewards [1, 2, 0], margin 0.5,
    cap 2: candidates (1, 2) gap 2, (1, 0) gap 1, (0, 2) gap 1 -> {(1, 0), (1, 2)} (row order would give
    (0, 2) instead of (1, 0))."""
    rewards = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    gids = torch.zeros(3, dtype=torch.long)
    w, l = build_pairs(rewards, gids, margin=0.5, mode="all", max_pairs_per_group=2)
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 0), (1, 2)]
    assert sorted(ref_pairs(rewards, gids, torch.ones(3, 1, dtype=torch.bool), 0.5, "all", 2)) == [(1, 0), (1, 2)]
    # and the pair sums prepare_batch uses are over exactly those pairs
    s = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    st = pair_statistics(rewards, gids, torch.ones(3, dtype=torch.bool), s, margin=0.5, max_pairs_per_group=2)
    d = [-0.2 - 0.3, -0.2 - 0.1]  # s_1 − s_0, s_1 − s_2 (row order would have s_0 − s_2 = 0.2 instead of −0.5)
    assert st.sums["pairs"].item() == 2
    assert st.sums["pair_margin_sum"].item() == pytest.approx(sum(d), abs=1e-15)


# ------------------------------------------------------------------------------ coefficient form
AMIR_CASES = [
    dict(pair_mode="all", margin=0.0),
    dict(pair_mode="all", margin=0.5),
    dict(pair_mode="top", margin=0.1, max_pairs_per_group=2),
    dict(pair_mode="all", margin=0.1, logprob_norm="sum", beta=0.05),
    dict(pair_mode="all", margin=0.1, reference_anchored=True, beta=0.7),
]


@pytest.mark.parametrize("amir", AMIR_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coefficient_form_gradient_equals_direct_pair_loss(amir, seed):
    """∇ of Σ_mb Σ_i seq_coef_i ℓ̄_i == ∇ of λ·L_pair computed directly on whole groups (float64, 1e-10),
    for random groups split into arbitrary micro-batches (pair members land in different micro-batches)."""
    rewards, gids, mask, old = make_batch(seed, reward_kind="multi")
    g = torch.Generator().manual_seed(50 + seed)
    ref = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    logp = old + 0.4 * torch.randn(old.shape, generator=g, dtype=torch.float64)  # a later optimizer step
    # isolate the pair term: zero advantages via a huge eps would change nothing else, so instead subtract the
    # GRPO gradient computed from a run with AMIR off on the same batch
    cfg = cfg_of(amir={**amir, "lambda_init": 0.3, "adaptive_lambda": False}, loss_agg_mode="seq-mean-token-mean")
    cfg_off = cfg_of(amir={"enabled": False}, loss_agg_mode="seq-mean-token-mean")
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(lam=0.3), ref_logp=ref, policy_logp=logp)
    pb_off = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg_off,
                           amir_state=AmirState(), ref_logp=ref)
    pairs = ref_pairs(rewards, gids, mask, amir["margin"], amir["pair_mode"], amir.get("max_pairs_per_group"))
    assert len(pairs) > 0
    lp = logp.clone().requires_grad_(True)
    beta = amir.get("beta", 0.2)
    direct = ref_pair_loss(lp, mask, pairs, beta, amir.get("logprob_norm", "mean"),
                           ref=ref if amir.get("reference_anchored") else None)
    (0.3 * direct).backward()
    assert pb.metrics["pair_loss"] == pytest.approx(float(direct.detach()), abs=1e-12)
    assert pb.metrics["pair_count"] == len(pairs)
    for split_seed in range(4):
        split = random_split(len(rewards), split_seed, max_cuts=5)
        g_on = grad_of_split(logp, pb, cfg, split)
        g_off = grad_of_split(logp, pb_off, cfg_off, split)
        assert torch.allclose(g_on - g_off, lp.grad, atol=1e-10, rtol=0)



@pytest.mark.parametrize("agg,extra", [
    ("token-mean", {}), ("seq-mean-token-sum", {}), ("seq-mean-token-sum-norm", {"loss_agg_max_len": 9}),
    ("token-mean", {"tis_cap": 2.0}), ("seq-mean-token-mean", {"tis_cap": 1.5}),
    ("seq-mean-token-mean", {"policy_loss": "gspo"}), ("token-mean", {"policy_loss": "gspo", "tis_cap": 2.0}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_pair_term_gradient_is_exact_for_every_aggregation_tis_and_gspo(agg, extra):
    """The pair term rides on the token weights as a per-row factor κ (w·κ per token): that must give the direct
    pair loss's gradient for every aggregation mode, with TIS reweighting only the policy loss, and on GSPO."""
    rewards, gids, mask, old = make_batch(4, reward_kind="multi")
    g = torch.Generator().manual_seed(9)
    logp = old + 0.4 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(old.shape, generator=g, dtype=torch.float64) if "tis_cap" in extra else None
    amir = dict(pair_mode="all", margin=0.1, lambda_init=0.3, adaptive_lambda=False)
    cfg = cfg_of(amir=amir, loss_agg_mode=agg, **extra)
    cfg_off = cfg_of(amir={"enabled": False}, loss_agg_mode=agg, **extra)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=AmirState(lam=0.3), rollout_logp=rollout, policy_logp=logp)
    pb_off = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg_off,
                           amir_state=AmirState(), rollout_logp=rollout)
    assert (pb.pg_weights is None) == (rollout is None)
    pairs = ref_pairs(rewards, gids, mask, 0.1, "all", None)
    lp = logp.clone().requires_grad_(True)
    (0.3 * ref_pair_loss(lp, mask, pairs, 0.2, "mean")).backward()
    # the [N, T] coefficient view agrees with its definition seq_coef_i·m_t/|y_i|
    m = mask.double()
    assert torch.allclose(pb.pair_token_coef, pb.seq_coef[:, None] * m / m.sum(-1, keepdim=True).clamp(min=1),
                          atol=1e-15, rtol=1e-12)
    for split_seed in range(3):
        split = random_split(len(rewards), split_seed, max_cuts=4)
        g_on = grad_of_split(logp, pb, cfg, split)
        g_off = grad_of_split(logp, pb_off, cfg_off, split)
        assert torch.allclose(g_on - g_off, lp.grad, atol=1e-10, rtol=0)
        # the value carries the pair term exactly: Σ_mb pair_term = Σ_i seq_coef_i ℓ̄_i(logp)
        total = sum(float(micro_batch_loss(logp[torch.tensor(r)], pb.select(torch.tensor(r)), cfg)[1]["pair_term"])
                    for r in split)
        assert total == pytest.approx(float((pb.seq_coef * seq_logprob(logp, m, "mean")).sum()), abs=1e-12)


def _sums(st):
    return [st.sums[k].item() for k in ("pairs", "pair_loss_sum", "pair_correct", "pair_margin_sum")]


@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "unequal"])
@pytest.mark.parametrize("mode,cap,margin", [("all", None, 0.0), ("all", None, 0.3), ("top", None, 0.1), ("all", 2, 0.1),
                                             ("top", 2, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pair_statistics_match_loop_on_every_layout(layout, mode, cap, margin, seed):
    """The group grid (a view for the trainer's contiguous layout, gathered with padding otherwise) against
    loops: the pair sums and c_i = β·coef_sum_i / P."""
    rewards, gids, mask, old = make_batch(seed, n_groups=5, G=6, reward_kind="multi")
    mask[4] = False  # an invalid row inside a group
    if layout == "unequal":  # drop rows so groups have 6, 4, 6, 5, 6 rows
        keep = torch.tensor([i not in (7, 9, 20) for i in range(len(rewards))])
        rewards, gids, mask, old = rewards[keep], gids[keep], mask[keep], old[keep]
    if layout != "contiguous":
        perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seed))
        rewards, gids, mask, old = rewards[perm], gids[perm], mask[perm], old[perm]
    beta = 0.7
    lbar = torch.tensor([ref_lbar(old, mask, i, "mean") if mask[i].any() else 0.0 for i in range(len(rewards))],
                        dtype=torch.float64)
    gidx = torch.unique(gids, return_inverse=True)[1]
    st = pair_statistics(rewards, gidx, mask.any(-1), lbar, beta=beta, margin=margin, mode=mode,
                         max_pairs_per_group=cap)
    pairs = ref_pairs(rewards, gids, mask, margin, mode, cap)
    assert pairs
    d = [beta * float(lbar[w] - lbar[l]) for w, l in pairs]
    count, loss_sum, correct, margin_sum = _sums(st)
    assert count == len(pairs) and correct == sum(x > 0 for x in d)
    assert loss_sum == pytest.approx(sum(math.log1p(math.exp(-x)) for x in d), abs=1e-12)
    assert margin_sum == pytest.approx(sum(d), abs=1e-12)
    x = lbar.clone().requires_grad_(True)
    (pair_loss_sum(beta * x, torch.tensor([w for w, _ in pairs]), torch.tensor([l for _, l in pairs]))).backward()
    assert torch.allclose(beta * st.coef_sum, x.grad, atol=1e-12, rtol=0)  # c_i = β·coef_sum_i / P
    assert st.coef_sum.dtype == torch.float64 and all(v.dtype == torch.float64 for v in st.sums.values())


def test_pair_statistics_float32_inputs_and_no_pairs():
    """float32 implicit rewards are summed in float64; all-equal rewards give zeros; an empty batch gives zeros."""
    rewards, gids, mask, old = make_batch(3, n_groups=4, G=5, reward_kind="multi")
    gidx = torch.unique(gids, return_inverse=True)[1]
    lbar = seq_logprob(old, mask).float()
    st = pair_statistics(rewards, gidx, mask.any(-1), lbar, beta=0.5)
    pairs = ref_pairs(rewards, gids, mask, 0.0, "all", None)
    x = lbar.double().clone().requires_grad_(True)
    pair_loss_sum(0.5 * x, torch.tensor([w for w, _ in pairs]), torch.tensor([l for _, l in pairs])).backward()
    assert torch.allclose(0.5 * st.coef_sum, x.grad, atol=1e-12, rtol=0)
    assert _sums(st)[0] == len(pairs)
    flat = pair_statistics(torch.ones(len(rewards), dtype=torch.float64), gidx, mask.any(-1), lbar)
    assert _sums(flat) == [0.0, 0.0, 0.0, 0.0] and not flat.coef_sum.any()
    empty = pair_statistics(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64), num_groups=0)
    assert _sums(empty) == [0.0, 0.0, 0.0, 0.0] and empty.coef_sum.numel() == 0


def test_pair_coefficients_are_autograd_of_pair_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, generator=g, dtype=torch.float64)
    w = torch.tensor([0, 0, 1, 2, 5, 5, 7])
    l = torch.tensor([3, 4, 3, 8, 6, 7, 8])
    beta, P = 0.2, 11.0  # P can be the global count, larger than the local number of pairs
    lbar = (s / beta).clone().requires_grad_(True)
    (pair_loss_sum(beta * lbar, w, l) / P).backward()
    c = pair_coefficients(s, w, l, beta, P)
    assert torch.allclose(c, lbar.grad, atol=1e-15, rtol=0)
    assert torch.autograd.gradcheck(lambda x: pair_loss_sum(x, w, l), (s.clone().requires_grad_(True),))
    x = -torch.rand(3, 5, dtype=torch.float64).requires_grad_(True)
    m = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda y: seq_logprob(y, m, "mean"), (x,))


def test_pair_metrics_match_loop():
    cfg = cfg_of(amir={"margin": 0.5, "adaptive_lambda": False})
    rewards, gids, mask, old = make_batch(3, n_groups=5, reward_kind="multi")
    rewards[:6] = 1.0  # a zero-variance group: on neither side of the correct/incorrect gap
    rewards[6:12] = torch.tensor([1.0, 0.5, 0.0, 0.5, 0.5, 1.0], dtype=torch.float64)  # rows equal to the mean
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    pairs = ref_pairs(rewards, gids, mask, 0.5, "all", None)
    s = {i: 0.2 * float(ref_lbar(old, mask, i, "mean")) for i in range(len(rewards)) if mask[i].any()}
    acc = sum(s[w] > s[l] for w, l in pairs) / len(pairs)
    margin = sum(s[w] - s[l] for w, l in pairs) / len(pairs)
    assert pb.metrics["pair_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert pb.metrics["pair_margin"] == pytest.approx(margin, abs=1e-12)
    # correct-vs-incorrect gap: mean ℓ̄ of rollouts above their group mean minus below
    groups = {}
    for i in s:
        groups.setdefault(int(gids[i]), []).append(i)
    up, down = [], []
    for rows in groups.values():
        mu = sum(float(rewards[i]) for i in rows) / len(rows)
        up += [s[i] / 0.2 for i in rows if float(rewards[i]) > mu]
        down += [s[i] / 0.2 for i in rows if float(rewards[i]) < mu]
    gap = sum(up) / len(up) - sum(down) / len(down)
    assert pb.metrics["logprob_gap_correct_incorrect"] == pytest.approx(gap, abs=1e-12)


# ------------------------------------------------------------------------------ adaptive λ
def test_lambda_rule_matches_reference_sequence():
    st = AmirState()
    lam = 0.01
    rng = random.Random(0)
    for _ in range(200):
        pl, gl = rng.uniform(0.1, 2.0), rng.choice([rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.05), 0.0])
        lam = ref_lambda_rule(lam, pl, gl)
        st.update(pl, gl)
        assert st.lam == lam
    assert st.step == 200
    st2 = AmirState()
    st2.load_state_dict(st.state_dict())
    assert (st2.lam, st2.step) == (st.lam, st.step)
    with pytest.raises(KeyError, match="lam"):
        st2.load_state_dict({"step": 3})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lambda_updated_before_applied_to_same_step(seed):
    """prepare_batch moves λ with (L_pair, L_GRPO at ratio 1) first, then scales c_i by the NEW λ."""
    rewards, gids, mask, old = make_batch(seed, n_groups=3, G=4)
    # make incorrect responses longer so the token-mean GRPO loss at ratio 1 is clearly positive or negative
    cfg = cfg_of(amir={"margin": 0.5}, loss_agg_mode="token-mean")
    st = AmirState.from_config(cfg.amir)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=st)
    assert (st.lam, st.step) == (0.01, 0)  # no side effect: the caller commits pb.amir_state
    pairs = ref_pairs(rewards, gids, mask, 0.5, "all", None)
    assert pairs
    pl = float(ref_pair_loss(old, mask, pairs, 0.2, "mean"))
    gl = ref_grpo_tokenmean_ratio1(rewards, gids, mask)
    assert pb.metrics["grpo_loss_ratio1"] == pytest.approx(gl, abs=1e-12)
    new_lam = ref_lambda_rule(0.01, pl, gl)
    new = pb.amir_state
    assert new.lam == pytest.approx(new_lam, abs=1e-15) and pb.metrics["lambda"] == new.lam and new.step == 1
    assert pb.metrics["q"] == pytest.approx(0.01 * pl / max(1e-9, gl), rel=1e-12)
    lbar = torch.tensor([float(ref_lbar(old, mask, i, "mean")) if mask[i].any() else 0.0
                         for i in range(len(rewards))], dtype=torch.float64).requires_grad_(True)
    direct = ref_pair_loss(lbar.unsqueeze(-1), torch.ones(len(rewards), 1, dtype=torch.bool), pairs, 0.2, "mean")
    direct.backward()
    assert torch.allclose(pb.seq_coef, new_lam * lbar.grad, atol=1e-15, rtol=0)
    # update_lambda=False recomputes with the committed λ without moving it
    pb2 = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=new,
                        update_lambda=False)
    assert pb2.metrics["lambda"] == new.lam and (pb2.amir_state.lam, pb2.amir_state.step) == (new.lam, 1)
    assert torch.allclose(pb2.seq_coef, pb.seq_coef, atol=1e-15, rtol=0)


def test_all_equal_groups_no_pairs_zero_loss_finite_grads():
    cfg = cfg_of(amir={"margin": 0.0}, kl_coef=0.0)
    _, gids, mask, old = make_batch(0)
    rewards = torch.ones(len(gids), dtype=torch.float64) * 0.7
    st = AmirState()
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=st)
    assert pb.metrics["pair_count"] == 0 and pb.metrics["pair_loss"] == 0.0
    assert pb.metrics["zero_variance_groups"] == pb.metrics["num_groups"] == 4
    assert pb.pair_token_coef is None and torch.count_nonzero(pb.seq_coef) == 0
    assert pb.amir_state.step == 0 and pb.amir_state.lam == 0.01  # no pairs: λ untouched, as in the reference
    lp = (old + 0.3).requires_grad_(True)
    loss, stats = micro_batch_loss(lp, pb, cfg)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(lp.grad).all() and torch.count_nonzero(lp.grad) == 0


def test_disabled_amir_skips_pair_term_but_can_report_pairs():
    cfg = cfg_of(amir={"enabled": False})
    rewards, gids, mask, old = make_batch(2)
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=AmirState())
    assert pb.pair_token_coef is None and "pair_count" not in pb.metrics and "lambda" not in pb.metrics
    pb2 = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                        amir_state=AmirState(), pair_metrics=True)
    assert pb2.pair_token_coef is None and pb2.metrics["pair_count"] > 0 and "lambda" not in pb2.metrics


# ------------------------------------------------------------------------------ length bias
def test_length_bias_of_aggregation_modes_and_pair_term():
    """How strongly each objective pushes down a SHORT (2 tokens) vs a LONG (8 tokens) incorrect response.

    One group, rewards [1, 1, 0, 0], lengths [4, 4, 2, 8], every token log-prob −1 (so ℓ̄ and s are equal
    for all four), GRPO advantages ±0.866, at ratio 1. ∂L/∂logp_t on the incorrect responses
    (positive = gradient descent lowers that token's log-prob):

        mode / term                   per token short | long   per sequence short | long
        token-mean (DAPO)             0.0481 | 0.0481          0.0962 | 0.3849
        seq-mean-token-mean (GRPO)    0.1083 | 0.0271          0.2165 | 0.2165
        seq-mean-token-sum            0.2165 | 0.2165          0.4330 | 1.7321
        seq-mean-token-sum-norm (Dr.) 0.0271 | 0.0271          0.0541 | 0.2165
        pair term / λ (mean norm)     0.0250 | 0.0063          0.0500 | 0.0500

    The original GRPO aggregation dilutes the per-token penalty of a long wrong answer by its length (4x
    weaker here): the length bias the AMIR paper and Dr. GRPO point at. The pair term (length-normalized)
    acts on ℓ̄, so its push per response does not depend on length at all, and it targets responses by
    their likelihood: when the long wrong answer is more likely (ℓ̄ = −0.5 vs −1), it is pushed harder
    (c = 0.0525 vs 0.0500 per unit λ: σ(0.1) vs σ(0) times β·2/P).
    """
    T = 8
    lens = [4, 4, 2, 8]
    mask = torch.zeros(4, T, dtype=torch.bool)
    for i, ln in enumerate(lens):
        mask[i, :ln] = True
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    gids = torch.zeros(4, dtype=torch.long)
    old = torch.full((4, T), -1.0, dtype=torch.float64)
    short, long_ = 2, 3
    table = {}
    for mode in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        cfg = cfg_of(amir={"enabled": False}, loss_agg_mode=mode, loss_agg_max_len=8)
        pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                           amir_state=AmirState())
        lp = old.clone().requires_grad_(True)
        micro_batch_loss(lp, pb, cfg)[0].backward()
        table[mode] = (float(lp.grad[short, 0]), float(lp.grad[long_, 0]),
                       float(lp.grad[short].sum()), float(lp.grad[long_].sum()))
    cfg = cfg_of(amir={"margin": 0.5, "adaptive_lambda": False, "lambda_init": 1.0}, loss_agg_mode="token-mean")
    pb_amir = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                            amir_state=AmirState(lam=1.0))
    pb_pairs_only = pb_amir.pair_token_coef
    table["pair"] = (float(pb_pairs_only[short, 0]), float(pb_pairs_only[long_, 0]),
                     float(pb_pairs_only[short].sum()), float(pb_pairs_only[long_].sum()))
    expected = {
        "token-mean": (0.0481, 0.0481, 0.0962, 0.3849),
        "seq-mean-token-mean": (0.1083, 0.0271, 0.2165, 0.2165),
        "seq-mean-token-sum": (0.2165, 0.2165, 0.4330, 1.7321),
        "seq-mean-token-sum-norm": (0.0271, 0.0271, 0.0541, 0.2165),
        "pair": (0.0250, 0.00625, 0.0500, 0.0500),
    }
    for k, v in expected.items():
        assert table[k] == pytest.approx(v, abs=1e-4), (k, table[k])
    # directions: GRPO's seq-mean-token-mean penalizes each token of the long wrong answer less
    assert table["seq-mean-token-mean"][0] > 3.9 * table["seq-mean-token-mean"][1]
    # token-level modes: same per-token push regardless of length
    for m in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert table[m][0] == pytest.approx(table[m][1], rel=1e-12)
    # pair term: the per-response push (on ℓ̄) is length-independent
    assert table["pair"][2] == pytest.approx(table["pair"][3], rel=1e-12) and table["pair"][2] > 0
    # ... and targets likelihood: a more likely long wrong answer gets a larger coefficient
    old2 = old.clone()
    old2[long_] = -0.5
    pb2 = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old2, cfg=cfg,
                        amir_state=AmirState(lam=1.0))
    assert float(pb2.seq_coef[long_]) == pytest.approx(0.0525, abs=1e-4)
    assert float(pb2.seq_coef[short]) == pytest.approx(0.0500, abs=1e-4)
    assert pb2.seq_coef[long_] > pb2.seq_coef[short] > 0


@pytest.mark.gpu
def test_prepare_batch_on_cuda_matches_cpu():
    """CUDA inputs: everything, pair statistics included, runs on the device and equals the CPU result."""
    rewards, gids, mask, old = make_batch(7, n_groups=4, G=6, reward_kind="multi")
    cfg = cfg_of({"beta": 0.3})
    cpu = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                        amir_state=AmirState.from_config(cfg.amir))
    dev = prepare_batch(rewards=rewards.cuda(), group_ids=gids.cuda(), response_mask=mask.cuda(), old_logp=old.cuda(),
                        cfg=cfg, amir_state=AmirState.from_config(cfg.amir))
    assert dev.pair_token_coef.is_cuda and dev.seq_coef.is_cuda
    assert torch.allclose(dev.seq_coef.cpu(), cpu.seq_coef, atol=1e-12, rtol=0)
    assert torch.allclose(dev.pair_token_coef.cpu(), cpu.pair_token_coef, atol=1e-12, rtol=0)
    assert dev.metrics["pair_loss"] == pytest.approx(cpu.metrics["pair_loss"], abs=1e-12)
