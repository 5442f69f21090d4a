"""Data parallelism: 2 gloo processes (torch.multiprocessing) give the same loss, gradients, metrics and λ
as one process holding the whole global batch. Groups are whole on one rank (the trainer's contract),
but ranks hold different numbers of rows, tokens and pairs, so every global normalizer matters."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_amir.algorithms import AmirState, micro_batch_loss, prepare_batch
from megatron_amir.config import AlgorithmConfig, AmirConfig

CONFIGS = {
    "token-mean": dict(loss_agg_mode="token-mean", kl_coef=0.05, tis_cap=1.5, whiten_rewards=True,
                       advantage="drgrpo", amir=dict(margin=0.2, pair_mode="all")),
    "seq-mean-token-mean": dict(loss_agg_mode="seq-mean-token-mean", advantage="grpo",
                                amir=dict(margin=0.0, pair_mode="top", max_pairs_per_group=3,
                                          reference_anchored=True)),
    "sum-norm": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_agg_max_len=16, advantage="rloo",
                     amir=dict(margin=0.5, logprob_norm="sum", beta=0.05)),
}


def _cfg(name):
    kw = dict(CONFIGS[name])
    return AlgorithmConfig(amir=AmirConfig(**kw.pop("amir")), **kw)


def _data(seed=0, n_groups=7, G=4, T=12):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    N = n_groups * G
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i in range(N):
        p = rng.randint(0, 3)
        ln = rng.randint(1, T - p) if i % 5 else 0  # some fully masked rows too
        mask[i, p:p + ln] = True
    rewards = torch.tensor([rng.choice([0.0, 0.3, 1.0]) for _ in range(N)], dtype=torch.float64)
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    ref = old + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    gids = torch.tensor([i // G for i in range(N)])
    return rewards, gids, mask, old, ref, rollout, logp


def _run(rows, cfg, dp_group, state):
    rewards, gids, mask, old, ref, rollout, logp = (x[rows] for x in _data())
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg,
                       amir_state=state, ref_logp=ref, rollout_logp=rollout, dp_group=dp_group)
    lp = logp.clone().requires_grad_(True)
    total = 0.0
    n = len(rows)
    for start in range(0, n, 3):  # micro-batches of 3 rows: pairs straddle micro-batches
        idx = torch.arange(start, min(n, start + 3))
        loss, _ = micro_batch_loss(lp[idx], pb.select(idx), cfg)
        loss.backward()
        total += float(loss.detach())
    return total, lp.grad, pb.metrics, pb.amir_state


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        G, n_groups = 4, 7
        # uneven: rank 0 gets groups {0, 2, 4, 6}, rank 1 gets {1, 3, 5}
        rows = torch.tensor([i for i in range(n_groups * G) if (i // G) % world == rank])
        for name in sorted(CONFIGS):
            cfg = _cfg(name)
            state = AmirState.from_config(cfg.amir)
            total, grad, metrics, new_state = _run(rows, cfg, dist.group.WORLD, state)
            lam = new_state.lam
            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)  # micro-batch losses are summed over DP ranks
            torch.save({"rows": rows, "grad": grad, "total": t, "metrics": metrics, "lam": lam},
                       os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_gloo_ranks_equal_single_process(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in sorted(CONFIGS):
        cfg = _cfg(name)
        state = AmirState.from_config(cfg.amir)
        total1, grad1, metrics1, new_state = _run(torch.arange(28), cfg, None, state)
        lam1 = new_state.lam
        assert metrics1["pair_count"] > 0 and new_state.step == 1 and state.step == 0
        outs = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]
        grad2 = torch.zeros_like(grad1)
        for o in outs:
            grad2[o["rows"]] = o["grad"]
            assert float(o["total"]) == pytest.approx(total1, abs=1e-12), name
            assert o["lam"] == lam1, name
            for k, v in metrics1.items():
                if v == v:  # not nan
                    assert o["metrics"][k] == pytest.approx(v, abs=1e-12, rel=1e-12), (name, k)
        assert torch.allclose(grad2, grad1, atol=1e-14, rtol=0), name
