"""LoRA r16 vs full fine-tuning on a ~50M-parameter model: optimizer-state + gradient bytes, reference-policy
memory, step time.

Both policies are built from the same config (Llama-style, 12 layers, hidden 512) in one process, take the same
RL train steps (prepare_batch + Policy.train_step, GRPO + AMIR pair term) alternately, and are then measured:
- optimizer state + gradients: the bytes of every tensor the optimizer holds (Adam moments, fp32 main copies if
  any) plus the DDP gradient buffers, deduplicated by storage;
- reference policy: the resident-memory (RSS) growth of building the reference the reference-anchored AMIR run
  needs (``Policy.frozen_copy``: a second model for full fine-tuning, the adapters-off view for LoRA) and the
  parameter bytes it owns;
- rollout weights: thread CPU time of ``Policy.full_hf_state_dict`` (the HF-named tensors the engines load; for
  LoRA the gather plus the merge W + s·B A);
- step time: median thread CPU time of one RL step: old and reference log-probs + train step (1 intra-op
  thread; time descheduled by other jobs does not count).

    python -m benchmarks.lora_memory [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import psutil
import torch

N_PROMPTS, G, PROMPT, RESP, VOCAB = 2, 4, 8, 24, 8192


def make_cfg(lora: bool):
    from megatron_amir.config import Config

    return Config(
        model=dict(arch="llama", vocab_size=VOCAB, hidden_size=512, ffn_hidden_size=1408, num_layers=12,
                   num_attention_heads=8, num_kv_heads=8, max_position_embeddings=256),
        algorithm=dict(amir=dict(enabled=True, reference_anchored=True, adaptive_lambda=False)),
        data=dict(prompts_per_step=N_PROMPTS), rollout=dict(group_size=G),
        train=dict(lr=5e-6, micro_batch_size=N_PROMPTS * G, seed=1, steps=100),
        lora=dict(enabled=lora, rank=16, alpha=32),
    )


def make_batch():
    g = torch.Generator().manual_seed(0)
    n, L = N_PROMPTS * G, PROMPT + RESP
    tokens = torch.randint(4, VOCAB, (n, L), generator=g)
    mask = torch.zeros(n, L - 1)
    mask[:, PROMPT - 1:] = 1.0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])[:n]
    return tokens, mask, rewards, torch.arange(n) // G


def _tensors_of_optimizer(opt) -> list[torch.Tensor]:
    out = []
    for sub in getattr(opt, "chained_optimizers", None) or [opt]:
        inner = getattr(sub, "optimizer", sub)
        for st in inner.state.values():
            out += [v for v in st.values() if torch.is_tensor(v)]
        for group in getattr(sub, "fp32_from_float16_groups", None) or []:  # fp32 main copies (bf16/fp16 models)
            out += list(group)
    return out


def optimizer_and_grad_bytes(policy) -> tuple[int, int]:
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen and t.numel():
                seen.add(key)
                n += t.untyped_storage().nbytes()
        return n

    opt = total(_tensors_of_optimizer(policy.optimizer))
    grads = total(buf.grad_data for chunk in policy.model for buf in chunk.buffers)
    return opt, grads


def build_reference(policy):
    """The reference policy, with the RSS growth (bytes) of building it and the parameter bytes it owns."""
    gc.collect()
    before = psutil.Process().memory_info().rss
    ref = policy.frozen_copy()
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    model = getattr(getattr(ref, "_p", None), "model", [])
    owned = sum(p.numel() * p.element_size() for m in model for p in m.parameters())
    return ref, grown, owned


def weights_time(policy, repeats: int) -> float:
    """Median thread CPU seconds of producing the rollout engines' HF-named weights."""
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        policy.full_hf_state_dict()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from megatron_amir.algorithms import AmirState, prepare_batch
    from megatron_amir.training.policy import Policy

    tokens, mask, rewards, gids = make_batch()
    runs = {}
    for name, lora in (("full", False), ("lora_r16", True)):
        cfg = make_cfg(lora)
        policy = Policy(cfg)
        ref, ref_rss, ref_owned = build_reference(policy)
        runs[name] = {"cfg": cfg, "policy": policy, "ref": ref, "ref_rss": ref_rss, "ref_owned": ref_owned,
                      "times": []}
    for i in range(args.repeats + 1):  # the first step of each is warm-up (allocates Adam state)
        for name, r in runs.items():
            cfg, policy = r["cfg"], r["policy"]
            t0 = time.thread_time()
            old = policy.compute_logprobs(tokens)
            ref_logp = r["ref"].compute_logprobs(tokens)
            pb = prepare_batch(rewards=rewards, group_ids=gids, response_mask=mask, old_logp=old, ref_logp=ref_logp,
                               cfg=cfg.algorithm, amir_state=AmirState.from_config(cfg.algorithm.amir))
            policy.train_step(tokens, pb)
            if i:
                r["times"].append(time.thread_time() - t0)
    mib = 2**20
    params = sum(p.numel() for m in runs["full"]["policy"].modules() for p in m.parameters())
    print(f"model: {params / 1e6:.1f}M parameters (fp32, CPU), batch {tokens.shape[0]} x {tokens.shape[1]} tokens, "
          f"{args.repeats} timed steps each (thread CPU time, 1 thread)")
    print(f"{'run':<10} {'trainable':>11} {'opt MiB':>8} {'grad MiB':>9} {'opt+grad MiB':>13} {'ref RSS MiB':>12} "
          f"{'ref params MiB':>15} {'weights s':>10} {'step s':>7}")
    for name, r in runs.items():
        policy = r["policy"]
        trainable = sum(p.numel() for m in policy.modules() for p in m.parameters() if p.requires_grad)
        opt, grads = optimizer_and_grad_bytes(policy)
        ref_rss, ref_owned = r["ref_rss"], r["ref_owned"]
        r.update(state=opt + grads, step=statistics.median(r["times"]), weights=weights_time(policy, args.repeats))
        print(f"{name:<10} {trainable:>11,} {opt / mib:>8.2f} {grads / mib:>9.2f} {(opt + grads) / mib:>13.2f} "
              f"{ref_rss / mib:>12.1f} {ref_owned / mib:>15.1f} {r['weights']:>10.3f} {r['step']:>7.3f}")
    print(f"step time ratio lora_r16/full: {runs['lora_r16']['step'] / runs['full']['step']:.3f}")
    ratio = runs["lora_r16"]["state"] / runs["full"]["state"]
    print(f"lora_memory: ratio={ratio:.4f} (goal 0.05)")


if __name__ == "__main__":
    main()
