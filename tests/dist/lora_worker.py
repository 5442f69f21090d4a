"""Worker for tests/test_lora_dist.py, run by torchrun (1 or 2 processes, gloo): one RL step of a LoRA policy.

Same model, batch and loss as tests/dist/policy_worker.py (its make_cfg / make_batch / run_step), with LoRA r=4
on all four target modules. Modes:
  ref   (world 1, TP=PP=1): build, give every B random values (B = 0 would leave A without gradient), save
        OUT/init, record log-probs (adapters on and off), one step, full adapter gradients, full params after.
  step  (world 2, --tp/--pp/--dist-opt): load OUT/init, the same; rank 0 writes OUT/<name>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_worker import layout_args, make_batch, make_cfg, run_step, write_result_and_shut_down  # noqa: E402

torch.set_num_threads(1)
RANK, ALPHA = 4, 8.0


def full_adapter_grads(policy) -> dict:
    """Full (TP/PP-gathered) adapter gradients on rank 0, named like the adapters: the gather reads whatever the
    parameters hold, so their data points at their gradient buffers for the duration."""
    from megatron_amir.model.lora import adapter_parameters

    params = adapter_parameters(policy.modules())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.main_grad.detach().to(p.dtype).clone()
    try:
        full = policy.full_state_dict()
    finally:
        for p, d in zip(params, saved):
            p.data = d
    return None if full is None else {k: v for k, v in full.items() if ".lora_" in k}


def main() -> None:
    ap = layout_args()
    args = ap.parse_args()
    out = Path(args.out)

    from megatron_amir.config import LoRAConfig
    from megatron_amir.model.lora import adapters_disabled, lora_modules
    from megatron_amir.training.policy import Policy

    cfg = make_cfg(args.tp, args.pp, dist_opt=args.dist_opt)
    cfg.lora = LoRAConfig(enabled=True, rank=RANK, alpha=ALPHA)
    policy = Policy(cfg)
    tokens, mask, rewards, group_ids = make_batch()
    if args.mode == "ref":
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for m in lora_modules(policy.modules()):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        policy.save(out / "init", save_optimizer=False)
    else:
        policy.load(out / "init", load_optimizer=False)
    before = policy.full_state_dict()
    init_logp = policy.compute_logprobs(tokens)
    with adapters_disabled(policy.modules()):
        base_logp = policy.compute_logprobs(tokens)
    _, metrics = run_step(policy, cfg, tokens, mask, rewards, group_ids)
    grads = None if args.dist_opt else full_adapter_grads(policy)  # ZeRO-1 keeps only this rank's grad shard
    after = policy.full_state_dict()
    result = {"init_logp": init_logp, "base_logp": base_logp, "metrics": metrics, "grads": grads,
              "before": before, "params": after, "after_logp": policy.compute_logprobs(tokens),
              "world": int(os.environ.get("WORLD_SIZE", "1"))}
    write_result_and_shut_down(result, out / f"{args.name}.pt")

if __name__ == "__main__":
    main()
