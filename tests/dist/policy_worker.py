"""Worker for tests/test_policy_dist.py, run by torchrun (1 or 2 processes, gloo).

Modes:
  ref   (world 1, TP=PP=1): build the policy from the seed, save it to OUT/init, compute log-probs on the
        fixed batch, run one RL train step (algorithms.prepare_batch + micro_batch_loss, AMIR on),
        write OUT/ref.pt (logp, metrics, full params after the step).
  step  (world 2, --tp/--pp): load OUT/init (model only; fresh Adam state like the reference), same batch,
        one step; rank 0 writes OUT/<name>.pt. --save-after DIR saves the stepped model there;
        --load-after DIR then loads DIR and records log-probs on the batch (resharding check).
The batch (tokens, rewards, groups, masks) is a deterministic function of fixed seeds, so every layout
sees the same data; DP ranks take whole groups with Policy.data_parallel_rows.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

torch.set_num_threads(1)

N, L, G, VOCAB = 8, 12, 4, 64


def make_cfg(tp: int, pp: int, mbs: int = 2, tied: bool = False, dist_opt: bool = False):
    from megatron_amir.config import Config

    return Config(
        model=dict(arch="qwen2", vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                   num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied),
        parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      use_distributed_optimizer=dist_opt),
        algorithm=dict(amir=dict(enabled=True, lambda_init=0.05, adaptive_lambda=False, margin=0.5)),
        data=dict(prompts_per_step=N // G),
        rollout=dict(group_size=G),
        train=dict(lr=1e-3, micro_batch_size=mbs, clip_grad=1e9, seed=7, steps=10),
    )


def make_batch():
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (N, L), generator=g)
    prompt_len = 4
    lengths = torch.randint(3, L - prompt_len + 1, (N,), generator=g)  # response tokens per row
    mask = torch.zeros(N, L - 1)
    for i in range(N):
        mask[i, prompt_len - 1 : prompt_len - 1 + int(lengths[i])] = 1.0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    group_ids = torch.arange(N) // G
    return tokens, mask, rewards, group_ids


def run_step(policy, cfg, tokens, mask, rewards, group_ids):
    from megatron_amir.algorithms import AmirState, prepare_batch

    old_logp = policy.compute_logprobs(tokens)
    rows = policy.data_parallel_rows(N, G)
    prepared = prepare_batch(
        rewards=rewards[rows], group_ids=group_ids[rows], response_mask=mask[rows], old_logp=old_logp[rows],
        cfg=cfg.algorithm, amir_state=AmirState.from_config(cfg.algorithm.amir), dp_group=policy.dp_group,
    )
    metrics = policy.train_step(tokens[rows], prepared)
    return old_logp, metrics


def layout_args() -> argparse.ArgumentParser:
    """Arguments every worker of this kind takes: mode, output dir and name, layout."""
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ref", "step"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="ref")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dist-opt", action="store_true", help="Megatron DistributedOptimizer (ZeRO-1 over DP)")
    return ap


def main() -> None:
    ap = layout_args()
    ap.add_argument("--save-after")
    ap.add_argument("--load-after")
    ap.add_argument("--tied", action="store_true", help="tie input embedding and output layer")
    ap.add_argument("--init", default="init", help="subdirectory of --out holding the initial model")
    args = ap.parse_args()
    out = Path(args.out)

    from megatron_amir.training.policy import Policy

    cfg = make_cfg(args.tp, args.pp, tied=args.tied, dist_opt=args.dist_opt)
    policy = Policy(cfg)
    tokens, mask, rewards, group_ids = make_batch()
    if args.mode == "ref":
        policy.save(out / args.init, save_optimizer=False)
    else:
        policy.load(out / args.init, load_optimizer=False)
    init_logp = policy.compute_logprobs(tokens)
    _, metrics = run_step(policy, cfg, tokens, mask, rewards, group_ids)
    after_logp = policy.compute_logprobs(tokens)
    full = policy.full_state_dict()
    result = {"init_logp": init_logp, "after_logp": after_logp, "metrics": metrics, "params": full,
              "world": int(os.environ.get("WORLD_SIZE", "1"))}
    if args.save_after:
        policy.save(Path(args.save_after), save_optimizer=False)
    if args.load_after:
        policy.load(Path(args.load_after), load_optimizer=False)
        result["loaded_logp"] = policy.compute_logprobs(tokens)
    write_result_and_shut_down(result, out / f"{args.name}.pt")


def write_result_and_shut_down(result: dict, path: Path) -> None:
    """Rank 0 writes ``result`` to ``path`` (atomically); then every rank tears the process groups down."""
    if torch.distributed.get_rank() == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
    # tear the groups down before interpreter exit (an undestroyed gloo group can abort at exit)
    from megatron_amir.training.parallel import shutdown_parallel

    torch.distributed.barrier()
    shutdown_parallel(destroy_process_group=True)


if __name__ == "__main__":
    main()
