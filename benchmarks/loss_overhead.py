"""Cost of the AMIR pair term on top of GRPO, for the loss alone (given token log-probs).

One optimizer step's loss work on 64 sequences × 1024 tokens (8 groups of G = 8, binary rewards,
ragged prompt/response lengths): ``prepare_batch`` + ``micro_batch_loss`` on micro-batches of 8 rows +
``backward`` into the log-prob tensor, for plain GRPO (AMIR disabled, no pair work: the goal's baseline)
and AMIR-GRPO (pairs, implicit rewards, adaptive λ, pair term). For context it also times GRPO as the
trainer runs it, with the pair diagnostics on (``pair_metrics=True``: pair accuracy / margin logged for
GRPO baselines too). The ratio is the median over repeats of the paired per-repeat ratio, after warm-up; the model forward/backward, which dominates a
real step, is not included, so this ratio is an upper bound on the end-to-end overhead.

    python -m benchmarks.loss_overhead [--repeats 200] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_amir.algorithms import AmirState, micro_batch_loss, prepare_batch
from megatron_amir.config import AlgorithmConfig, AmirConfig


def make_inputs(n=64, T=1024, G=8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(16, 128, (n,), generator=g)
    resp = torch.randint(64, T - 128, (n,), generator=g)
    pos = torch.arange(T).unsqueeze(0)
    mask = (pos >= prompt.unsqueeze(1) - 1) & (pos < (prompt + resp).unsqueeze(1) - 1)
    rewards = (torch.rand(n, generator=g) < 0.5).double()
    gids = torch.arange(n) // G
    old = -torch.rand(n, T, generator=g) * 4
    logp = old + 0.05 * torch.randn(n, T, generator=g)
    return [x.to(device) for x in (rewards, gids, mask, old, logp)]


def one_step(cfg, state, inputs, micro, pair_metrics=False, clock=None, split=None):
    """One optimizer step's loss work; with ``clock`` and ``split`` (a list), appends the time ``prepare_batch`` took."""
    rewards, gids, mask, old, logp0 = inputs
    t0 = clock() if split is not None else 0.0
    pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, cfg=cfg, amir_state=state,
                       pair_metrics=pair_metrics)
    if split is not None:
        split.append(clock() - t0)
    lp = logp0.detach().requires_grad_(True)
    for start in range(0, lp.shape[0], micro):
        sl = slice(start, start + micro)
        loss, _ = micro_batch_loss(lp[sl], pb.select(sl), cfg)
        loss.backward()
    return lp.grad


def time_all(cfgs, inputs, micro, repeats, device, warmup=5):
    """Alternate the objectives (``(cfg, pair_metrics)`` pairs) step by step so load drift hits all alike.

    On CPU the clock is this thread's CPU time (time.thread_time): with one intra-op thread it is the
    work done, and time spent descheduled by other jobs on a shared machine does not count. On CUDA it
    is wall time around a synchronize.
    """
    clock = time.perf_counter if device == "cuda" else time.thread_time
    states = [AmirState.from_config(c.amir) for c, _ in cfgs]
    times = [[] for _ in cfgs]
    preps = [[] for _ in cfgs]
    for i in range(repeats + warmup):
        for k, ((cfg, pair_metrics), state) in enumerate(zip(cfgs, states)):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            prep: list[float] = []
            one_step(cfg, state, inputs, micro, pair_metrics, clock=clock, split=prep)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(clock() - t0)
                preps[k].append(prep[0])
    return times, preps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = make_inputs(device=args.device)
    grpo = AlgorithmConfig(amir=AmirConfig(enabled=False))
    amir = AlgorithmConfig(amir=AmirConfig(enabled=True))
    (t_g, t_gm, t_a), (p_g, _, p_a) = time_all([(grpo, False), (grpo, True), (amir, False)], inputs, args.micro_batch, args.repeats,
                              args.device)
    med_g, med_gm, med_a = statistics.median(t_g), statistics.median(t_gm), statistics.median(t_a)
    n_tok = int(inputs[2].sum())
    clock = "wall" if args.device == "cuda" else "thread CPU"
    print(f"{clock} time of loss + backward, 64 seqs x 1024 tokens ({n_tok} response tokens), micro-batch {args.micro_batch}, "
          f"device {args.device}, threads {args.threads}, {len(t_g)} repeats")
    print(f"{'objective':<12} {'median ms':>10} {'min ms':>8} {'p10 ms':>8} {'p90 ms':>8}")
    for name, ts in (("GRPO", t_g), ("GRPO+diag", t_gm), ("AMIR-GRPO", t_a)):
        q = statistics.quantiles(ts, n=10)
        print(f"{name:<12} {1e3 * statistics.median(ts):>10.3f} {1e3 * min(ts):>8.3f} {1e3 * q[0]:>8.3f} "
              f"{1e3 * q[-1]:>8.3f}")
    pg, pa = statistics.median(p_g), statistics.median(p_a)
    print(f"of which prepare_batch (once per step): GRPO {1e3 * pg:.3f} ms, AMIR-GRPO {1e3 * pa:.3f} ms "
          f"(+{1e3 * (pa - pg):.3f}); micro-batch loss + backward: AMIR-GRPO +{1e3 * ((med_a - pa) - (med_g - pg)):.3f} ms")
    print(f"context: AMIR-GRPO / GRPO with pair diagnostics (the trainer's GRPO): {med_a / med_gm:.3f}")
    print(f"ratio of minima (least disturbed runs): {min(t_a) / min(t_g):.3f}; ratio of medians: {med_a / med_g:.3f}")
    # the objectives alternate step by step, so repeat i of each ran under the same machine state: the median of the
    # paired ratios cancels load drift that the ratio of medians keeps
    paired = statistics.median(a / g for a, g in zip(t_a, t_g))
    print(f"loss_overhead: ratio={paired:.3f} (goal 1.10)")


if __name__ == "__main__":
    main()
