"""AMIR-GRPO vs GRPO: time of one full RL train step of the Megatron policy on the demo model.

Same model, same batch of rollouts (16 prompts x G = 8, prompt 8 tokens + responses of 12-48 tokens, binary
rewards with mixed groups), same micro-batching: ``prepare_batch`` + ``Policy.train_step`` (forward, loss,
backward, optimizer). The objectives alternate step by step so machine load hits both alike; the clock is
this thread's CPU time with one intra-op thread (time spent descheduled by other jobs does not count).

    python -m benchmarks.train_step [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_batch(n_prompts=16, G=8, prompt_len=8, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_prompts * G
    resp = torch.randint(12, 49, (n,), generator=g)
    L = prompt_len + int(resp.max())
    tokens = torch.randint(4, vocab, (n, L), generator=g)
    pos = torch.arange(L - 1).unsqueeze(0)
    mask = ((pos >= prompt_len - 1) & (pos < (prompt_len + resp).unsqueeze(1) - 1)).float()
    rewards = (torch.rand(n, generator=g) < 0.4).float()
    gids = torch.arange(n) // G
    return tokens, mask, rewards, gids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from megatron_amir.algorithms import AmirState, prepare_batch
    from megatron_amir.config import load_config
    from megatron_amir.training.policy import Policy

    cfg = load_config(ROOT / "configs" / "demo_tiny.yaml", ["train.micro_batch_size=32", "model.real_vocab_size=100"])
    policy = Policy(cfg)
    tokens, mask, rewards, gids = make_batch()
    old = policy.compute_logprobs(tokens)
    variants = {}
    for name, enabled in (("GRPO", False), ("AMIR-GRPO", True)):
        acfg = cfg.algorithm.model_copy(deep=True)
        acfg.amir.enabled = enabled
        variants[name] = (acfg, AmirState.from_config(acfg.amir))
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, (acfg, state) in variants.items():
            policy.cfg.algorithm = acfg  # the loss reads the policy's algorithm config
            t0 = time.thread_time()
            pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=acfg,
                               amir_state=state)
            policy.train_step(tokens, pb)
            if i >= args.warmup:
                times[name].append(time.thread_time() - t0)
    print(f"one RL train step, demo model ({sum(p.numel() for m in policy.modules() for p in m.parameters())} "
          f"params), {tokens.shape[0]} sequences x {tokens.shape[1]} tokens, micro-batch 32, 1 thread, "
          f"{args.repeats} repeats (thread CPU time)")
    print(f"{'objective':<12} {'median ms':>10} {'min ms':>8}")
    for name, ts in times.items():
        print(f"{name:<12} {1e3 * statistics.median(ts):>10.2f} {1e3 * min(ts):>8.2f}")
    ratio = statistics.median(times["AMIR-GRPO"]) / statistics.median(times["GRPO"])
    print(f"train_step: ratio={ratio:.3f} (goal 1.02)")


if __name__ == "__main__":
    main()
